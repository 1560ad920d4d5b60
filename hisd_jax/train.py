"""The trainer: `train_and_evaluate(config, workdir) -> results`.

One jitted, buffer-donating train step over a `data`-sharded global batch; the
state is created sharded from the start, checkpointed with Orbax (resumed
automatically), evaluated at every exit, and summarised in `results.json`.

Workdir layout: config.json, metrics.jsonl, tb/ (TensorBoard), checkpoints/,
results.json.
"""

import dataclasses
import json
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging

from hisd_jax import checkpointing, optim, parallel
from hisd_jax import config as config_lib
from hisd_jax import data as data_lib
from hisd_jax import metrics as metrics_lib
from hisd_jax.inference import cost as cost_lib
from hisd_jax.models import build_model, exit_positions
from hisd_jax.mtl import strategy as strategy_lib
from hisd_jax.objectives import build_objective


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: steps taken
    params: Any
    batch_stats: Any  # BatchNorm running statistics ({} without BatchNorm)
    opt_state: Any  # optimizer state of {"model": params, "strategy": strategy_params}
    strategy_params: Any  # learnable MTL strategy parameters (UW's log-variances), else {}
    strategy_state: Any  # MTL strategy state (DWA's losses, GradVac's targets, ...), else {}
    rng: jnp.ndarray  # uint32 key data; step keys are fold_in(rng, step)
    bad_step: jnp.ndarray  # int32: state.step before the first non-finite update, -1 if none


@dataclasses.dataclass
class Experiment:
    """Everything built from a config, shared by training, benchmarks and evaluation."""

    config: Any
    dataset: data_lib.Dataset
    tasks: list
    model: Any
    objective: Any
    strategy: strategy_lib.Strategy
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Any

    @property
    def exit_names(self):
        return self.model.exit_names

    def batch_keys(self, train: bool) -> tuple[str, ...]:
        keys = ("image", "index", *(t.label_key for t in self.tasks))
        return keys if train else (*keys, "mask")


def build_experiment(config) -> Experiment:
    """Validates the config and builds data, model, objective and optimizer (no compile)."""
    config_lib.validate(config)
    dataset = data_lib.get_dataset(config.data.name, seed=config.data.seed, **config.data.kwargs)
    unknown = [t for t in config.data.tasks if t not in dataset.tasks]
    if unknown:
        raise config_lib.ConfigError(
            f"data.tasks={tuple(config.data.tasks)}: {unknown[0]!r} is not one of {', '.join(dataset.tasks)}"
        )
    tasks = [dataset.tasks[t] for t in config.data.tasks]
    model_cfg = config_lib.model_section(config)
    model = build_model(model_cfg, tasks)
    depths = exit_positions(model_cfg)[: model.num_exits]
    try:
        objective = build_objective(
            config.objective, tasks, depths, {t.name: model.exits_of(t.name) for t in tasks}
        )
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
    strategy = build_strategy(config, dataset, tasks)
    schedule = optim.schedule(config.optimizer, config.train.steps)
    tx = optim.build_optimizer(config.optimizer, config.train.steps)
    return Experiment(
        config, dataset, tasks, model, objective, strategy, tx, schedule, parallel.make_mesh()
    )


def build_strategy(config, dataset, tasks) -> strategy_lib.Strategy:
    """The MTL strategy of `config.mtl` (EW for a single task reduces to the plain loss)."""
    hparams = config.mtl.hparams.to_dict()
    if config.mtl.method == "dwa" and "steps_per_epoch" not in hparams:
        hparams["steps_per_epoch"] = -(-len(dataset.splits["train"]) // config.train.batch_size)
    try:
        return strategy_lib.build_strategy(
            config.mtl.method,
            [t.name for t in tasks],
            space=config.mtl.space,
            backward=config.mtl.backward,
            **hparams,
        )
    except (TypeError, ValueError) as e:
        raise config_lib.ConfigError(f"mtl: {e}") from e


def init_state(exp: Experiment) -> TrainState:
    """Creates the train state directly with replicated shardings (no host copy)."""
    shape = (1, *exp.dataset.image_shape)

    def init(seed):
        key = jax.random.key(seed)
        variables = exp.model.init(key, jnp.zeros(shape, jnp.float32))
        params = variables["params"]
        strategy_params, strategy_state = exp.strategy.init()
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=exp.tx.init({"model": params, "strategy": strategy_params}),
            strategy_params=strategy_params,
            strategy_state=strategy_state,
            rng=jax.random.key_data(jax.random.fold_in(key, 1)),
            bad_step=jnp.full((), -1, jnp.int32),
        )

    replicated = parallel.replicated(exp.mesh)
    abstract = jax.eval_shape(init, exp.config.seed)
    shardings = jax.tree.map(lambda _: replicated, abstract)
    return jax.jit(init, static_argnums=0, out_shardings=shardings)(exp.config.seed)


