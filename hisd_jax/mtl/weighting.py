"""Loss-weighting MTL strategies: functions of the task losses only.

A strategy turns the task losses L [T] into one scalar to differentiate. Learnable weighting
parameters (UW's log-variances) live in ``params`` and receive gradients through the returned
total; everything else (DWA's epoch averages) lives in ``state``, kept by the caller in its train
state. Every ``apply`` is pure and jittable:

    weighting = get_weighting("dwa", num_tasks=3, steps_per_epoch=100)
    params, state = weighting.init(3)
    total, state, w = weighting.apply(losses, params, state, step=step, rng=rng)

``w`` [T] are the effective per-task weights (for logging; stop-gradient'ed).
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class LossWeighting(NamedTuple):
    """A loss-weighting strategy.

    init: num_tasks -> (params pytree (may be {}), state pytree).
    apply: (losses [T], params, state, *, step, rng) -> (total scalar, new_state, weights [T]).
    """

    init: Callable[[int], tuple[Any, Any]]
    apply: Callable[..., tuple[jax.Array, Any, jax.Array]]


def _stateless(num_tasks):
    del num_tasks
    return {}, {}


def _ew(num_tasks):
    """Equal weighting: total = sum_t L_t."""
    del num_tasks

    def apply(losses, params, state, *, step, rng):
        return jnp.sum(losses), state, jnp.ones_like(losses)

    return LossWeighting(_stateless, apply)


def _static(num_tasks, weights: Sequence[float]):
    """Static weights: total = sum_t w_t L_t with w given as an hparam."""
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != (num_tasks,):
        raise ValueError(f"static weights must have shape ({num_tasks},), got {weights.shape}")

    def apply(losses, params, state, *, step, rng):
        return jnp.sum(weights * losses), state, weights

    return LossWeighting(_stateless, apply)


def _uw(num_tasks):
    """Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), in LibMTL's form.

    Learnable s_t = log sigma_t^2 (params["log_var"], init 0):
      total = sum_t 1/2 exp(-s_t) L_t + 1/2 s_t,   weights w_t = 1/2 exp(-s_t).
    """
    del num_tasks

    def init(num):
        return {"log_var": jnp.zeros(num, jnp.float32)}, {}

    def apply(losses, params, state, *, step, rng):
        s = params["log_var"]
        w = 0.5 * jnp.exp(-s)
        return jnp.sum(w * losses + 0.5 * s), state, lax.stop_gradient(w)

    return LossWeighting(init, apply)


def _dwa(num_tasks, steps_per_epoch: int, temp: float = 2.0):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019).

    With Lbar_t(k) the average training loss of task t over epoch k (epoch = step //
    steps_per_epoch),
      r_t = Lbar_t(k-1) / Lbar_t(k-2),   w = T softmax(r / temp),   total = sum_t sg(w_t) L_t,
    and w = 1 for the first two epochs. The state accumulates the running sums of the current
    epoch; when ``step`` enters a new epoch, the finished epoch's average is pushed into a
    two-epoch history (older, newer).
    """
    del num_tasks
    if steps_per_epoch < 1:
        raise ValueError(f"dwa steps_per_epoch must be >= 1, got {steps_per_epoch}")

    def init(num):
        return {}, {
            "epoch": jnp.zeros((), jnp.int32),
            "sums": jnp.zeros(num, jnp.float32),
            "count": jnp.zeros((), jnp.int32),
            "history": jnp.ones((2, num), jnp.float32),
            "epochs_done": jnp.zeros((), jnp.int32),
        }

    def apply(losses, params, state, *, step, rng):
        epoch = jnp.asarray(step // steps_per_epoch, jnp.int32)
        new_epoch = epoch > state["epoch"]
        finished = state["sums"] / jnp.maximum(state["count"], 1)
        history = jnp.where(new_epoch, jnp.stack([state["history"][1], finished]), state["history"])
        epochs_done = state["epochs_done"] + new_epoch.astype(jnp.int32)
        ratio = history[1] / history[0]
        w = jnp.where(
            epochs_done >= 2, losses.shape[0] * jax.nn.softmax(ratio / temp), jnp.ones_like(ratio)
        )
        w = lax.stop_gradient(w)
        new_state = {
            "epoch": jnp.maximum(epoch, state["epoch"]),
            "sums": jnp.where(new_epoch, 0.0, state["sums"]) + lax.stop_gradient(losses),
            "count": jnp.where(new_epoch, 0, state["count"]) + 1,
            "history": history,
            "epochs_done": epochs_done,
        }
        return jnp.sum(w * losses), new_state, w

    return LossWeighting(init, apply)


def _rlw(num_tasks):
    """Random loss weighting (Lin et al., 2021, "Reasonable effectiveness of random weighting").

    Each step z ~ N(0, I) from ``rng``, w = softmax(z) (sums to 1), total = sum_t sg(w_t) L_t.
    """
    del num_tasks

    def apply(losses, params, state, *, step, rng):
        w = jax.nn.softmax(jax.random.normal(rng, losses.shape, jnp.float32))
        return jnp.sum(w * losses), state, w

    return LossWeighting(_stateless, apply)


def _gls(num_tasks):
    """Geometric loss strategy (Chennupati et al., CVPRW 2019): total = (prod_t L_t)^(1/T).

    Computed as exp(mean_t log L_t) (losses must be positive; they are floored at 1e-30).
    The reported weights are the effective ones, d total / d L_t = total / (T L_t).
    """
    del num_tasks

    def apply(losses, params, state, *, step, rng):
        losses = jnp.maximum(losses, 1e-30)
        total = jnp.exp(jnp.mean(jnp.log(losses)))
        return total, state, lax.stop_gradient(total / (losses.shape[0] * losses))

    return LossWeighting(_stateless, apply)


_WEIGHTINGS = {
    "ew": _ew,
    "static": _static,
    "uw": _uw,
    "dwa": _dwa,
    "rlw": _rlw,
    "gls": _gls,
}


def get_weighting(name: str, num_tasks: int, **hparams) -> LossWeighting:
    """The loss-weighting strategy called ``name`` (see ``_WEIGHTINGS``) with its hparams."""
    if name not in _WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {name!r}; allowed: {sorted(_WEIGHTINGS)}")
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    return _WEIGHTINGS[name](num_tasks, **hparams)
