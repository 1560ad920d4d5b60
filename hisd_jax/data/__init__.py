"""Datasets, sources and batch iterators.

A dataset is a `Dataset`: three random-access `Source`s ('train', 'val', 'test'), the image
shape and the tasks it offers. `get_dataset(name, seed=..., **kwargs)` builds one by name:

  digits       sklearn's 1797 8x8 handwritten digits, split by source image (embedded.py)
  multidigits  two digits on a 12x12 canvas, MultiMNIST-style; left/right/sum/... (embedded.py)
  mnist, cifar10, cifar100, multimnist   TFDS via `tfds.data_source` + grain (tfds_sources.py)
  pycode       functions of the installed Python sources as token ids; tasks package, returns
               (pycode.py)
  pycode_search  the same corpus as (query, code) pairs [2, L]: task search (retrieval, MRR)
               and package, returns of the code
  glue         a GLUE task (data.kwargs.config: sst2, mnli, ...) as token ids, through
               `tfds.data_source` (glue.py; prepared beforehand, nothing is downloaded)
  synthetic    noise images of any shape (synthetic.py): benchmarks and memory accounting

Batches are dicts of numpy arrays: 'image' float32 [n, H, W, C], 'index' int32 [n] (a stable
example id: see each builder), every task's `label_key` (int32 class ids or float32 targets) and
dataset-specific extras. Images are scaled to [0, 1] and then standardised, `(x - mean) / std`
(pass `normalize=False` to keep [0, 1]): the embedded datasets use the scalar pixel mean/std of
their own train split; the TFDS datasets use the usual published per-channel constants
(`tfds_sources.NORMALIZATION`).

The batches of `BatchIterator` and `eval_batches` (whatever the dataset) also carry
'position' int32 [n]: the row of the example in its split, 0..len-1, dense, so it can index
per-example arrays of the split (`source.get_batch(position)` returns those examples again).
'index' keeps its meaning, the source's stable id, which need not be dense or start at 0.
`eval_batches` adds 'mask' float32 [n], 0 on padding rows.

`BatchIterator` (pipeline.py) is the deterministic, sharded, checkpointable training iterator
(`BatchIterator.steps_per_epoch`, or `steps_per_epoch(len(source), global_batch_size)`, is the
number of global batches in an epoch); `eval_batches` visits a split once with padding and a
'mask'.

The builders are imported lazily, so importing this package does not import TFDS.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Protocol

import numpy as np

from hisd_jax.data.pipeline import BatchIterator, eval_batches, steps_per_epoch, with_positions

__all__ = [
    "DATASETS",
    "BatchIterator",
    "Dataset",
    "Source",
    "TaskInfo",
    "eval_batches",
    "get_dataset",
    "steps_per_epoch",
    "with_positions",
]


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """One prediction task of a dataset."""

    name: str  # e.g. "label", "left", "right", "sum"
    kind: str  # "classification" | "regression" | "retrieval"
    num_classes: int  # 0 for regression and retrieval
    label_key: str  # key of the target in the batch dict (retrieval: unused, "index")


class Source(Protocol):
    """Random access over one split."""

    def __len__(self) -> int: ...

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Examples at positions `indices` (0 <= i < len) of this split, stacked (the pipeline
        adds 'position', so a source need not)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    splits: dict[str, Source]  # always 'train', 'val', 'test'
    image_shape: tuple[int, ...]  # per-example shape of the model input ((L,) for tokens)
    tasks: dict[str, TaskInfo]  # all tasks this dataset offers
    input_key: str = "image"  # the batch field the model reads ("tokens" for sequences)
    input_dtype: str = "float32"  # its dtype ("int32" token ids)
    vocab_size: int = 0  # token vocabulary of a sequence data set (0: not token ids)
    metadata: dict = dataclasses.field(default_factory=dict, compare=False)  # e.g. a manifest


# name -> (module under hisd_jax.data, builder function). Every builder takes `seed` and keywords.
_BUILDERS = {
    "digits": ("embedded", "digits"),
    "multidigits": ("embedded", "multidigits"),
    "mnist": ("tfds_sources", "mnist"),
    "cifar10": ("tfds_sources", "cifar10"),
    "cifar100": ("tfds_sources", "cifar100"),
    "multimnist": ("tfds_sources", "multimnist"),
    "pycode": ("pycode", "pycode"),
    "pycode_search": ("pycode", "pycode_search"),
    "glue": ("glue", "glue"),
    "synthetic": ("synthetic", "synthetic"),
}
DATASETS: tuple[str, ...] = tuple(_BUILDERS)


def get_dataset(name: str, *, seed: int = 0, **kwargs) -> Dataset:
    """Builds the dataset registered as `name`; `kwargs` go to its builder. Its labels are
    checked (`check_labels`): a bad one raises `errors.DataError`."""
    if name not in _BUILDERS:
        raise ValueError(f"data.name={name!r} is not one of {', '.join(DATASETS)}")
    module, builder = _BUILDERS[name]
    build = getattr(importlib.import_module(f"hisd_jax.data.{module}"), builder)
    dataset = build(seed=seed, **kwargs)
    check_labels(dataset)
    return dataset


def check_labels(dataset: Dataset) -> None:
    """Raises `errors.DataError` naming the data set, split, task and first bad position if a
    classification label is not an integer in [0, num_classes) (a -1 "missing" marker would
    otherwise train as class C-1, and C gives NaN far from the cause) or a regression target is
    not finite.

    Checked where a split's labels are in memory (sources with `label_array(key)`, e.g. the
    embedded data sets' `ArraySource`); the TFDS sources read records lazily, and TFDS checks
    their labels against the data set's `ClassLabel` feature when it prepares them.
    """
    from hisd_jax.errors import DataError  # noqa: PLC0415

    for split, source in dataset.splits.items():
        if not hasattr(source, "label_array"):
            continue
        for task in dataset.tasks.values():
            if task.kind == "retrieval":  # no labels: the pair is the target
                continue
            labels = np.asarray(source.label_array(task.label_key))
            where = f"data set {dataset.name!r}, split {split!r}, task {task.name!r}"
            if task.kind == "classification":
                if not np.issubdtype(labels.dtype, np.integer):
                    raise DataError(f"{where}: labels have dtype {labels.dtype}, need integers")
                bad = np.flatnonzero((labels < 0) | (labels >= task.num_classes))
                allowed = f"[0, {task.num_classes})"
            else:
                bad = np.flatnonzero(~np.isfinite(labels))
                allowed = "finite"
            if bad.size:
                raise DataError(
                    f"{where}: label {labels[bad[0]].item()!r} at position {bad[0]} is not in "
                    f"{allowed} ({bad.size} bad of {labels.size})"
                )
