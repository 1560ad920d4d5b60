"""The training loop every program shares.

The loop owns what every run needs, whatever its unit of work: the workdir (config check,
config.json), the training iterator, Orbax checkpointing with automatic resume, preemption
(SIGTERM, or JAX's synchronised preemption point on several processes), the non-finite guard,
the metric writer (metrics.jsonl + TensorBoard), the progress bar, and the periodic actions
(log every `train.log_every` steps, validate every `train.eval_every`, checkpoint every
`train.checkpoint_every`). The program (`programs/`) decides what one unit of work is and
what happens after each validation.

Steps are optimizer steps (`TrainState.step`); a unit takes `program.updates_per_unit` of
them, and a periodic action runs after the unit in which its step count was reached.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import jax
from absl import logging

from hisd_jax import checkpointing, jsonio, parallel, steps, storage
from hisd_jax import config as config_lib
from hisd_jax import data as data_lib
from hisd_jax import metrics as metrics_lib
from hisd_jax import stored_config as stored_config_lib
from hisd_jax.errors import ConfigError, WorkdirError
from hisd_jax.experiment import Experiment, TrainState, init_state


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between units (save, then stop).

    With several processes the flag is left to JAX: each process sees the signal between
    different steps, and stopping where each saw it deadlocks the job (one process saving,
    another in the next step's collectives). jax.distributed.initialize attaches its
    preemption sync manager to SIGTERM; it picks one step for all processes, reported by
    `Checkpointer.reached_preemption(step)`, which the loop asks after every unit.
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


def check_workdir_config(workdir: str, config) -> dict:
    """Raises ConfigError if `workdir` holds a run of a different config (resumable fields and
    fields added to the defaults since that run, at their default value, excepted): the one in
    its config.json or, if that file was lost, in its newest checkpoint. Returns the
    changed optimizer fields a resume may change ({field: {"was", "now"}}, usually empty)."""
    stored = stored_config_lib.stored_config(workdir)
    if stored is None:  # a new workdir
        return {}
    defaults = json.loads(config_lib.base_config().to_json_best_effort())
    stored = config_lib.fill_defaults(stored, defaults)
    current = json.loads(config.to_json_best_effort())
    differ = config_lib.diff(stored, current)
    changed = [f for f in differ if f not in config_lib.RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(
            f"workdir {workdir} holds a run with a different config (changed: {', '.join(changed)}); "
            "use a new --workdir or the same config to resume"
        )
    return {
        f: {"was": _get(stored, f), "now": _get(current, f)}
        for f in differ
        if f in config_lib.OPTIMIZER_CHANGES
    }


def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def check_workdir_path(workdir: str) -> None:
    """Raises ConfigError (one line) for a workdir that cannot be one: empty, an existing file,
    under a file, or in a directory we cannot write; a URL of a scheme we cannot use or whose
    file-system package is not installed (`storage.check_backend`). Creates nothing."""
    if not isinstance(workdir, str) or not workdir.strip():
        raise ConfigError(f"--workdir={workdir!r} is empty: name a directory")
    if storage.is_url(workdir):
        return storage.check_url(workdir)
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir={workdir!r} is a file, not a directory")
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"--workdir={workdir!r} lies under {ancestor!r}, which is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir={workdir!r}: {ancestor!r} is not writable")


class WorkdirLock:
    """An exclusive lock on a local workdir for one run (`fcntl.flock` on `<workdir>/.lock`).

    Taken by process 0 of a job (the job's other processes share its workdir); a second run
    started on the same workdir raises `WorkdirError` naming the holder (pid and host, written
    into the file). The OS drops the lock when its process exits, however it exits, so a
    crashed run leaves no stale lock. Object storage (gs://...) has no locks and file systems
    without flock refuse it: those runs go unlocked, with a warning.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self._file = None
        self._unlocked = False  # entered, but nothing to lock (object storage, no flock)

    def __enter__(self):
        if self._file is not None or self._unlocked or jax.process_index() != 0:
            return self  # held already (prepare_workdir enters it), or not ours to take
        if storage.is_object_store(self.path):
            self._unlocked = True
            logging.warning(
                "%s is on object storage, which has no locks: nothing stops a second run on "
                "it from writing the same files",
                os.path.dirname(self.path),
            )
            return self
        import fcntl  # noqa: PLC0415
        import socket  # noqa: PLC0415

        f = open(self.path, "a+")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise WorkdirError(
                f"{os.path.dirname(self.path)} is in use by another run ({holder}); wait for it "
                "to end or use another --workdir"
            ) from None
        except OSError as e:  # no flock on this file system: run unlocked
            f.close()
            logging.warning("%s cannot be locked (%s): running unlocked", self.path, e)
            self._unlocked = True
            return self
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *_):
        self._unlocked = False
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None


def prepare_workdir(workdir: str, config) -> WorkdirLock:
    """Checks a resumed workdir's config, creates the workdir, locks it (`WorkdirLock`, which
    the caller enters and holds for the run) and writes config.json once (atomically)."""
    changes = check_workdir_config(workdir, config)
    try:
        storage.makedirs(workdir)
    except OSError as e:  # e.g. a read-only or special file system
        raise ConfigError(f"--workdir={workdir!r} cannot be created: {e.strerror}") from e
    lock = WorkdirLock(workdir).__enter__()
    try:
        path = os.path.join(workdir, "config.json")
        if stored_config_lib.read_config_json(workdir)[0] is None:  # a resume compares against it:
            # written once (again only when lost or damaged, from the checked config)
            jsonio.write_json(path, json.loads(config.to_json_best_effort(sort_keys=True)))
        if changes:  # e.g. a lower lr after a non-finite stop; Loop records it as an event
            logging.warning("Resuming with changed optimizer settings: %s", changes)
    except BaseException:
        lock.__exit__()
        raise
    return lock


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]: a periodic action is due."""
    return bool(every) and after // every > before // every


@dataclasses.dataclass
class TrainInfo:
    start: int  # the step the run started (or resumed) from
    end: int  # the step it ended at
    wall_time_s: float


class Loop:
    """One run of `exp.program` in `workdir` (see the module docstring).

    Use as a context manager: `with Loop(exp, workdir) as loop: state = loop.run()`.
    """

    def __init__(self, exp: Experiment, workdir: str):
        cfg = exp.config.train
        self.exp, self.workdir, self.program = exp, workdir, exp.program
        self.ckpt = checkpointing.Checkpointer(
            os.path.join(workdir, "checkpoints"),
            every=cfg.checkpoint_every,
            keep=cfg.keep_checkpoints,
        )
        self.iterator = data_lib.BatchIterator(
            exp.dataset.splits["train"],
            cfg.batch_size,
            seed=exp.config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            augment=exp.augment,
        )
        self.writer = None  # opened by restore_or_init, which knows the step to resume from
        self.jobs = []  # every job that ran this run (`job_record`), kept in its checkpoints
        self._config_json = json.loads(exp.config.to_json_best_effort(sort_keys=True))
        self.eval_step = steps.make_eval_step(exp)
        self._sharding = parallel.batch_sharded(exp.mesh)
        self._keys = exp.batch_keys(train=True)

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.iterator.close()
        if self.writer is not None:
            self.writer.close()
        self.ckpt.close()

    # ------------------------------------------------------------------ state
    def restore_or_init(self) -> TrainState:
        """The latest checkpoint's state (and iterator position), or a fresh state."""
        state, resumed, jobs = init_state(self.exp), None, []
        if self.ckpt.latest_step() is not None:
            state, data_state, extra = restore(self.exp, self.workdir, self.ckpt, state)
            self.iterator.set_state(data_state)
            resumed = int(state.step)
            jobs = list(extra.get("jobs", []))
            # a warning: shown by every command (they log warnings only), so a rerun says so
            logging.warning("Resumed from step %d in %s", resumed, self.workdir)
        self.jobs = [*jobs, job_record(self.exp, resumed or 0)]
        self.writer = metrics_lib.MetricWriter(self.workdir, resume_step=resumed)
        changes = check_workdir_config(self.workdir, self.exp.config)
        if changes and resumed is not None:  # a resume with a new lr, grad_clip or momentum
            self.writer.event(resumed, "optimizer_changed", changes)
        return state

    def evaluate(self, state: TrainState, split: str) -> dict:
        """{task: {exit: metrics}} of `state` on `split`."""
        return steps.evaluate(self.exp, state, split, self.eval_step)

    def save(self, step: int, state: TrainState) -> None:
        self._check_finite(state, step)
        self.program.save_artifacts(self.workdir, state)  # on disk before the checkpoint
        view = self.program.checkpointed(state)
        self.ckpt.save(
            step,
            view,
            self.iterator.get_state(),
            # what a resume compares against: the config, and the bytes (`restore`)
            extra={
                "config": self._config_json,
                "digest": checkpointing.tree_digest(view),
                "jobs": self.jobs,
            },
            force=True,
        )

    def _check_finite(self, state: TrainState, step: int) -> None:
        bad = int(state.bad_step)
        if bad >= 0:
            self.ckpt.wait()
            last = self.ckpt.latest_step()
            kept = (
                f"the last good checkpoint (step {last}) is kept in {self.workdir}/checkpoints; "
                "rerun the same command"
                if last is not None
                else "no checkpoint was written yet; rerun the same command"
            )
            raise FloatingPointError(
                f"non-finite loss, gradient or parameters at step {bad + 1} (stopped at step "
                f"{step}); {kept} with a lower --config.optimizer.lr or a "
                "--config.optimizer.grad_clip (a resume may change them and momentum; the "
                "change is recorded in metrics.jsonl), or check the data"
            )

    def _next_batches(self) -> list[dict]:
        out = []
        for _ in range(self.program.batches_per_unit):
            local = next(self.iterator)
            out.append(parallel.global_batch({k: local[k] for k in self._keys}, self._sharding))
        return out

    # ------------------------------------------------------------------ the loop
    def run(self, state: TrainState) -> tuple[TrainState, TrainInfo]:
        """Runs units until the program's `total_steps` (`train.steps` unless the program
        budgets otherwise) or `program.done`; returns the state and timing."""
        cfg = self.exp.config.train
        total, per_unit = self.program.total_steps, self.program.updates_per_unit
        start = step = int(state.step)
        progress = metrics_lib.Progress(total, start, enabled=cfg.progress)
        t0, sums, n_sums = time.perf_counter(), None, 0
        finished = self.program.done(state)  # a resumed run whose program had stopped early
        with _Preemption() as preemption:
            while step < total and not finished:
                before, step = step, step + per_unit
                state, sums = self.program.run_unit(state, sums, self._next_batches())
                n_sums += 1
                last = step >= total
                if crossed(before, step, cfg.log_every) or last:
                    self._check_finite(state, step)
                    mean = {k: float(v) / n_sums for k, v in jax.device_get(sums).items()}
                    self.writer.write(step, "train", mean)
                    progress.update(step, mean["loss"])
                    sums, n_sums = None, 0
                stop = False
                if crossed(before, step, cfg.eval_every):  # the last step too (the program sees it)
                    val = self.evaluate(state, "val")
                    self.writer.write(step, "val", flat_metrics(val))
                    state = self.program.after_eval(state, step, val)
                    # what the program set on the host goes back to the state's shardings
                    state = jax.device_put(state, self.exp.state_shardings)
                    stop = self.program.done(state)
                preempted = preemption.requested or self.ckpt.reached_preemption(step)
                if crossed(before, step, cfg.checkpoint_every) or last or stop or preempted:
                    self.save(step, state)
                if preempted:
                    self.ckpt.wait()
                    logging.warning(
                        "Preempted at step %d; checkpoint saved, rerun to resume.", step
                    )
                    raise SystemExit(143)
                if stop:
                    break
        progress.close()
        wall = time.perf_counter() - t0
        self.ckpt.wait()
        return state, TrainInfo(start=start, end=step, wall_time_s=wall)


