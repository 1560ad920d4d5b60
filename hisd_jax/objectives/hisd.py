"""Hierarchical Self-Distillation (HiSD) loss over the exits of a multi-exit network.

With exits ``e = 1..E`` (lists are ordered shallow → deep, index ``E-1`` is the final exit),
logits ``z_e``, projected features ``p_e`` of the internal exits, pooled features ``h_E`` of the
final exit (same width), label ``y`` and ``sg = jax.lax.stop_gradient``::

    L = Σ_e      w_e(progress) · CE(z_e, y)
      + λ_kd   · Σ_{e<E} T² · KL(softmax(sg(z_E)/T)     ‖ softmax(z_e/T))
      + λ_hier · Σ_{e<E} T² · KL(softmax(sg(z_{e+1})/T) ‖ softmax(z_e/T))
      + λ_feat · Σ_{e<E} ‖norm(p_e) − sg(norm(h_E))‖²

For ``e = E-1`` the hierarchical teacher is the final exit itself, so both KD terms apply to it
(intended). ``w_e(progress)`` interpolates linearly between ``ce_start`` and ``ce_end``.

The baselines are presets of the same loss (:func:`resolve_weights`):

* ``final_only``: CE on the final exit only.
* ``sdn`` (Kaya, Hong, Dumitras, "Shallow-Deep Networks", ICML 2019): CE at every exit; the
  weight of internal exit ``i`` ramps from 0.01 to ``C_i = 0.9·(i+1)/K`` over training.
* ``byot`` (Zhang et al., "Be Your Own Teacher", ICCV 2019): ``(1−α)·CE + α·KD`` from the final
  exit for internal exits, ``α = 0.1``, ``T = 3``, feature L2 with ``β = 1e-6``.
* ``mose`` (arXiv 2503.03008): ``w_e = depth_e / depth_E``, CE only.
* ``hisd``: every term.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from hisd_jax.objectives.distill import (
    cross_entropy,
    feature_l2,
    kd_kl,
    mix_targets,
    soft_cross_entropy,
)

Array = jax.Array

PRESETS = ("final_only", "sdn", "byot", "mose", "hisd")
OVERRIDES = ("ce", "ce_start", "ce_end", "kd", "hier", "feat", "temperature")
DEFAULT_TEMPERATURE = 3.0


@struct.dataclass
class HiSDWeights:
    """Weights of the HiSD loss; a pytree, so it can be passed into ``jax.jit``.

    ``ce_start``/``ce_end`` are array leaves. ``kd``, ``hier``, ``feat`` and ``temperature`` are
    static Python floats (pytree metadata), so a zero weight removes its term at trace time
    (changing them recompiles a jitted function).
    """

    ce_start: jnp.ndarray  # [E] CE weight at progress 0
    ce_end: jnp.ndarray  # [E] CE weight at progress 1
    kd: float = struct.field(pytree_node=False, default=0.0)
    hier: float = struct.field(pytree_node=False, default=0.0)
    feat: float = struct.field(pytree_node=False, default=0.0)
    temperature: float = struct.field(pytree_node=False, default=DEFAULT_TEMPERATURE)


def _preset_values(preset: str, num_exits: int, depths: Sequence[float]) -> dict:
    """Weights of ``preset`` as plain Python values (see the module docstring)."""
    k = num_exits - 1
    values = dict(kd=0.0, hier=0.0, feat=0.0, temperature=DEFAULT_TEMPERATURE)
    if preset == "final_only":
        ce_start = ce_end = [0.0] * k + [1.0]
    elif preset == "sdn":
        ce_start = [0.01] * k + [1.0]
        ce_end = [0.9 * (i + 1) / k for i in range(k)] + [1.0]
    elif preset == "byot":
        alpha = 0.1
        ce_start = ce_end = [1.0 - alpha] * k + [1.0]
        values.update(kd=alpha, feat=1e-6, temperature=3.0)
    elif preset == "mose":
        ce_start = ce_end = [d / depths[-1] for d in depths]
    else:  # hisd
        ce_start = ce_end = [1.0] * num_exits
        values.update(kd=0.5, hier=0.5, feat=0.1, temperature=3.0)
    return dict(values, ce_start=ce_start, ce_end=ce_end)


def _check_vector(name: str, value, num_exits: int) -> list[float]:
    values = [float(v) for v in value]
    if len(values) != num_exits:
        raise ValueError(
            f"hisd.{name} has {len(values)} values but num_exits={num_exits} needs {num_exits}"
        )
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"hisd.{name}={values} must contain finite values >= 0")
    return values


def resolve_weights(
    preset: str, num_exits: int, depths: Sequence[float] | None = None, **overrides
) -> HiSDWeights:
    """Weights of a named preset, with optional overrides.

    Args:
      preset: one of :data:`PRESETS`.
      num_exits: ``E >= 1``; with ``E = 1`` every preset is plain CE on the single exit.
      depths: relative depth of each exit (e.g. block counts), used by ``mose``;
        default ``1..E``.
      **overrides: any of :data:`OVERRIDES`. ``ce`` sets ``ce_start`` and ``ce_end`` together.

    Raises:
      ValueError: naming the field, for an unknown preset or override, a wrong number of CE
        weights or depths, a negative or non-finite weight, or a temperature <= 0.
    """
    if preset not in PRESETS:
        raise ValueError(f"hisd.preset={preset!r} is not one of {', '.join(PRESETS)}")
    if not isinstance(num_exits, numbers.Integral) or num_exits < 1:
        raise ValueError(f"hisd.num_exits={num_exits!r} must be an integer >= 1")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(
            f"hisd.{unknown[0]} is not a HiSD weight; allowed overrides: {', '.join(OVERRIDES)}"
        )
    if "ce" in overrides and ("ce_start" in overrides or "ce_end" in overrides):
        raise ValueError("give either hisd.ce or hisd.ce_start/hisd.ce_end, not both")
    if depths is None:
        depths = range(1, num_exits + 1)
    depths = _check_vector("depths", depths, num_exits)
    if depths[-1] <= 0:
        raise ValueError(f"hisd.depths={depths} must end with a depth > 0")

    values = _preset_values(preset, num_exits, depths)
    if "ce" in overrides:
        ce = _check_vector("ce", overrides.pop("ce"), num_exits)
        overrides["ce_start"] = overrides["ce_end"] = ce
    values.update(overrides)
    for name in ("ce_start", "ce_end"):
        values[name] = jnp.asarray(_check_vector(name, values[name], num_exits), jnp.float32)
    for name in ("kd", "hier", "feat"):
        values[name] = float(values[name])
        if not (math.isfinite(values[name]) and values[name] >= 0):
            raise ValueError(f"hisd.{name}={values[name]} must be a finite value >= 0")
    values["temperature"] = float(values["temperature"])
    if not (math.isfinite(values["temperature"]) and values["temperature"] > 0):
        raise ValueError(f"hisd.temperature={values['temperature']} must be finite and > 0")
    return HiSDWeights(**values)


def ce_weights(weights: HiSDWeights, progress) -> Array:
    """CE weights ``[E]`` at training ``progress`` (clipped to [0, 1]; may be traced)."""
    p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
    return weights.ce_start + (weights.ce_end - weights.ce_start) * p


def hisd_loss(
    logits: Sequence[Array],
    labels: Array | None,
    weights: HiSDWeights,
    *,
    features: Sequence[Array] | None = None,
    final_features: Array | None = None,
    progress=1.0,
    mask: Array | None = None,
    targets: Array | None = None,
    soft_weight=1.0,
) -> tuple[Array, dict[str, Array]]:
    """The HiSD loss (module docstring) and its unweighted terms.

    Args:
      logits: ``E`` arrays ``[B, C]``, shallow → deep; the last one is the final exit (teacher).
      labels: ``[B]`` integer labels (unused, may be None, when ``targets`` is given).
      weights: from :func:`resolve_weights`.
      features: ``E-1`` arrays ``[B, D]``, projected features ``p_e`` of the internal exits.
      final_features: ``[B, D]`` pooled features ``h_E`` of the final exit.
      progress: training progress in [0, 1] for the CE-weight ramp; may be traced.
      mask: optional ``[B]``; rows with ``mask == 0`` (padding) are ignored by every term.
      targets: optional ``[B, C]`` soft labels; if given, every CE term is the soft cross-entropy
        against them instead of the hard labels (or mixed with the hard one, below).
      soft_weight: with both ``labels`` and ``targets``, each CE term is
        ``(1 - m)·CE(z, y) + m·CE(z, targets)`` with ``m = soft_weight`` (a scalar in [0, 1],
        may be traced); ``m == 0`` gives exactly the hard-label term.

    Returns:
      ``(loss, metrics)`` with flat scalar metrics ``ce/exit{e}`` (0-based), ``kd``, ``hier``,
      ``feat`` (unweighted sums over the internal exits; ``feat`` is 0 when no features are
      given) and ``loss``. The distillation metrics are computed even when their weight is 0;
      a term enters the loss (and its gradient) only when its weight is non-zero.

    Raises:
      ValueError: if the number of logits does not match the weights, or ``weights.feat != 0``
        (and ``E > 1``) without ``features``/``final_features`` of the right length.
    """
    logits = list(logits)
    num_exits = len(logits)
    if weights.ce_start.shape != (num_exits,):
        raise ValueError(
            f"hisd_loss got {num_exits} exit logits but weights for "
            f"{weights.ce_start.shape[0]} exits"
        )
    if targets is None:
        ce = [cross_entropy(z, labels, mask) for z in logits]
    elif labels is None:
        ce = [soft_cross_entropy(z, targets, mask) for z in logits]
    else:
        ce = [
            mix_targets(
                cross_entropy(z, labels, mask), soft_cross_entropy(z, targets, mask), soft_weight
            )
            for z in logits
        ]
    w = ce_weights(weights, progress)
    loss = sum(w[e] * ce[e] for e in range(num_exits))

    sg = jax.lax.stop_gradient
    t = weights.temperature
    zero = jnp.zeros((), jnp.float32)
    internal = range(num_exits - 1)
    kd = sum((kd_kl(logits[e], sg(logits[-1]), t, mask) for e in internal), zero)
    hier = sum((kd_kl(logits[e], sg(logits[e + 1]), t, mask) for e in internal), zero)

    feat = zero
    has_features = features is not None and final_features is not None
    if num_exits > 1 and weights.feat != 0 and not has_features:
        raise ValueError(
            f"hisd.feat={weights.feat} != 0 needs features (the {num_exits - 1} projected "
            "internal-exit features) and final_features (the final exit's pooled features); "
            "pass them or set hisd.feat=0"
        )
    if num_exits > 1 and has_features:
        if len(features) != num_exits - 1:
            raise ValueError(
                f"hisd_loss got {len(features)} features but needs {num_exits - 1} "
                "(one per internal exit)"
            )
        feat = sum((feature_l2(p, sg(final_features), mask) for p in features), zero)

    return add_distillation(loss, weights, {"ce": ce}, kd=kd, hier=hier, feat=feat)


def add_distillation(loss, weights: HiSDWeights, per_exit: dict, *, kd, hier, feat):
    """`loss` plus the weighted distillation terms (a term enters only when its weight is
    non-zero) and the flat metrics: `{name}/exit{e}` for each of `per_exit`'s lists, `kd`,
    `hier`, `feat` (unweighted) and `loss`. Shared by `hisd_loss` and the retrieval loss."""
    for lam, term in ((weights.kd, kd), (weights.hier, hier), (weights.feat, feat)):
        if lam != 0:
            loss = loss + lam * term
    metrics = {f"{name}/exit{e}": v for name, vs in per_exit.items() for e, v in enumerate(vs)}
    metrics.update(kd=kd, hier=hier, feat=feat, loss=loss)
    return loss, metrics