def make_train_step(exp: Experiment):
    """Returns the jitted step (state, metric_sums, batch) -> (state, metric_sums).

    The metric sums accumulate on device between log steps, so the hot loop never
    waits for the host. A non-finite loss, gradient or new parameter leaves the state
    unchanged and records the step in `bad_step`; the loop stops at its next check.
    """
    total = exp.config.train.steps
    objective, model, tx = exp.objective, exp.model, exp.tx

    def step_fn(state: TrainState, sums: dict, batch: dict):
        progress = state.step.astype(jnp.float32) / total

        def trunk(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            reps, updates = model.apply(
                variables, batch["image"], train=True, method=model.trunk, mutable=["batch_stats"]
            )
            return reps, updates.get("batch_stats", {})

        def heads(params, reps):
            return model.apply(
                {"params": params},
                reps,
                project=objective.needs_projection,
                method=model.apply_heads,
            )

        loss, (grads, strategy_grads), strategy_state, metrics, batch_stats = (
            strategy_lib.value_and_grad(
                exp.strategy,
                trunk=trunk,
                heads=heads,
                task_losses=lambda outputs: objective.task_losses(outputs, batch, progress),
                params=state.params,
                strategy_params=state.strategy_params,
                strategy_state=state.strategy_state,
                step=state.step,
                rng=jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step),
            )
        )
        trainable = {"model": state.params, "strategy": state.strategy_params}
        updates, opt_state = tx.update(
            {"model": grads, "strategy": strategy_grads}, state.opt_state, trainable
        )
        new = optax.apply_updates(trainable, updates)
        params, updates = new["model"], updates["model"]
        grad_norm = optax.global_norm(grads)
        # Finite loss and gradient can still overflow the parameters (huge lr): check them too.
        new_finite = jax.tree.reduce(
            lambda a, x: a & jnp.all(jnp.isfinite(x)), new, jnp.array(True)
        )
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
            "loss": loss,
            "grad_norm": grad_norm,
            "param_norm": optax.global_norm(params),
            "update_norm": optax.global_norm(updates),
            "lr": exp.schedule(state.step),
            **metrics,
        }
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        # `sums` is {} only when jax.eval_shape asks for the metrics' structure.
        return new_state, (jax.tree.map(jnp.add, sums, metrics) if sums else metrics)

    replicated = parallel.replicated(exp.mesh)
    data = parallel.batch_sharded(exp.mesh)
    return jax.jit(
        step_fn,
        in_shardings=(replicated, replicated, data),
        out_shardings=(replicated, replicated),
        donate_argnums=(0, 1),
    )


def metric_sums_zeros_fn(exp: Experiment, train_step, state, batch):
    """A jitted () -> zeros shaped like the step's metrics, replicated like its outputs.

    Matching the output sharding matters: uncommitted inputs would make the second
    call of the step compile again. Build it once and call it after every log step.
    """
    shapes = jax.eval_shape(train_step, state, {}, batch)[1]
    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
    return jax.jit(zeros, out_shardings=parallel.replicated(exp.mesh))


def zero_metric_sums(exp: Experiment, train_step, state, batch) -> dict:
    """Zero metric sums for `train_step` (see `metric_sums_zeros_fn`)."""
    return metric_sums_zeros_fn(exp, train_step, state, batch)()


def make_eval_step(exp: Experiment):
    """Jitted (params, batch_stats, batch) -> {task: {exit: sums}} for one batch."""

    def eval_fn(params, batch_stats, batch):
        outputs = exp.model.apply({"params": params, "batch_stats": batch_stats}, batch["image"])
        result = {}
        for task in exp.tasks:
            labels, mask = batch[task.label_key], batch["mask"]
            per_exit = {}
            names = [exp.exit_names[e] for e in exp.model.exits_of(task.name)]
            for name, z in zip(names, outputs["logits"][task.name], strict=True):
                if task.kind == "classification":
                    per_exit[name] = metrics_lib.classification_sums(z, labels, mask)
                else:
                    per_exit[name] = metrics_lib.regression_sums(z, labels, mask)
            result[task.name] = per_exit
        return result

    replicated = parallel.replicated(exp.mesh)
    return jax.jit(
        eval_fn,
        in_shardings=(replicated, replicated, parallel.batch_sharded(exp.mesh)),
        out_shardings=replicated,
    )


