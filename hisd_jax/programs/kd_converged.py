"""KD from converged tasks (Lu et al., NAACL 2022 industry track): `kd_joint`, `kd_sequential`.

Every `train.eval_every` steps the loop validates; `after_eval` then, per active task not yet
converged, compares its judging metric (the first of `TaskSpec.metrics`, at its deepest exit,
direction from the spec) with its best so far (`mtl/converged_kd.py`):
  * improved by more than `program.min_delta`: the current parameters become the task's best
    (a device copy in the program state);
  * `program.patience` validations without improvement: the task has converged. One jitted,
    sharded pass of its best parameters over the whole training split (`steps.predict`, the
    task's deepest exit = the teacher) gives its soft labels, stored by `position`
    (probabilities at `program.temperature`, optionally top-k and float16/bfloat16; a
    regression task stores the teacher's prediction). From then on the task's loss, at every
    one of its exits, is the loss against the soft labels, mixed with the hard-label loss by
    `program.hard_weight` (default 0); training continues from the current parameters.
The switch is a traced per-task weight, so nothing recompiles.

  kd_joint        every task trains from the start
  kd_sequential   tasks enter one at a time in `program.order` (default `data.tasks`); the next
                  enters when the current one converges; converged tasks keep training on soft
                  labels (an inactive task: no loss, no gradient, no strategy weight)

Training stops when every task has converged (or at `train.steps`). The reported parameters
are the final ones; `results["kd"]` also gives, labelled as a selection on validation, each
task's test metrics at its own best parameters (the "one early-stopped model per task" bound).

State (`TrainState.program`): the tracker, the active mask and the per-task soft-label weight
(in every rolling checkpoint), the soft-label tables ([N_train, C] per task, or top-k values and
indices; every device of every process holds every row: N x bytes-per-example per task, see
`results["kd"]["bytes_per_example"]`) and each task's best parameters and BatchNorm statistics
(T copies of the model). The last two are Orbax items of their own, outside the rolling
checkpoints (`checkpointing.ItemStore`, written before the checkpoint that refers to them):
  <workdir>/kd/soft_labels/<task>/<converged step>/   written once, when the task converges
  <workdir>/kd/best_params/<task>/<best step>/        the versions the retained checkpoints
                                                      refer to (train.keep_checkpoints + 1)
A resume restores the tracker from the checkpoint and then exactly the versions it names.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from hisd_jax import checkpointing, parallel, steps
from hisd_jax.errors import ConfigError
from hisd_jax.mtl import converged_kd as kd
from hisd_jax.programs.base import Program


class KDJointProgram(Program):
    """KD from converged tasks, every task from the start (see the module docstring)."""

    name = "kd_joint"
    sequential = False

    @staticmethod
    def check_fields(program_cfg) -> None:
        _check_fields(program_cfg)

    def __init__(self, exp):
        super().__init__(exp)
        self.cfg = _checked_config(exp, sequential=self.sequential)
        names = exp.task_names
        self.order = tuple(self.cfg.order) or names
        self.rank = np.array([self.order.index(t) for t in names])  # entry rank per task
        self._predict = self._copy = self._eval_step = None
        self.label_seconds = {}  # wall time of each labelling pass in this process (host side)
        self._on_disk = {}  # (item, task) -> the step of the version this run wrote or restored

    # ------------------------------------------------------------------ state
    def init_state(self, variables):
        exp = self.exp
        num = len(exp.tasks)
        n_train = len(exp.dataset.splits["train"])
        tables = {}
        for task in exp.tasks:  # zeros shaped like the table the task's kind makes
            kind, c = task.task_kind, max(task.num_classes, 1)
            row = kind.soft_table(
                np.full((1, c), 1.0 / c, np.float32) if kind.has_confidence else np.zeros(1),
                task.num_classes,
                self.cfg.top_k,
                self.cfg.label_dtype,
            )
            tables[task.name] = {
                k: jnp.zeros((n_train, *v.shape[1:]), v.dtype) for k, v in row.items()
            }
        active = np.ones(num, np.float32) if not self.sequential else (self.rank == 0)
        return {
            "tracker": {k: jnp.asarray(v) for k, v in kd.init_tracker(num).items()},
            "active": jnp.asarray(active, jnp.float32),
            "soft_weight": jnp.zeros(num, jnp.float32),
            "soft": tables,
            # Filled at a task's first improvement (the initial parameters until then).
            "best_params": {t: jax.tree.map(jnp.zeros_like, variables) for t in exp.task_names},
        }

    # ------------------------------------------------------------------ the unit of work
    def make_unit_fn(self):
        exp = self.exp

        def kd_step_fn(state, sums, batch):
            program = state.program
            soft = {
                task.name: task.task_kind.soft_rows(
                    program["soft"][task.name], batch["position"], task.num_classes
                )
                for task in exp.tasks
            }
            ctx = steps.LossContext(
                progress=steps.progress(exp, state.step),
                active=program["active"],
                soft_weight=program["soft_weight"],
                soft_targets=soft,
            )
            state, metrics = steps.train_step(exp, state, batch, ctx)
            metrics.update(
                {f"kd/active/{t}": program["active"][i] for i, t in enumerate(exp.task_names)}
            )
            return state, steps.accumulate(sums, metrics)

        return kd_step_fn

    # ------------------------------------------------------------------ evaluation time
    def scores(self, val_metrics: dict) -> np.ndarray:
        """[T] direction-normalised validation scores of each task's judging metric."""
        out = []
        for task in self.exp.tasks:
            metric, higher = next(iter(task.metrics.items()))
            value = float(val_metrics[task.name][task.eval_exit][metric])
            out.append(value if higher else -value)
        return np.asarray(out, np.float32)

    def after_eval(self, state, step, val_metrics):
        program = dict(state.program)
        tracker = jax.device_get(program["tracker"])
        active = np.asarray(jax.device_get(program["active"])) > 0
        tracker, improved, now = kd.update_tracker(
            tracker,
            self.scores(val_metrics),
            step,
            patience=self.cfg.patience,
            min_delta=self.cfg.min_delta,
            tracked=active,
        )
        best = dict(program["best_params"])
        for i in np.flatnonzero(improved):
            best[self.exp.task_names[i]] = self._copy_variables(state)
        soft = dict(program["soft"])
        soft_weight = np.array(jax.device_get(program["soft_weight"]))
        for i in np.flatnonzero(now & (tracker["best_step"] < 0)):  # never improved (NaN)
            best[self.exp.task_names[i]] = self._copy_variables(state)
        for i in np.flatnonzero(now):
            task = self.exp.tasks[i]
            soft[task.name] = self.label(task, best[task.name])
            soft_weight[i] = 1.0 - self.cfg.hard_weight
        if self.sequential and now.any():
            entered = int(self.rank[active | now].max())
            active = active | (self.rank == entered + 1)
        replicated = parallel.replicated(self.exp.mesh)
        program.update(
            tracker=jax.device_put({k: jnp.asarray(v) for k, v in tracker.items()}, replicated),
            active=jax.device_put(jnp.asarray(active, jnp.float32), replicated),
            soft_weight=jax.device_put(jnp.asarray(soft_weight, jnp.float32), replicated),
            soft=soft,
            best_params=best,
        )
        return state.replace(program=program)

    def done(self, state) -> bool:
        return bool(np.all(jax.device_get(state.program["tracker"]["converged"]) == 1))

    # ------------------------------------------------------------------ checkpointing
    _KEYS = {"soft_labels": "soft", "best_params": "best_params"}  # item on disk -> state key

    def checkpointed(self, state):
        program = {k: v for k, v in state.program.items() if k not in self._KEYS.values()}
        return state.replace(program=program)

    def _versions(self, tracker) -> dict:
        """{(item, task): step of the version the tracker refers to} (tasks with one)."""
        out = {}
        for i, task in enumerate(self.exp.task_names):
            if tracker["converged_step"][i] >= 0:
                out["soft_labels", task] = int(tracker["converged_step"][i])
            if tracker["best_step"][i] >= 0:
                out["best_params", task] = int(tracker["best_step"][i])
        return out

    def _store(self, workdir: str, item: str, task: str) -> checkpointing.ItemStore:
        keep = self.exp.config.train.keep_checkpoints
        # A retained checkpoint refers to a version written at or before its save, at most one
        # new version per save: the newest keep + 1 cover every retained checkpoint.
        keep = None if item == "soft_labels" or not keep else keep + 1
        return checkpointing.ItemStore(os.path.join(workdir, "kd", item, task), keep=keep)

    def save_artifacts(self, workdir, state):
        tracker = jax.device_get(state.program["tracker"])
        for (item, task), step in self._versions(tracker).items():
            if self._on_disk.get((item, task)) != step:
                with self._store(workdir, item, task) as store:
                    store.save(step, state.program[self._KEYS[item]][task])
                self._on_disk[item, task] = step

    def restore_artifacts(self, workdir, restored, fresh):
        tracker = jax.device_get(restored.program["tracker"])
        program = dict(restored.program)
        for key in self._KEYS.values():
            program[key] = dict(fresh.program[key])
        for (item, task), step in self._versions(tracker).items():
            key = self._KEYS[item]
            like = program[key][task]
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
            )
            with self._store(workdir, item, task) as store:
                program[key][task] = store.restore(step, abstract)
            self._on_disk[item, task] = step
        return restored.replace(program=program)

    # ------------------------------------------------------------------ pieces
    def _copy_variables(self, state) -> dict:
        """A device copy of the current parameters and BatchNorm statistics (the step donates
        the originals)."""
        if self._copy is None:
            sh = self.exp.state_shardings
            self._copy = jax.jit(
                lambda v: jax.tree.map(jnp.copy, v),
                out_shardings={"params": sh.params, "batch_stats": sh.batch_stats},
            )
        return self._copy({"params": state.params, "batch_stats": state.batch_stats})

    def label(self, task, variables) -> dict:
        """The soft-label table of `task` from `variables` over the training split."""
        if self._predict is None:
            self._predict = steps.make_predict_step(self.exp, self.cfg.temperature)
        t0 = time.perf_counter()
        rows = steps.predict(
            self.exp, variables["params"], variables["batch_stats"], "train", self._predict
        )[task.name][:, -1]  # the task's deepest exit is the teacher
        table = task.task_kind.soft_table(
            rows, task.num_classes, self.cfg.top_k, self.cfg.label_dtype
        )
        table = jax.block_until_ready(jax.device_put(table, parallel.replicated(self.exp.mesh)))
        self.label_seconds[task.name] = time.perf_counter() - t0
        return table

    def results(self, state) -> dict:
        """Convergence steps and, per task, test metrics at its own best parameters."""
        tracker = jax.device_get(state.program["tracker"])
        if self._eval_step is None:
            self._eval_step = steps.make_eval_step(self.exp)
        per_task = {}
        for i, task in enumerate(self.exp.tasks):
            if tracker["best_step"][i] < 0:
                continue
            best = state.program["best_params"][task.name]
            at_best = state.replace(params=best["params"], batch_stats=best["batch_stats"])
            test = steps.evaluate(self.exp, at_best, "test", self._eval_step)
            per_task[task.name] = {
                "best_step": int(tracker["best_step"][i]),
                "test": test[task.name][task.eval_exit],
            }
        names = self.exp.task_names
        return {
            "kd": {
                "program": self.name,
                "reported_parameters": "final",
                "converged_step": {
                    t: (int(s) if s >= 0 else None)
                    for t, s in zip(names, tracker["converged_step"])
                },
                "best_step": {
                    t: (int(s) if s >= 0 else None) for t, s in zip(names, tracker["best_step"])
                },
                "bytes_per_example": {
                    t: kd.table_bytes_per_example(state.program["soft"][t]) for t in names
                },
                "selected_on_validation": per_task,
                # Wall time of the labelling passes this process ran (a resumed run lists only
                # those after the resume; the first includes compiling the predict step).
                "label_pass_s": dict(self.label_seconds),
            }
        }


