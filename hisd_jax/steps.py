"""Pure pieces the training programs compose, and the jitted steps built from them.

  LossContext            what a loss needs besides parameters and batch: training progress,
                         the per-task active mask, per-task soft targets and their weight
  forward(...)           the trunk / heads closures of one batch (the MTL strategies split the
                         forward pass at the shared representation)
  loss_fn(...)           (params, batch_stats, batch, ctx) -> (loss [T], (metrics, batch_stats))
  grads(...)             the MTL strategy's combined gradient of one batch
  apply_update(...)      optimizer + strategy parameters + non-finite guard -> new TrainState
  train_step(...)        grads + apply_update: one update on one batch (a pure function)
  make_train_step(exp)   the standard program's jitted step (state, sums, batch)
  jit_unit(...)          jit a unit of work (state, sums, *args) with the loop's shardings and
                         donated state and metric sums
  make_eval_step / evaluate      metrics of every (task, exit) over a split (additive sums, or
                         a metric of the whole split's predictions: retrieval MRR)
  make_predict_step / predict    per-example outputs of every (task, exit), by `position`

Every function here is pure (or builds a jitted pure function); the loop (loop.py) and the
programs (programs/) own the host-side control flow.
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hisd_jax import data as data_lib
from hisd_jax import parallel
from hisd_jax.experiment import Experiment, TrainState
from hisd_jax.metrics import finalize_sums
from hisd_jax.mtl import strategy as strategy_lib


@flax.struct.dataclass
class LossContext:
    """What the objective reads besides parameters and batch (a pytree: traced, no recompile).

    progress: float32 scalar in [0, 1], training progress (the SDN weight ramp).
    active: float32 [T], 1 for a task that trains, 0 for an inactive one (no loss, no gradient,
      no strategy weight).
    soft_weight: float32 [T], per task the weight m of the soft-target loss:
      (1 - m) * loss(labels) + m * loss(soft targets); 0 = labels only.
    soft_targets: {task: [B, C] probabilities (classification) or [B] predictions
      (regression)} for the tasks that have soft targets in this batch; a task absent here
      trains on its labels whatever its soft_weight.
    example_weights: {task: [B] float32 >= 0}: per-example weights of a task's loss terms (a
      self-normalised weighted mean over the batch, times the padding mask); a task absent
      here weighs its examples equally (importance weighting, programs/diw.py).
    """

    progress: jax.Array
    active: jax.Array
    soft_weight: jax.Array
    soft_targets: dict
    example_weights: dict = flax.struct.field(default_factory=dict)

    @classmethod
    def hard(cls, progress, num_tasks: int, active=None) -> LossContext:
        """Labels only; every task active unless `active` says otherwise."""
        return cls(
            progress=jnp.asarray(progress, jnp.float32),
            active=jnp.ones(num_tasks, jnp.float32) if active is None else active,
            soft_weight=jnp.zeros(num_tasks, jnp.float32),
            soft_targets={},
        )


def progress(exp: Experiment, step) -> jax.Array:
    """Training progress step / train.steps as float32 (may be traced)."""
    return jnp.asarray(step, jnp.float32) / exp.config.train.steps


def forward(exp: Experiment, batch_stats, batch: dict) -> tuple[Callable, Callable]:
    """(trunk, heads) of one training batch.

    trunk: params -> (every segment's output, new batch_stats); heads: (params, reps) ->
    model outputs (logits per task and exit, features, projections when the objective needs
    them).
    """
    model, objective = exp.model, exp.objective

    def trunk(params):
        variables = {"params": params, "batch_stats": batch_stats}
        reps, updates = model.apply(
            variables,
            batch[exp.dataset.input_key],
            train=True,
            method=model.trunk,
            mutable=["batch_stats"],
        )
        return reps, updates.get("batch_stats", {})

    def heads(params, reps):
        return model.apply(
            {"params": params},
            reps,
            project=objective.needs_projection,
            method=model.apply_heads,
        )

    return trunk, heads


def loss_fn(exp: Experiment, params, batch_stats, batch: dict, ctx: LossContext):
    """(loss [T] in task order, (metrics, new batch_stats)); inactive tasks' entries are 0."""
    trunk, heads = forward(exp, batch_stats, batch)
    reps, new_batch_stats = trunk(params)
    losses, metrics = exp.objective.task_losses(heads(params, reps), batch, ctx)
    vec = jnp.stack([losses[t] for t in exp.task_names])
    return jnp.where(ctx.active > 0, vec, 0.0), (metrics, new_batch_stats)


def grads(exp: Experiment, state: TrainState, batch: dict, ctx: LossContext):
    """The MTL strategy's combined gradient of one batch.

    Returns (loss, (param grads, strategy-param grads), new strategy state, metrics,
    new batch_stats); per-task randomness comes from fold_in(state.rng, state.step).
    """
    trunk, heads = forward(exp, state.batch_stats, batch)
    return strategy_lib.value_and_grad(
        exp.strategy,
        trunk=trunk,
        heads=heads,
        task_losses=lambda outputs: exp.objective.task_losses(outputs, batch, ctx),
        params=state.params,
        param_labels=exp.param_labels,
        strategy_params=state.strategy_params,
        strategy_state=state.strategy_state,
        step=state.step,
        rng=jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step),
        active=ctx.active,
    )


