"""Classification and knowledge-distillation losses (pure, jittable ``jnp`` functions).

All losses take a batch of ``B`` examples and return a scalar: the (masked) mean over the
batch of a per-example loss. An optional ``mask`` of shape ``[B]`` marks real examples
(``mask > 0``) against padding; the mean is ``sum(mask * x) / max(sum(mask), 1)``, so
padding rows never change the result and an all-padding batch gives 0.

Probabilities are handled in log space (``log_softmax``, never ``log(softmax)``) and inputs
are computed in at least float32, so bfloat16 logits are safe.

References:
  Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015 (KD with T²).
  Zhang et al., "Be Your Own Teacher", ICCV 2019 (feature distillation between exits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _at_least_f32(x) -> Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def masked_mean(x: Array, mask: Array | None = None) -> Array:
    """``mean(x)`` if ``mask`` is None, else ``sum(mask * x) / max(sum(mask), 1)``."""
    if mask is None:
        return jnp.mean(x)
    mask = _at_least_f32(mask)
    return jnp.sum(mask * x) / jnp.maximum(jnp.sum(mask), 1.0)


def mix_targets(hard: Array, soft: Array, soft_weight) -> Array:
    """``(1 - m)·hard + m·soft`` for two losses of the same shape, ``m = soft_weight`` (may be
    traced); exactly ``hard`` where ``m == 0``, even if ``soft`` is not finite."""
    m = jnp.asarray(soft_weight, jnp.float32)
    return jnp.where(m == 0, hard, (1.0 - m) * hard + m * soft)


def cross_entropy(logits: Array, labels: Array, mask: Array | None = None) -> Array:
    """Mean over examples of ``-log softmax(logits)[label]``.

    Args:
      logits: ``[B, C]``.
      labels: ``[B]`` integer class indices.
      mask: optional ``[B]`` weights; rows with ``mask == 0`` are ignored.
    """
    log_p = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
    nll = -jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return masked_mean(nll, mask)


def soft_cross_entropy(logits: Array, targets: Array, mask: Array | None = None) -> Array:
    """Mean over examples of ``-Σ_c targets_c · log_softmax(logits)_c``.

    Args:
      logits: ``[B, C]``.
      targets: ``[B, C]`` probabilities (e.g. from :func:`soft_labels`); not stop-gradiented.
      mask: optional ``[B]`` weights.
    """
    log_p = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
    return masked_mean(-jnp.sum(_at_least_f32(targets) * log_p, axis=-1), mask)


def kd_kl(
    student_logits: Array,
    teacher_logits: Array,
    temperature: float,
    mask: Array | None = None,
) -> Array:
    """Temperature-scaled distillation loss ``T² · KL(softmax(t/T) ‖ softmax(s/T))``.

    ``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)`` with ``p`` the teacher and ``q`` the student
    distribution; the ``T²`` factor keeps gradient magnitudes comparable across temperatures
    (Hinton et al., 2015). Averaged over examples (masked).

    This function does NOT stop gradients through ``teacher_logits``: wrap them in
    ``jax.lax.stop_gradient`` at the call site when the teacher must not learn from the student.
    """
    t = temperature
    log_q = jax.nn.log_softmax(_at_least_f32(student_logits) / t, axis=-1)
    log_p = jax.nn.log_softmax(_at_least_f32(teacher_logits) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return masked_mean(t * t * kl, mask)


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
    """Rows divided by ``max(‖row‖, eps)``; zero rows stay zero and have finite gradients."""
    x = _at_least_f32(x)
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def feature_l2(
    student: Array, teacher: Array, mask: Array | None = None, eps: float = 1e-6
) -> Array:
    """Mean over examples of ``‖s/‖s‖ − t/‖t‖‖²`` (rows L2-normalised, see :func:`l2_normalize`).

    Like :func:`kd_kl`, gradients flow into ``teacher``; the caller stops them if needed.
    """
    diff = l2_normalize(student, eps) - l2_normalize(teacher, eps)
    return masked_mean(jnp.sum(diff * diff, axis=-1), mask)


def soft_labels(logits: Array, temperature: float = 1.0, top_k: int | None = None) -> Array:
    """Soft labels ``softmax(logits / T)`` over the last axis.

    With ``top_k``, only the ``k`` largest probabilities of each row are kept and renormalised
    to sum to one (the others become 0), which compresses stored labels for KD from converged
    tasks (Lu et al., NAACL 2022 industry track).
    """
    probs = jax.nn.softmax(_at_least_f32(logits) / temperature, axis=-1)
    if top_k is None:
        return probs
    num_classes = probs.shape[-1]
    if not 1 <= top_k <= num_classes:
        raise ValueError(f"top_k={top_k} must be in [1, {num_classes}] (the number of classes)")
    values, indices = jax.lax.top_k(probs, top_k)
    values = values / jnp.sum(values, axis=-1, keepdims=True)
    return jnp.put_along_axis(jnp.zeros_like(probs), indices, values, axis=-1, inplace=False)
