"""Loss-weighting MTL strategies: functions of the task losses only.

A strategy turns the task losses L [T] into one scalar to differentiate. Learnable weighting
parameters (UW's log-variances) live in ``params`` and receive gradients through the returned
total; everything else (DWA's epoch averages) lives in ``state``, kept by the caller in its train
state. Every ``apply`` is pure and jittable:

    weighting = get_weighting("dwa", num_tasks=3, steps_per_epoch=100, task_ids=(7, 3, 11))
    params, state = weighting.init(3)
    total, state, w = weighting.apply(losses, params, state, step=step, rng=rng, active=active)

``w`` [T] are the effective per-task weights (for logging; stop-gradient'ed).

Active tasks. ``active`` (float32 [T] of 0/1, may be traced and change between steps of one
compiled function; None = all active) marks the tasks that take part in this step. Every
strategy behaves on the active tasks exactly as it would on the sub-problem with the inactive
tasks deleted (same hparams, the sub-vector of losses, the matching sub-vector of ``task_ids``):
an inactive task gets weight 0, adds nothing to the total even when its loss is inf or nan
(``jnp.where``, not a product with 0), gives exactly zero gradient to the losses and to the
strategy params (UW's log-variance), and its entries of ``state`` are left untouched, so when it
becomes active again it resumes from its own state (or its initialisation). Normalisations
(DWA's T softmax, GLS's geometric mean) run over the active tasks only.

Task ids. ``task_ids`` (construction time; T distinct ints in [0, 2^32), default 0..T-1) name the
tasks for randomness: task t's random numbers come from ``jax.random.fold_in(rng, task_ids[t])``,
so a task's draw does not depend on which other tasks exist or are active (RLW).
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class LossWeighting(NamedTuple):
    """A loss-weighting strategy.

    init: num_tasks -> (params pytree (may be {}), state pytree).
    apply: (losses [T], params, state, *, step, rng, active=None) -> (total scalar, new_state,
      weights [T]); ``active`` float [T] of 0/1 (None: all tasks active), see the module doc.
    """

    init: Callable[[int], tuple[Any, Any]]
    apply: Callable[..., tuple[jax.Array, Any, jax.Array]]


# ----------------------------------------------------------------- active masks and task ids
def active_mask(active, num_tasks: int) -> jax.Array:
    """bool [T] from a 0/1 mask ``active`` (None: all True). Traced values are fine."""
    if active is None:
        return jnp.ones((num_tasks,), jnp.bool_)
    active = jnp.asarray(active)
    if active.shape != (num_tasks,):
        raise ValueError(f"active must have shape ({num_tasks},), got {active.shape}")
    return active > 0


def resolve_task_ids(task_ids, num_tasks: int) -> tuple[int, ...]:
    """Validated task ids: ``num_tasks`` distinct ints in [0, 2^32) (default 0..T-1)."""
    if task_ids is None:
        return tuple(range(num_tasks))
    ids = tuple(int(i) for i in task_ids)
    if len(ids) != num_tasks:
        raise ValueError(f"task_ids must have {num_tasks} entries, got {len(ids)}")
    if len(set(ids)) != num_tasks:
        raise ValueError(f"task_ids must be distinct, got {ids}")
    if any(not 0 <= i < 2**32 for i in ids):
        raise ValueError(f"task_ids must lie in [0, 2^32), got {ids}")
    return ids


def task_keys(rng, task_ids: Sequence[int]) -> jax.Array:
    """Per-task keys [T]: ``jax.random.fold_in(rng, task_ids[t])``."""
    ids = jnp.asarray(np.asarray(task_ids, np.uint32))
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(ids)


def _masked_sum(mask, values):
    """sum_t values_t over the active tasks (``where``, so inactive infs/nans do not leak)."""
    return jnp.sum(jnp.where(mask, values, 0.0))


def _stateless(num_tasks):
    del num_tasks
    return {}, {}


# ------------------------------------------------------------------------------- strategies
def _ew(num_tasks, task_ids):
    """Equal weighting: total = sum_t L_t."""
    del task_ids

    def apply(losses, params, state, *, step, rng, active=None):
        mask = active_mask(active, num_tasks)
        w = jnp.where(mask, jnp.ones_like(losses), jnp.zeros_like(losses))
        return _masked_sum(mask, losses), state, w

    return LossWeighting(_stateless, apply)


def _static(num_tasks, task_ids, weights: Sequence[float]):
    """Static weights: total = sum_t w_t L_t with w given as an hparam."""
    del task_ids
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != (num_tasks,):
        raise ValueError(f"static weights must have shape ({num_tasks},), got {weights.shape}")

    def apply(losses, params, state, *, step, rng, active=None):
        mask = active_mask(active, num_tasks)
        w = jnp.where(mask, weights, 0.0)
        safe = jnp.where(mask, losses, 0.0)
        return _masked_sum(mask, w * safe), state, w

    return LossWeighting(_stateless, apply)


def _uw(num_tasks, task_ids):
    """Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), in LibMTL's form.

    Learnable s_t = log sigma_t^2 (params["log_var"], init 0):
      total = sum_t 1/2 exp(-s_t) L_t + 1/2 s_t,   weights w_t = 1/2 exp(-s_t),
    summed over the active tasks (an inactive task's s_t gets gradient 0).
    """
    del task_ids

    def init(num):
        return {"log_var": jnp.zeros(num, jnp.float32)}, {}

    def apply(losses, params, state, *, step, rng, active=None):
        mask = active_mask(active, num_tasks)
        s = params["log_var"]
        w = 0.5 * jnp.exp(-s)
        safe = jnp.where(mask, losses, 0.0)
        total = _masked_sum(mask, w * safe + 0.5 * s)
        return total, state, lax.stop_gradient(jnp.where(mask, w, 0.0))

    return LossWeighting(init, apply)


def _dwa(num_tasks, task_ids, steps_per_epoch: int, temp: float = 2.0):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019).

    With Lbar_t(k) the average training loss of task t over epoch k (epoch = step //
    steps_per_epoch),
      r_t = Lbar_t(k-1) / Lbar_t(k-2),   w = T softmax(r / temp),   total = sum_t sg(w_t) L_t,
    and w = 1 for the first two epochs. A ratio 0 / 0 (a task whose loss is exactly 0) counts as
    1, x / 0 as the largest float32. The state accumulates the running sums of the current
    epoch; when ``step`` enters a new epoch, the finished epoch's average is pushed into a
    two-epoch history (older, newer).

    Per task (so that tasks may be inactive): task t accumulates only while active, and its
    epoch average (over its active steps) is pushed at its first active step of a later epoch.
    T is the number of active tasks and the softmax runs over them; an active task with fewer
    than two finished epochs (e.g. one that just entered training) counts as r_t = 1, and w = 1
    while no active task has two. State: "sums", "count", "task_epoch" (the epoch t is
    accumulating), "history" [2, T], "task_epochs_done" (pushes) per task; "epoch" and
    "epochs_done" (epoch boundaries seen) are global.
    """
    del task_ids
    if steps_per_epoch < 1:
        raise ValueError(f"dwa steps_per_epoch must be >= 1, got {steps_per_epoch}")

    def init(num):
        return {}, {
            "epoch": jnp.zeros((), jnp.int32),
            "epochs_done": jnp.zeros((), jnp.int32),
            "sums": jnp.zeros(num, jnp.float32),
            "count": jnp.zeros(num, jnp.int32),
            "task_epoch": jnp.zeros(num, jnp.int32),
            "history": jnp.ones((2, num), jnp.float32),
            "task_epochs_done": jnp.zeros(num, jnp.int32),
        }

    def apply(losses, params, state, *, step, rng, active=None):
        mask = active_mask(active, num_tasks)
        safe = jnp.where(mask, losses, 0.0)
        epoch = jnp.asarray(step // steps_per_epoch, jnp.int32)
        new_epoch = epoch > state["epoch"]
        task_new = mask & (epoch > state["task_epoch"])
        push = task_new & (state["count"] > 0)
        finished = state["sums"] / jnp.maximum(state["count"], 1)
        history = jnp.where(
            push[None, :], jnp.stack([state["history"][1], finished]), state["history"]
        )
        task_done = state["task_epochs_done"] + push.astype(jnp.int32)
        ready = task_done >= 2
        older, newer = history[0], history[1]
        # 0 / 0 (a task whose loss is exactly 0) counts as no change; x / 0 as the largest
        # finite ratio (softmax subtracts its max, so the weights stay finite)
        big = jnp.finfo(jnp.float32).max
        quotient = jnp.where(
            older > 0, newer / jnp.where(older > 0, older, 1.0), jnp.where(newer > 0, big, 1.0)
        )
        ratio = jnp.where(ready, quotient, 1.0)
        num_active = jnp.sum(mask.astype(jnp.float32))
        w = jnp.where(
            jnp.any(mask & ready),
            num_active * jax.nn.softmax(jnp.minimum(ratio / temp, big), where=mask),
            jnp.ones_like(ratio),
        )
        w = lax.stop_gradient(jnp.where(mask, w, 0.0))
        new_state = {
            "epoch": jnp.maximum(epoch, state["epoch"]),
            "epochs_done": state["epochs_done"] + new_epoch.astype(jnp.int32),
            "sums": jnp.where(
                mask,
                jnp.where(task_new, 0.0, state["sums"]) + lax.stop_gradient(safe),
                state["sums"],
            ),
            "count": jnp.where(mask, jnp.where(task_new, 0, state["count"]) + 1, state["count"]),
            "task_epoch": jnp.where(
                mask, jnp.maximum(epoch, state["task_epoch"]), state["task_epoch"]
            ),
            "history": history,
            "task_epochs_done": task_done,
        }
        return _masked_sum(mask, w * safe), new_state, w

    return LossWeighting(init, apply)


def _rlw(num_tasks, task_ids):
    """Random loss weighting (Lin et al., 2021, "Reasonable effectiveness of random weighting").

    Each step z ~ N(0, I), w = softmax(z) over the active tasks (sums to 1), total = sum_t sg(w_t)
    L_t. z_t is drawn from task t's own key ``fold_in(rng, task_ids[t])``.
    """

    def apply(losses, params, state, *, step, rng, active=None):
        mask = active_mask(active, num_tasks)
        keys = task_keys(rng, task_ids)
        z = jax.vmap(lambda k: jax.random.normal(k, (), jnp.float32))(keys)
        w = lax.stop_gradient(jax.nn.softmax(z, where=mask))
        safe = jnp.where(mask, losses, 0.0)
        return _masked_sum(mask, w * safe), state, w

    return LossWeighting(_stateless, apply)


def _gls(num_tasks, task_ids):
    """Geometric loss strategy (Chennupati et al., CVPRW 2019): total = (prod_t L_t)^(1/T).

    Computed as exp(mean_t log L_t) over the active tasks (losses must be positive; they are
    floored at 1e-30; no active task gives total 0). The reported weights are the effective ones,
    d total / d L_t = total / (T L_t), T the number of active tasks.
    """
    del task_ids

    def apply(losses, params, state, *, step, rng, active=None):
        mask = active_mask(active, num_tasks)
        losses = jnp.maximum(jnp.where(mask, losses, 1.0), 1e-30)
        num_active = jnp.sum(mask.astype(jnp.float32))
        total = jnp.exp(_masked_sum(mask, jnp.log(losses)) / jnp.maximum(num_active, 1.0))
        total = jnp.where(num_active > 0, total, 0.0)
        w = jnp.where(mask, total / (num_active * losses), 0.0)
        return total, state, lax.stop_gradient(w)

    return LossWeighting(_stateless, apply)


_WEIGHTINGS = {
    "ew": _ew,
    "static": _static,
    "uw": _uw,
    "dwa": _dwa,
    "rlw": _rlw,
    "gls": _gls,
}


def get_weighting(name: str, num_tasks: int, *, task_ids=None, **hparams) -> LossWeighting:
    """The loss-weighting strategy called ``name`` (see ``_WEIGHTINGS``) with its hparams.

    ``task_ids``: T distinct ints in [0, 2^32) naming the tasks for per-task randomness
    (default 0..T-1); see the module docstring.
    """
    if name not in _WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {name!r}; allowed: {sorted(_WEIGHTINGS)}")
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    return _WEIGHTINGS[name](num_tasks, resolve_task_ids(task_ids, num_tasks), **hparams)