def evaluate(exp: Experiment, state: TrainState, split: str, eval_step=None) -> dict:
    """Metrics for every task and exit on a whole split; each example counts once."""
    eval_step = eval_step or make_eval_step(exp)
    sharding = parallel.batch_sharded(exp.mesh)
    keys = exp.batch_keys(train=False)
    totals = None
    for local in data_lib.eval_batches(
        exp.dataset.splits[split],
        exp.config.train.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        batch = parallel.global_batch({k: local[k] for k in keys}, sharding)
        sums = eval_step(state.params, state.batch_stats, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return {
        task: {name: metrics_lib.finalize_sums(s) for name, s in per_exit.items()}
        for task, per_exit in jax.device_get(totals).items()
    }


def exit_table(exp: Experiment, state: TrainState) -> dict:
    """Per exit: FLOPs (standalone cut model), fraction of the full model, parameters, depth."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    costs = cost_lib.exit_costs(cost_lib.piece_flops(exp.model, variables, exp.dataset.image_shape))
    params = cost_lib.exit_param_counts(jax.device_get(state.params), exp.model.num_exits)
    depths = exit_positions(config_lib.model_section(exp.config))
    return {
        name: {
            "flops": float(costs["standalone"][e]),
            "fraction": float(costs["fraction"][e]),
            "cascade_flops": float(costs["cascade"][e]),
            "params": params[e],
            "depth": depths[e],
        }
        for e, name in enumerate(exp.exit_names)
    }


def _flat(split_metrics: dict) -> dict:
    return {
        f"{task}/{exit_name}/{k}": v
        for task, per_exit in split_metrics.items()
        for exit_name, m in per_exit.items()
        for k, v in m.items()
    }


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps (save, then stop).

    With several processes the flag is left to JAX: each process sees the signal between
    different steps, and stopping where each saw it deadlocks the job (one process saving,
    another in the next step's collectives). jax.distributed.initialize attaches its
    preemption sync manager to SIGTERM; it picks one step for all processes, reported by
    `Checkpointer.reached_preemption(step)`, which the loop asks at every step.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() > 1:  # keep JAX's synchronised SIGTERM handling
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *_):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _check_workdir_config(workdir: str, config) -> None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        stored = json.load(f)
    current = json.loads(config.to_json_best_effort())
    changed = [f for f in config_lib.diff(stored, current) if f not in config_lib.RESUMABLE_CHANGES]
    if changed:
        raise config_lib.ConfigError(
            f"workdir {workdir} holds a run with a different config (changed: {', '.join(changed)}); "
            "use a new --workdir or the same config to resume"
        )


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (resuming from the workdir's latest checkpoint), evaluates, returns results."""
    exp = build_experiment(config)
    _check_workdir_config(workdir, config)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    cfg = config.train
    total = cfg.steps
    state = init_state(exp)
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), every=cfg.checkpoint_every, keep=cfg.keep_checkpoints
    )
    iterator = data_lib.BatchIterator(
        exp.dataset.splits["train"],
        cfg.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if ckpt.latest_step() is not None:
        shardings = jax.tree.map(lambda x: x.sharding, state)
        state, data_state, _ = ckpt.restore(checkpointing.abstract_like(state, shardings))
        iterator.set_state(data_state)
        logging.info("Resumed from step %d in %s", int(state.step), workdir)
    start = int(state.step)

    writer = metrics_lib.MetricWriter(workdir)
    train_step = make_train_step(exp)
    eval_step = make_eval_step(exp)
    sharding = parallel.batch_sharded(exp.mesh)
    keys = exp.batch_keys(train=True)
    progress = metrics_lib.Progress(total, start, enabled=cfg.progress)

    def check_finite(step):
        bad = int(state.bad_step)
        if bad >= 0:
            ckpt.wait()
            last = ckpt.latest_step()
            raise FloatingPointError(
                f"non-finite loss, gradient or parameters at step {bad + 1} (stopped at step "
                f"{step}); the last good checkpoint (step {last}) is kept in {workdir}/checkpoints. "
                "Lower optimizer.lr, set optimizer.grad_clip, or check the data."
            )

    t_start, sums, n_sums, zeros_fn = time.perf_counter(), None, 0, None
    with _Preemption() as preemption:
        for step in range(start + 1, total + 1):
            local = next(iterator)
            batch = parallel.global_batch({k: local[k] for k in keys}, sharding)
            if sums is None:
                zeros_fn = zeros_fn or metric_sums_zeros_fn(exp, train_step, state, batch)
                sums = zeros_fn()
            state, sums = train_step(state, sums, batch)
            n_sums += 1
            if step % cfg.log_every == 0 or step == total:
                check_finite(step)
                mean = {k: float(v) / n_sums for k, v in jax.device_get(sums).items()}
                writer.write(step, "train", mean)
                progress.update(step, mean["loss"])
                sums, n_sums = None, 0
            if cfg.eval_every and step % cfg.eval_every == 0 and step != total:
                writer.write(step, "val", _flat(evaluate(exp, state, "val", eval_step)))
            preempted = preemption.requested or ckpt.reached_preemption(step)
            if ckpt.should_save(step) or step == total or preempted:
                check_finite(step)
                ckpt.save(step, state, iterator.get_state(), force=True)
            if preempted:
                ckpt.wait()
                logging.warning("Preempted at step %d; checkpoint saved, rerun to resume.", step)
                raise SystemExit(143)
    progress.close()
    train_time = time.perf_counter() - t_start
    ckpt.wait()
    iterator.close()

    results = {
        "name": config.name,
        "val": evaluate(exp, state, "val", eval_step),
        "test": evaluate(exp, state, "test", eval_step),
        "exits": exit_table(exp, state),
        "train": {
            "steps": total,
            "resumed_from": start,
            "wall_time_s": train_time,
            "steps_per_s": (total - start) / train_time if total > start else None,
        },
    }
    writer.write(total, "val", _flat(results["val"]))
    writer.write(total, "test", _flat(results["test"]))
    writer.close()
    if is_main:
        tmp = os.path.join(workdir, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2, default=float)
        os.replace(tmp, os.path.join(workdir, "results.json"))
    ckpt.close()
    return results
