"""αVIL: auxiliary-task weights from single-task parameter deltas (pure pieces).

Kourdis, Gordon-Hall & Gorinski, "αVIL: Learning to Leverage Auxiliary Tasks for Multitask
Learning", arXiv 2405.07769 (Algorithm 1). One target task, the others auxiliary; task weights
w_t = 1 at the start. Each epoch:

  1. for every task t, from the current θ, a few optimizer steps on w_t · L_t alone:
     δ_t = θ_t − θ                                            (`single_task_deltas`)
  2. α (one per task, from 1) fitted by gradient steps of jax.grad with respect to α of the
     target's dev loss at θ + Σ_t α_t δ_t                     (`fit_alpha`)
  3. θ ← θ + Σ_t α_t δ_t (`merge`), w_t ← w_t + (α_t − 1)     (`update_weights`)

Variables are flax variable dicts {"params", "batch_stats"}. BatchNorm running statistics are
handled per task like parameters: each task's inner run updates its own copy from θ's, and
they are merged with the same α, normalised to a convex combination (bs ← bs + Σ_t c_t
(bs_t − bs), c ∝ max(α, 0); see `merge`), so the dev loss of step 2, evaluated with running
statistics, sees the statistics the merged parameters will have.

Task losses are given as `task_loss(params, batch_stats, batch, t) -> (loss, new_batch_stats)`
for a task index t (an int32 scalar, traced under vmap), so these functions know nothing of the
model or the objective; `programs/alphavil.py` builds them from `steps.loss_fn`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

TASK_BATCHING = ("vmap", "loop", "scan")


def inner_train(
    task_loss: Callable,
    tx: optax.GradientTransformation,
    variables,
    opt_state,
    batches,
    task,
    weight,
    unroll: bool | int = True,
):
    """Steps of `tx` on `weight * task_loss(..., task)` over `batches` (leading axis = steps).

    Returns (variables after the last step, the optimizer state, losses [K] before each step).
    `unroll` goes to `lax.scan`: unrolled by default, because XLA:CPU runs convolutions inside
    a while loop ~15x slower than the same convolutions unrolled (measured on the MultiDigits
    ResNet: 4 steps 4.05 s in a loop, 0.068 s for one step); larger K may want an integer.
    """

    def step(carry, batch):
        params, batch_stats, opt = carry

        def objective(p):
            loss, new_bs = task_loss(p, batch_stats, batch, task)
            return weight * loss, (loss, new_bs)

        (_, (loss, new_bs)), g = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, updates), new_bs, opt), loss

    init = (variables["params"], variables["batch_stats"], opt_state)
    (params, batch_stats, opt_state), losses = jax.lax.scan(step, init, batches, unroll=unroll)
    return {"params": params, "batch_stats": batch_stats}, opt_state, losses


def single_task_deltas(
    task_loss: Callable,
    tx: optax.GradientTransformation,
    variables,
    opt_states,
    batches,
    weights,
    task_batching: str = "vmap",
):
    """Step 1 for every task at once.

    Args:
      task_loss: (params, batch_stats, batch, t) -> (loss, new batch_stats).
      tx: the inner optimizer.
      variables: θ, {"params", "batch_stats"}.
      opt_states: the inner optimizer state of every task (leading axis T on every leaf:
        `jax.vmap(tx.init)` of stacked params for fresh states).
      batches: the batches of every inner step (leading axis K); every task trains on the
        same batches (each example carries every task's label) with its own loss.
      weights: float32 [T], w_t.
      task_batching: "vmap" (all tasks in one batched program: T copies of the parameters and
        optimizer state live at once), "loop" (the tasks one after the other, unrolled in the
        program) or "scan" (one after the other in a `lax.map` loop: one copy at a time, but
        XLA:CPU runs convolutions in loops slowly); the same deltas.

    Returns:
      (deltas: variables-shaped with a leading T axis, θ_t − θ; opt_states [T, ...];
       losses [T, K]).
    """
    if task_batching not in TASK_BATCHING:
        raise ValueError(f"task_batching={task_batching!r} is not one of {TASK_BATCHING}")

    def one(t, opt_state, w):
        out, opt_state, losses = inner_train(task_loss, tx, variables, opt_state, batches, t, w)
        return jax.tree.map(jnp.subtract, out, variables), opt_state, losses

    tasks = jnp.arange(weights.shape[0], dtype=jnp.int32)
    if task_batching == "vmap":
        return jax.vmap(one)(tasks, opt_states, weights)
    if task_batching == "loop":
        outs = [
            one(tasks[t], jax.tree.map(lambda x, t=t: x[t], opt_states), weights[t])
            for t in range(weights.shape[0])
        ]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return jax.lax.map(lambda args: one(*args), (tasks, opt_states, weights))


def _is_statistic(path) -> bool:
    """A BatchNorm running statistic: a leaf of flax's `batch_stats` collection."""
    return "batch_stats" in [getattr(k, "key", None) for k in path]


def merge(variables, deltas, alpha):
    """Step 3's θ + Σ_t α_t δ_t on every parameter (floating leaves of `params`).

    BatchNorm running statistics (means and variances, `batch_stats`) are estimates, not
    displacements: every task's inner run moves them towards the statistics of the same
    batches, so Σ_t δ_t would count that move T times (and drive variances negative). They
    are merged as a convex combination of the tasks' statistics, s + Σ_t c_t δ_t with
    c = max(α, 0) / Σ_t max(α_t, 0) (s unchanged if no α is positive): equal α give the mean
    of the tasks' statistics, a task with α_t <= 0 contributes none, and a variance stays
    positive by construction. Shapes: `deltas` has a leading task axis T on every leaf,
    `alpha` is float32 [T].
    """
    positive = jnp.maximum(alpha, 0.0)
    total = jnp.sum(positive)
    convex = jnp.where(total > 0, positive / jnp.where(total > 0, total, 1.0), 0.0)

    def combine(path, x, d):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        a = (convex if _is_statistic(path) else alpha).astype(d.dtype)
        return x + jnp.tensordot(a, d, axes=1).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(combine, variables, deltas)


def fit_alpha(
    dev_loss: Callable, tx: optax.GradientTransformation, variables, deltas, alpha, dev_batches
):
    """Step 2: one step of `tx` on α per dev batch (leading axis = steps) of
    jax.grad_α dev_loss(merge(variables, deltas, α), batch).

    Returns (α after the last step, dev losses [K_α] before each step).
    """

    def objective(a, batch):
        return dev_loss(merge(variables, deltas, a), batch)

    def step(carry, batch):
        a, opt = carry
        loss, g = jax.value_and_grad(objective)(a, batch)
        updates, opt = tx.update(g, opt, a)
        return (optax.apply_updates(a, updates), opt), loss

    # Unrolled, like `inner_train`'s steps (a handful of α steps).
    (alpha, _), losses = jax.lax.scan(step, (alpha, tx.init(alpha)), dev_batches, unroll=True)
    return alpha, losses


def update_weights(weights, alpha, clamp: tuple[float, float] | None = None):
    """Step 3's weights: w_t + (α_t − 1), clipped to `clamp` = (low, high) if given."""
    new = weights + (alpha - 1.0)
    return new if clamp is None else jnp.clip(new, clamp[0], clamp[1])
