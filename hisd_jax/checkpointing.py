"""Orbax checkpointing of everything an exact resume needs.

One `CheckpointManager` per workdir (`<workdir>/checkpoints`) with composite items:
  * `state`: the train state pytree (step, params, batch_stats, optimizer and
    strategy state, RNG key data, non-finite flag);
  * `data`: the training iterator's JSON state;
  * `extra`: any JSON the trainer attaches (e.g. convergence trackers).
Saves are atomic (Orbax writes to a temporary directory and renames it), so a kill
mid-save leaves the previous checkpoint intact. Saves happen every
`checkpoint_every` steps, at the end, and at the first step after a preemption
notice (SIGTERM on Cloud TPU / SLURM, seen through `reached_preemption`).

Data a program writes once or rarely and that the rolling retention must not delete (KD soft
labels, each task's best parameters) lives beside them in `ItemStore`s.
"""

import contextlib
import gc
import inspect
import logging as std_logging
import sys
import warnings

import jax
import orbax.checkpoint as ocp
from etils import epath

from hisd_jax import storage


class Checkpointer:
    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        self.every = every
        self._mngr = ocp.CheckpointManager(
            epath.Path(storage.absolute(directory)),
            item_names=("state", "data", "extra"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of the finished checkpoints, oldest first."""
        return sorted(self._mngr.all_steps())

    def set_aside(self, step: int) -> str:
        """Renames checkpoint `step` to `unrestorable_<step>` (kept for inspection, ignored by
        Orbax, so a rerun can save that step again); returns the new path. Process 0 renames,
        every process waits for it."""
        old = self._mngr.directory / str(step)
        new = self._mngr.directory / f"unrestorable_{step}"
        if jax.process_index() == 0 and old.exists():
            if new.exists():
                new.rmtree()
            old.rename(new)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices(f"set_aside_{step}")
        self._mngr.reload()
        return str(new)

    def should_save(self, step: int) -> bool:
        return step % self.every == 0 or self.reached_preemption(step)

    def reached_preemption(self, step: int) -> bool:
        """True at the step all processes stop at after a preemption notice (multi-process).

        Ask it at every step: JAX's sync manager picks the step after the furthest step any
        process had reached when the notice came. Always False in a single process.
        """
        return self._mngr.reached_preemption(step)

    def save(
        self, step: int, state, data_state: dict, extra: dict | None = None, force: bool = False
    ) -> None:
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                extra=ocp.args.JsonSave(extra or {}),
            ),
            force=force,
        )

    def restore(self, abstract_state, step: int | None = None):
        """Restores (state, data_state, extra) at `step` (default: the latest)."""
        step = self._mngr.latest_step() if step is None else step
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                extra=ocp.args.JsonRestore(),
            ),
        )
        return out.state, out.data, out.extra

    def extra(self, step: int) -> dict:
        """The `extra` JSON of `step` alone (no arrays read)."""
        out = self._mngr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        return out.extra or {}

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()


class ItemStore:
    """Versions of one pytree outside the rolling checkpoints (`<workdir>/<name>/<step>/`).

    Each version is an Orbax checkpoint keyed by a step of the caller's choosing, written
    synchronously (so it is on disk before the train-state checkpoint that refers to it) and
    atomically; `keep` versions are kept (None: all), the oldest steps deleted first. Saving a
    step already on disk does nothing: a resumed run that reaches the same step again writes the
    same data. Every process calls every method (the arrays may span processes).
    """

    def __init__(self, directory: str, keep: int | None = None):
        self._mngr = ocp.CheckpointManager(
            epath.Path(storage.absolute(directory)),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
            ),
        )

    def steps(self) -> tuple[int, ...]:
        return tuple(self._mngr.all_steps())

    def save(self, step: int, tree) -> None:
        if step not in self._mngr.all_steps():
            self._mngr.save(step, args=ocp.args.StandardSave(tree), force=True)

    def restore(self, step: int, abstract_tree):
        """The version at `step` with the shapes, dtypes and shardings of `abstract_tree`;
        FileNotFoundError naming the directory if it is not on disk."""
        if step not in self._mngr.all_steps():
            raise FileNotFoundError(
                f"{self._mngr.directory} has no version {step} (has {self.steps()}): the workdir "
                "was damaged or partly copied"
            )
        return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract_tree))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._mngr.close()


@contextlib.contextmanager
def quiet_failed_reads():
    """Silences the echoes of a restore that fails on a damaged step: Orbax's other reads of
    that step fail later in its asyncio loop, and asyncio logs "exception was never retrieved"
    and Python reports "Exception ignored in" their coroutines (or "Event loop is closed"), some
    hundreds of lines for one missing file. The failure itself still raises, and the caller
    reports it once. Only those two kinds of message are dropped; others pass through."""
    log = std_logging.getLogger("asyncio")
    level, hook = log.level, sys.unraisablehook

    def unraisable(u):
        if not (inspect.iscoroutine(u.object) or _loop_closed_echo(u)):
            hook(u)

    log.setLevel(std_logging.CRITICAL)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        with warnings.catch_warnings():  # "coroutine ... was never awaited", the same echo
            warnings.simplefilter("ignore", RuntimeWarning)
            gc.collect()  # the failed reads' coroutines are reported when collected: here
        # TensorStore's native callbacks of those reads can still arrive after this point, on a
        # loop Orbax has closed ("Event loop is closed", from call_soon_threadsafe): the hook
        # left behind drops that echo, and only that, for the rest of the process
        sys.unraisablehook = _without_loop_closed_echo(hook)
        log.setLevel(level)


def _loop_closed_echo(u) -> bool:
    return isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)


def _without_loop_closed_echo(hook):
    """`hook` (sys.unraisablehook) less `_loop_closed_echo`; wrapped once."""
    if getattr(hook, "drops_loop_closed_echo", False):
        return hook

    def unraisable(u):
        if not _loop_closed_echo(u):
            hook(u)

    unraisable.drops_loop_closed_echo = True
    return unraisable


def abstract_like(state, shardings):
    """ShapeDtypeStructs with shardings, the target Orbax restores into."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def tree_digest(tree) -> str:
    """sha256 over every leaf's dtype, shape and bytes in tree order (a host copy of the tree:
    replicated arrays read their local copy; arrays sharded over processes are gathered, so
    every process must call it, as every process saves and restores). Stored beside each
    checkpoint and compared after a restore, so a checkpoint whose bytes changed on disk but
    still parse is recognised as damaged."""
    import hashlib  # noqa: PLC0415

    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from jax.experimental import multihost_utils  # noqa: PLC0415

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "addressable_shards") and not leaf.is_fully_addressable:
            if leaf.sharding.is_fully_replicated:  # every local copy is the whole array
                leaf = leaf.addressable_shards[0].data
            else:  # sharded over processes (FSDP): every process gathers it (a collective)
                leaf = multihost_utils.process_allgather(leaf, tiled=True)
        a = np.asarray(jax.device_get(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