def apply_update(
    exp: Experiment, state: TrainState, loss, grads_, strategy_state, batch_stats
) -> tuple[TrainState, dict]:
    """Optimizer step on the model and strategy parameters, guarded against non-finite values.

    A non-finite loss, gradient or new parameter leaves the state unchanged (except `step`)
    and records the step in `bad_step` (the loop stops at its next check). Returns the new
    state and the update's metrics (grad/param/update norms, learning rate).
    """
    model_grads, strategy_grads = grads_
    trainable = {"model": state.params, "strategy": state.strategy_params}
    updates, opt_state = exp.tx.update(
        {"model": model_grads, "strategy": strategy_grads}, state.opt_state, trainable
    )
    new = optax.apply_updates(trainable, updates)
    params, updates = new["model"], updates["model"]
    grad_norm = optax.tree.norm(model_grads)
    # Finite loss and gradient can still overflow the parameters (huge lr): check them too.
    new_finite = jax.tree.reduce(lambda a, x: a & jnp.all(jnp.isfinite(x)), new, jnp.array(True))
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & new_finite & (state.bad_step < 0)

    def keep(new, old):
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        strategy_params=keep(new["strategy"], state.strategy_params),
        strategy_state=keep(strategy_state, state.strategy_state),
        bad_step=jnp.where(ok | (state.bad_step >= 0), state.bad_step, state.step),
    )
    metrics = {
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(params),
        "update_norm": optax.tree.norm(updates),
        "lr": exp.schedule(state.step),
    }
    return new_state, metrics


def train_step(exp: Experiment, state: TrainState, batch: dict, ctx: LossContext):
    """One update on one batch: (new state, flat float32 metrics)."""
    loss, grads_, strategy_state, metrics, batch_stats = grads(exp, state, batch, ctx)
    new_state, update_metrics = apply_update(exp, state, loss, grads_, strategy_state, batch_stats)
    metrics = {"loss": loss, **update_metrics, **metrics}
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def standard_step_fn(exp: Experiment):
    """The standard unit of work: one update on one batch, labels only, every task active.

    A pure `(state, sums, batch) -> (state, sums)` (named `step_fn` in compile logs)."""

    def step_fn(state, sums, batch):
        ctx = LossContext.hard(progress(exp, state.step), len(exp.tasks))
        state, metrics = train_step(exp, state, batch, ctx)
        return state, accumulate(sums, metrics)

    return step_fn


def make_train_step(exp: Experiment):
    """The standard step jitted as the loop runs it: (state, sums, batch) -> (state, sums)."""
    return jit_unit(exp, standard_step_fn(exp))


def accumulate(sums: dict, metrics: dict) -> dict:
    """sums + metrics ({} sums: the metrics themselves, as when eval_shape asks for structure)."""
    return jax.tree.map(jnp.add, sums, metrics) if sums else metrics


def jit_unit(exp: Experiment, fn: Callable, num_batches: int = 1):
    """jit `fn(state, sums, *batches) -> (state, sums)` as the loop runs it: the state in its
    shardings (`Experiment.state_shardings`) and the metric sums replicated, both donated;
    each batch sharded over the mesh's devices."""
    replicated = parallel.replicated(exp.mesh)
    data = parallel.batch_sharded(exp.mesh)
    state = exp.state_shardings
    return jax.jit(
        fn,
        in_shardings=(state, replicated, *([data] * num_batches)),
        out_shardings=(state, replicated),
        donate_argnums=(0, 1),
    )


def metric_sums_zeros_fn(exp: Experiment, unit, state, *batches):
    """A jitted () -> zeros shaped like the unit's metrics, replicated like its outputs.

    Matching the output sharding matters: uncommitted inputs would make the second
    call of the unit compile again. Build it once and call it after every log step.
    """
    shapes = jax.eval_shape(unit, state, {}, *batches)[1]
    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
    return jax.jit(zeros, out_shardings=parallel.replicated(exp.mesh))


def zero_metric_sums(exp: Experiment, unit, state, *batches) -> dict:
    """Zero metric sums for `unit` (see `metric_sums_zeros_fn`)."""
    return metric_sums_zeros_fn(exp, unit, state, *batches)()


# --------------------------------------------------------------------------- evaluation
def _jit_inference(exp: Experiment, fn: Callable):
    """jit `fn(params, batch_stats, batch)`: the variables as they are placed (the state's
    shardings, replicated or FSDP), the batch sharded over the devices, the output replicated
    (every process holds all of it)."""
    return jax.jit(fn, out_shardings=parallel.replicated(exp.mesh))