def job_record(exp: Experiment, from_step: int) -> dict:
    """Where one job of a run trained from `from_step` on: devices, processes, platform, mesh
    (a resumed run's results list one per job: an elastic resume shows its device counts)."""
    return {
        "from_step": int(from_step),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "mesh": {k: int(v) for k, v in exp.mesh.shape.items()},
    }


def restore(
    exp: Experiment,
    workdir: str,
    ckpt: checkpointing.Checkpointer,
    fresh: TrainState,
    set_aside: bool = True,
):
    """(train state, iterator state, extra JSON) of the newest restorable checkpoint in `ckpt`,
    with the program's artifacts (`Program.restore_artifacts`); `fresh` gives the structure and
    shardings. A checkpoint that cannot be read (a damaged or missing file, an artifact it names
    gone) is skipped with a warning for the one before it and, with `set_aside`, renamed out of
    the way of new saves (`Checkpointer.set_aside`); WorkdirError (one line) if none can be.
    """
    view = exp.program.checkpointed(fresh)
    abstract = checkpointing.abstract_like(view, jax.tree.map(lambda x: x.sharding, view))
    problems = []
    for step in reversed(ckpt.all_steps()):
        try:
            with checkpointing.quiet_failed_reads():
                restored, data_state, extra = ckpt.restore(abstract, step)
            digest = (extra or {}).get("digest")
            if digest is not None and checkpointing.tree_digest(restored) != digest:
                raise ValueError("its arrays differ from what was saved (sha256 mismatch)")
            restored = exp.program.restore_artifacts(workdir, restored, fresh)
        except Exception as e:  # noqa: BLE001 - any failure to read a step (TensorStore raises
            # plain Exception for undecodable bytes): try the one before; all failing is an error
            # that lists every reason
            # TensorStore appends a dump of its spec ("See full TensorStore details: ..."): cut
            reason = " ".join(str(e).split(" See full TensorStore details")[0].split())
            problems.append(f"step {step}: {reason[:300]}")
            logging.warning("Checkpoint %d in %s cannot be restored (%s)", step, workdir,
                            problems[-1].split(": ", 1)[1])  # fmt: skip
            continue
        if step != ckpt.all_steps()[-1]:
            logging.warning("Using checkpoint step %d of %s (the newer ones cannot be restored)",
                            step, workdir)  # fmt: skip
        for bad in ckpt.all_steps():  # the newer ones are unreadable
            if set_aside and bad > step:
                path = ckpt.set_aside(bad)
                logging.warning("Resuming from step %d; set aside %s", step, path)
        return restored, data_state, extra or {}
    raise WorkdirError(
        f"no checkpoint in {workdir}/checkpoints can be restored ({'; '.join(problems)}); "
        "use a new --workdir"
    )


def restore_latest(exp: Experiment, workdir: str) -> tuple[TrainState, dict]:
    """(train state, iterator state) of `workdir`'s latest checkpoint, shaped and sharded like
    `init_state(exp)` (for tools and tests; the loop resumes with `Loop.restore_or_init`).
    FileNotFoundError if the workdir has no checkpoint."""
    directory = os.path.join(workdir, "checkpoints")
    if not storage.isdir(directory):
        raise FileNotFoundError(f"no checkpoint in {directory}")
    ckpt = checkpointing.Checkpointer(directory, every=1, keep=None, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        return restore(exp, workdir, ckpt, init_state(exp), set_aside=False)[:2]
    finally:
        ckpt.close()


def flat_metrics(split_metrics: dict) -> dict:
    """{task: {exit: {metric: v}}} -> {"task/exit/metric": v}."""
    return {
        f"{task}/{exit_name}/{k}": v
        for task, per_exit in split_metrics.items()
        for exit_name, m in per_exit.items()
        for k, v in m.items()
    }
