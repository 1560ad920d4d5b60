"""Deterministic, sharded, checkpointable batches over a `Source`.

Training stream: epoch k visits the n examples in the order
`np.random.default_rng([seed, k]).permutation(n)` (identity without shuffling); the epochs are
concatenated into one infinite stream and global batch s is positions [s*B, (s+1)*B) of it.
Batches straddle epoch boundaries, so no example is dropped and each epoch is visited exactly
once; batch s depends only on (seed, s, n, shuffle). Process p of P gets rows
[p*B/P, (p+1)*B/P) of every global batch, so the global batch is the same for any P. The
iterator's state is the step counter, so a resume is exact. An epoch is
`steps_per_epoch(n, B)` = ceil(n / B) global batches.

Every batch, of the training stream and of `eval_batches`, carries 'position' int32 [n]: the
row of each example in its split (the argument of `Source.get_batch` that produced it), set
here so that every source has it.

An `augment` (`augment.CropFlip`) transforms the training stream's batches: its draws for
global batch s come from `np.random.default_rng([seed, augment.STREAM, s])` for every row, and
each process applies its own rows', so the augmented batch too depends only on (seed, s).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np

from hisd_jax.data import augment as augment_lib

_PUT_TIMEOUT = 0.1  # seconds between checks of the stop flag while the queue is full
_CACHED_EPOCHS = 4  # permutations kept by _Loader


def steps_per_epoch(source_len: int, global_batch_size: int) -> int:
    """Global batches per epoch over `source_len` examples: ceil(source_len / global_batch_size)
    (unless B divides n, the last one straddles into the next epoch: see the module doc)."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if source_len < 0:
        raise ValueError(f"source_len must be >= 0, got {source_len}")
    return -(-source_len // global_batch_size)


def with_positions(source, positions: np.ndarray) -> dict[str, np.ndarray]:
    """`source.get_batch(positions)` plus 'position' (the rows asked for, int32)."""
    batch = source.get_batch(positions)
    batch["position"] = np.asarray(positions, dtype=np.int32)
    return batch


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, "
            f"got process_index={process_index}, process_count={process_count}"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"process_count={process_count}"
        )
    return global_batch_size // process_count


class _Loader:
    """Loads this process's slice of global batch `step`; keeps recent epoch permutations."""

    def __init__(
        self, source, global_batch_size, local_batch_size, process_index, seed, shuffle, augment
    ):
        self.source, self.n, self.augment = source, len(source), augment
        self.global_batch_size, self.local_batch_size = global_batch_size, local_batch_size
        self.offset = process_index * local_batch_size
        self.seed, self.shuffle = seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= _CACHED_EPOCHS:
                del self._perms[min(self._perms)]
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        positions = (
            step * self.global_batch_size
            + self.offset
            + np.arange(self.local_batch_size, dtype=np.int64)
        )
        epochs, offsets = np.divmod(positions, self.n)
        if not self.shuffle:
            return offsets
        out = np.empty_like(offsets)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            out[here] = self._perm(int(epoch))[offsets[here]]
        return out

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        batch = with_positions(self.source, self.indices(step))
        if self.augment is None:
            return batch
        rng = np.random.default_rng([self.seed, augment_lib.STREAM, step])
        draws = self.augment.draw(rng, self.global_batch_size)  # every row of the global batch
        mine = slice(self.offset, self.offset + self.local_batch_size)
        return self.augment.apply(batch, {k: v[mine] for k, v in draws.items()})


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Puts `item` unless `stop` is set first; returns whether it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_PUT_TIMEOUT)
            return True
        except queue.Full:
            pass
    return False


def _produce(load: _Loader, step: int, q: queue.Queue, stop: threading.Event) -> None:
    """Thread body: puts batches step, step+1, ... (or the first exception) until stopped.

    It holds no reference to the iterator, so an unclosed iterator can still be collected.
    """
    try:
        while _put(q, load(step), stop):
            step += 1
    except BaseException as e:  # handed to the consumer, which re-raises it
        _put(q, e, stop)


class BatchIterator:
    """Deterministic, sharded, checkpointable iterator over a Source (see the module doc).

    A daemon thread prefetches `prefetch` batches ahead (`prefetch=0`: load in `__next__`). It
    starts at the first `__next__`, is restarted by `set_state`, and is stopped by `close()`.
    """

    def __init__(
        self,
        source,
        global_batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 2,
        augment: augment_lib.CropFlip | None = None,
    ):
        self._thread: threading.Thread | None = None  # first, for __del__ if a check fails
        local = _local_batch_size(global_batch_size, process_index, process_count)
        if len(source) < 1:
            raise ValueError("cannot iterate over an empty source")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self._load = _Loader(
            source, global_batch_size, local, process_index, seed, shuffle, augment
        )
        self._seed, self._prefetch, self._step = seed, prefetch, 0
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch: ceil(len(source) / global_batch_size)."""
        return steps_per_epoch(self._load.n, self._load.global_batch_size)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._prefetch == 0:
            batch = self._load(self._step)
        else:
            if self._thread is None:
                self._start()
            batch = self._queue.get()
            if isinstance(batch, BaseException):
                self.close()  # the next call retries from the same step
                raise batch
        self._step += 1
        return batch

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self._prefetch)
        self._thread = threading.Thread(
            target=_produce,
            args=(self._load, self._step, self._queue, self._stop),
            name="BatchIterator",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Stops and joins the prefetch thread and drops prefetched batches."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = self._queue = None

    def __del__(self):
        self.close()

    def get_state(self) -> dict:
        return {"step": self._step, "seed": self._seed}

    def set_state(self, state: dict) -> None:
        if state["seed"] != self._seed:
            raise ValueError(
                f"iterator state has seed={state['seed']}, this iterator has seed={self._seed}"
            )
        if int(state["step"]) < 0:
            raise ValueError(f"iterator state has negative step={state['step']}")
        self.close()
        self._step = int(state["step"])


def eval_batches(
    source, global_batch_size: int, *, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Each example of `source` once, in order, as this process's slices of global batches.

    The last global batch is padded to full size; every batch has 'mask' float32 (1 for real
    rows, 0 for padding) and 'position' int32 (the row in the split). Padding rows repeat
    example 0 (position 0), so they are valid inputs and writing per-example outputs by
    'index' or 'position' stays correct even without the mask. Every process yields the same
    number of batches, `steps_per_epoch(len(source), global_batch_size)`.
    """
    local = _local_batch_size(global_batch_size, process_index, process_count)

    def batches():
        for start in range(0, len(source), global_batch_size):
            positions = start + process_index * local + np.arange(local)
            real = positions < len(source)
            batch = with_positions(source, np.where(real, positions, 0))
            batch["mask"] = real.astype(np.float32)
            yield batch

    return batches()