def make_eval_step(exp: Experiment):
    """Jitted (params, batch_stats, batch) -> {"sums": {task: {exit: sums}}, "rows": {task:
    [B, E_t, ...] predictions}, "position": [B], "mask": [B]} for one batch: additive sums for
    the tasks whose kind has `eval_sums`, per-example predictions for those whose metric needs
    the whole split (`TaskKind.split_metrics`: retrieval)."""

    def eval_fn(params, batch_stats, batch):
        x = batch[exp.dataset.input_key]
        outputs = exp.model.apply({"params": params, "batch_stats": batch_stats}, x)
        sums, rows = {}, {}
        for task in exp.tasks:
            kind, per_exit = task.task_kind, outputs["logits"][task.name]
            if kind.split_metrics is not None:
                rows[task.name] = jnp.stack([kind.predict(z, 1.0) for z in per_exit], axis=1)
                continue
            names = [exp.exit_names[e] for e in task.exits]
            sums[task.name] = {
                name: kind.eval_sums(z, batch[task.label_key], batch["mask"])
                for name, z in zip(names, per_exit, strict=True)
            }
        return {"sums": sums, "rows": rows, "position": batch["position"], "mask": batch["mask"]}

    return _jit_inference(exp, eval_fn)


def global_batches(exp: Experiment, split: str, batch_size: int | None = None, keys=None):
    """Each example of `split` once, as global batches sharded on the mesh (padded, `mask`)."""
    sharding = parallel.batch_sharded(exp.mesh)
    keys = keys or exp.batch_keys(train=False)
    for local in data_lib.eval_batches(
        exp.dataset.splits[split],
        batch_size or exp.config.train.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        yield parallel.global_batch({k: local[k] for k in keys}, sharding)


def evaluate(exp: Experiment, state: TrainState, split: str, eval_step=None) -> dict:
    """{task: {exit: metrics}} on a whole split; each example counts once."""
    eval_step = eval_step or make_eval_step(exp)
    # Summed on the host: every batch's sums are replicated (each process holds them), and an
    # eager jnp.add of global arrays is one more multi-process computation per batch, which
    # deadlocked gloo jobs under load (the stacks of both processes stopped in it).
    per_batch = jax.device_get(
        [eval_step(state.params, state.batch_stats, b) for b in global_batches(exp, split)]
    )
    totals = jax.tree.map(lambda *xs: np.sum(np.stack(xs), axis=0), *[b["sums"] for b in per_batch])
    result = {
        task: {name: finalize_sums(s) for name, s in per_exit.items()}
        for task, per_exit in totals.items()
    }
    if per_batch and per_batch[0]["rows"]:
        n = len(exp.dataset.splits[split])
        for task in exp.tasks:
            if task.name not in per_batch[0]["rows"]:
                continue
            rows = _by_position([(b["rows"][task.name], b) for b in per_batch], n, split)
            names = [exp.exit_names[e] for e in task.exits]
            result[task.name] = task.task_kind.split_metrics(rows, names)
    return {t: result[t] for t in exp.task_names}


def _by_position(batches, n: int, split: str) -> np.ndarray:
    """Rows [n, ...] from (rows [B, ...], batch with "position" and "mask") pairs: row i is the
    example at position i; RuntimeError if a position is missed."""
    out, seen = None, np.zeros(n, bool)
    for rows, batch in batches:
        real = batch["mask"] > 0
        positions = batch["position"][real]
        if out is None:
            out = np.zeros((n, *rows.shape[1:]), rows.dtype)
        out[positions] = rows[real]
        seen[positions] = True
    if not seen.all():
        raise RuntimeError(f"a pass over {split!r} missed {int((~seen).sum())} positions")
    return out


def make_predict_step(exp: Experiment, temperature: float = 1.0):
    """Jitted (params, batch_stats, batch) -> {"position": [B], "mask": [B], task: [B, E_t, ...]}.

    Per example and exit of each task, the task kind's prediction (`kinds.py`): class
    probabilities softmax(z / temperature) or the regression output. Replicated output, so
    every process holds the whole global batch.
    """

    def predict_fn(params, batch_stats, batch):
        x = batch[exp.dataset.input_key]
        outputs = exp.model.apply({"params": params, "batch_stats": batch_stats}, x)
        out = {"position": batch["position"], "mask": batch["mask"]}
        for task in exp.tasks:
            per_exit = [
                task.task_kind.predict(z, temperature) for z in outputs["logits"][task.name]
            ]
            out[task.name] = jnp.stack(per_exit, axis=1)
        return out

    return _jit_inference(exp, predict_fn)


def predict(exp: Experiment, params, batch_stats, split: str, predict_step=None) -> dict:
    """{task: np.ndarray [N, E_t, ...]} over a whole split, row i = the example at position i.

    Every process ends with every row (the outputs are replicated; host memory is
    N x sum_t E_t x C_t x 4 bytes).
    """
    predict_step = predict_step or make_predict_step(exp)
    n = len(exp.dataset.splits[split])
    per_batch = [
        jax.device_get(predict_step(params, batch_stats, b)) for b in global_batches(exp, split)
    ]
    return {
        task: _by_position([(b[task], b) for b in per_batch], n, split) for task in exp.task_names
    }
