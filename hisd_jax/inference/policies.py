"""Early-exit decision rules over the logits of every exit.

Arrays are exit-major: ``logits`` is ``[E, N, C]`` (E exits ordered shallow to deep, the last one
is the final exit), confidences and predictions are ``[E, N]``, and an exit index is ``[N]``.

``confidence``, ``threshold_exit``, ``patience_exit`` and ``apply_exits`` follow the array
namespace of their inputs: NumPy arrays give NumPy results (float64 on the host, as used when
fitting thresholds over a whole validation set), JAX arrays give JAX results and the functions
can be traced by ``jax.jit`` (string and integer options are static). Per-exit temperature
scaling is applied before calling ``confidence``: ``logits / temperatures[:, None, None]``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

CONFIDENCE_KINDS = ("max_softmax", "margin", "neg_entropy")


def _namespace(*arrays):
    """``jax.numpy`` if any input is a JAX array (or tracer), else ``numpy``."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _with_final_reached(xp, reached):
    """Marks the final exit as reached for every example: it takes whatever is left."""
    return xp.concatenate([reached[:-1], xp.ones_like(reached[:1])], axis=0)


def confidence(logits, kind="max_softmax"):
    """Per-exit confidence ``[E, N]`` (or any ``[..., C]`` -> ``[...]``) of softmax(logits).

    kind: "max_softmax" (top-1 probability), "margin" (top-1 minus top-2 probability) or
    "neg_entropy" (sum_c p_c log p_c, at most 0). Higher means more confident for every kind.
    """
    if kind not in CONFIDENCE_KINDS:
        raise ValueError(
            f"Unknown confidence kind {kind!r}; allowed: {', '.join(CONFIDENCE_KINDS)}."
        )
    xp = _namespace(logits)
    z = xp.asarray(logits)
    shifted = z - xp.max(z, axis=-1, keepdims=True)
    logp = shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))
    p = xp.exp(logp)
    if kind == "max_softmax":
        return xp.max(p, axis=-1)
    if kind == "margin":
        top2 = xp.sort(p, axis=-1)[..., -2:]
        return top2[..., 1] - top2[..., 0]
    return xp.sum(p * xp.where(p > 0, logp, 0.0), axis=-1)  # p = 0 (a -inf logit) adds nothing.


@functools.partial(jax.jit, static_argnames="kind")
def _confidence_f32(logits, temperatures, kind):
    return confidence(logits / temperatures[:, None, None], kind)


def cascade_confidence(logits, kind="max_softmax", temperatures=None) -> np.ndarray:
    """``confidence(logits / T)`` ``[E, N]`` computed as the cascade computes it: by JAX in
    float32 (returned as float64 holding those float32 values exactly). Thresholds fitted on
    these values decide, in the cascade, as they did when fitted: float64 confidences differ
    where float32 rounds (e.g. a top-1 probability of exactly 1.0 for large logits), which
    flipped decisions at such thresholds."""
    z = jnp.asarray(np.asarray(logits), jnp.float32)
    num = z.shape[0]
    temps = jnp.ones(num, jnp.float32) if temperatures is None else temperatures
    temps = jnp.asarray(np.asarray(temps), jnp.float32)
    return np.asarray(_confidence_f32(z, temps, kind), np.float64)


def threshold_exit(conf, thresholds):
    """Index ``[N]`` of the first exit e with ``conf[e] >= thresholds[e]`` (ties count as reached).

    conf: ``[E, N]``; thresholds: ``[E]``. Examples that reach no threshold take the final exit,
    whose threshold is ignored. A threshold of +inf disables an exit, -inf takes everything left.
    """
    xp = _namespace(conf, thresholds)
    conf, thresholds = xp.asarray(conf), xp.asarray(thresholds)
    reached = conf >= thresholds[:, None]
    return xp.argmax(_with_final_reached(xp, reached), axis=0)


def patience_exit(preds, patience):
    """Patience-based exit (PABEE, Zhou et al. 2020): index ``[N]`` of the first exit whose
    prediction has been the same for ``patience`` consecutive exits, counting itself.

    preds: ``[E, N]`` integer predictions. ``patience=1`` exits at exit 0; PABEE's patience t
    (t unchanged predictions after the first) is ``patience = t + 1`` here. Examples whose
    prediction never settles take the final exit.
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}.")
    xp = _namespace(preds)
    preds = xp.asarray(preds)
    run = xp.ones(preds.shape[1:], dtype=int)  # length of the current run of equal predictions
    runs = [run]
    for e in range(1, preds.shape[0]):
        run = xp.where(preds[e] == preds[e - 1], run + 1, 1)
        runs.append(run)
    reached = xp.stack(runs) >= patience
    return xp.argmax(_with_final_reached(xp, reached), axis=0)


def apply_exits(logits, exit_idx):
    """Predictions ``[N]`` and logits ``[N, C]`` of each example at its chosen exit."""
    xp = _namespace(logits, exit_idx)
    logits, exit_idx = xp.asarray(logits), xp.asarray(exit_idx)
    chosen = logits[exit_idx, xp.arange(exit_idx.shape[0])]
    return xp.argmax(chosen, axis=-1), chosen


def summarize(exit_idx, preds, labels, cost):
    """Host-side report: accuracy, exit rates ``[E]`` (summing to 1) and average cost.

    cost: ``[E]`` cumulative cost of exiting at each exit (e.g. fraction of the full model's
    FLOPs); ``avg_cost`` is the mean of ``cost[exit_idx]``.
    """
    exit_idx, cost = np.asarray(exit_idx), np.asarray(cost, dtype=np.float64)
    counts = np.bincount(exit_idx, minlength=cost.shape[0])
    n = exit_idx.shape[0]
    return {
        "accuracy": float(np.mean(np.asarray(preds) == np.asarray(labels))),
        "exit_rates": counts / n,
        "avg_cost": float(counts @ cost / n),
    }