class KDSequentialProgram(KDJointProgram):
    """KD from converged tasks, tasks entering one at a time (see the module docstring)."""

    name = "kd_sequential"
    sequential = True


def _checked_config(exp, sequential: bool):
    """The program section, validated against the experiment (ConfigError naming the field)."""
    cfg = exp.config.program
    if exp.config.train.eval_every <= 0:
        raise ConfigError(
            f"program.name={cfg.name!r} tracks convergence on validation: set train.eval_every > 0"
        )
    _check_fields(cfg)
    names = exp.task_names
    for task in exp.tasks:
        if task.task_kind.soft_table is None:
            raise ConfigError(
                f"program.name={cfg.name!r}: task {task.name!r} is {task.kind}, which has no soft "
                "labels; KD from converged tasks takes classification and regression tasks"
            )
    if cfg.order and sorted(cfg.order) != sorted(names):
        raise ConfigError(
            f"program.order={tuple(cfg.order)} must list each of data.tasks={names} once"
        )
    if cfg.order and not sequential:
        raise ConfigError("program.order applies to kd_sequential only; leave it () for kd_joint")
    return cfg


def _check_fields(cfg) -> None:
    """KD's settings on their own (`Program.check_fields`): every run checks them."""
    if not isinstance(cfg.patience, int) or cfg.patience < 1:
        raise ConfigError(f"program.patience={cfg.patience!r} must be an integer >= 1")
    for field, lo, hi in (("min_delta", 0.0, np.inf), ("hard_weight", 0.0, 1.0)):
        value = cfg[field]
        if not np.isfinite(value) or not lo <= value <= hi:
            raise ConfigError(f"program.{field}={value!r} must lie in [{lo}, {hi}]")
    if not np.isfinite(cfg.temperature) or cfg.temperature <= 0:
        raise ConfigError(f"program.temperature={cfg.temperature!r} must be > 0")
    if cfg.label_dtype not in kd.LABEL_DTYPES:
        raise ConfigError(
            f"program.label_dtype={cfg.label_dtype!r} is not one of {', '.join(kd.LABEL_DTYPES)}"
        )
    if not isinstance(cfg.top_k, int) or cfg.top_k < 0:
        raise ConfigError(f"program.top_k={cfg.top_k!r} must be 0 (all classes) or a count >= 1")
