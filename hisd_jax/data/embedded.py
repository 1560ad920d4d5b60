"""Embedded datasets, built in memory from sklearn's handwritten digits (no download).

`digits`: the 1797 real 8x8 digit images (pixel values 0..16, scaled by 1/16), split by source
image, stratified by class, into train/val/test (default 60/20/20 %, shuffled by `seed`).
'index' is the sklearn row id of the image.

`multidigits`: the MultiMNIST procedure at this scale. Each example overlays two distinct source
digits of the same split on a `canvas` x `canvas` image (default 12x12) with a pixel-wise max:
the left digit at offset (dy, dx), the right one at (canvas-8-dy', canvas-8-dx'), every shift
drawn from [0, max_shift]. Because the splits are built from the disjoint `digits` splits, no
source image appears in two splits ('src_left', 'src_right' hold the sklearn row ids). Pairs and
shifts are drawn from `np.random.default_rng([seed, split_number])`. 'index' is the row in the
split. Tasks: left, right (10 classes), sum (19), same_parity, left_gt_right (2) and ink (the
canvas's mean pixel intensity, standardised with the train split's mean and std).
`shuffled_copies=(task, ...)` adds, per task named, a task `<task>_shuffled` whose labels
are that task's permuted within each split by a fixed seed: the same label distribution and no
signal (an auxiliary task built to hurt, for αVIL's benchmark); `copies=(task, ...)` adds
`<task>_copy` with that task's labels unchanged (an auxiliary task built to help: the target's
own signal through a head of its own).
`label_noise={task: rate}` corrupts the *training* labels of those tasks only (validation and
test stay clean), drawn from `np.random.default_rng([seed, 7, task number])`: a classification
label is replaced, with probability `rate`, by a class drawn uniformly from all classes
(symmetric noise); a regression target gets Gaussian noise of std `rate` (standardised units).
Networks fit the clean signal first and the noise later (Arpit et al., 2017, "A Closer Look at
Memorization in Deep Networks"), so validation metrics peak and then decline: the setting
where early stopping per task matters.

Both standardise images with the scalar pixel mean/std of their own train split.
"""

from __future__ import annotations

import functools

import numpy as np
from sklearn.datasets import load_digits

from hisd_jax.data import Dataset, TaskInfo

SPLITS = ("train", "val", "test")
DIGIT = 8  # side of a source image


class ArraySource:
    """A split held in memory as numpy arrays with one row per example."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self._arrays = arrays

    def __len__(self) -> int:
        return len(self._arrays["index"])

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices)
        return {key: value[indices] for key, value in self._arrays.items()}

    def label_array(self, key: str) -> np.ndarray:
        """Every row's `key` (read by `data.check_labels`)."""
        return self._arrays[key]


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Images float32 [1797, 8, 8] in [0, 1] and labels int32 [1797]."""
    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int32)


def split_digits(seed: int, fractions=(0.6, 0.2, 0.2)) -> dict[str, np.ndarray]:
    """Sorted sklearn row ids of each split; stratified by class, disjoint, covering all rows."""
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (3,) or (fractions <= 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions={tuple(fractions)} must be 3 positive numbers summing to 1")
    _, labels = _load_digits()
    rng = np.random.default_rng(seed)
    parts = {split: [] for split in SPLITS}
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.round(np.cumsum(fractions[:2]) * len(rows)).astype(int)
        for split, part in zip(SPLITS, np.split(rows, cuts)):
            parts[split].append(part)
    rows = {split: np.sort(np.concatenate(p)) for split, p in parts.items()}
    if any(len(r) == 0 for r in rows.values()):
        raise ValueError(f"fractions={tuple(fractions)} leave a split empty")
    return rows


def _standardise(x: np.ndarray, train: np.ndarray, enabled: bool = True) -> np.ndarray:
    return ((x - train.mean()) / train.std()).astype(np.float32) if enabled else x


def digits(*, seed: int = 0, fractions=(0.6, 0.2, 0.2), normalize: bool = True) -> Dataset:
    images, labels = _load_digits()
    rows = split_digits(seed, fractions)
    train_images = images[rows["train"]]
    splits = {
        split: ArraySource(
            {
                "image": _standardise(images[r], train_images, normalize)[..., None],
                "index": r.astype(np.int32),
                "label": labels[r],
            }
        )
        for split, r in rows.items()
    }
    tasks = {"label": TaskInfo("label", "classification", 10, "label")}
    return Dataset("digits", splits, (DIGIT, DIGIT, 1), tasks)


def _place(images: np.ndarray, top: np.ndarray, left: np.ndarray, canvas: int) -> np.ndarray:
    """Each image [n, 8, 8] pasted on an empty canvas [n, canvas, canvas] at (top, left)."""
    n, h, w = images.shape
    out = np.zeros((n, canvas, canvas), np.float32)
    rows = (top[:, None] + np.arange(h))[:, :, None]
    cols = (left[:, None] + np.arange(w))[:, None, :]
    out[np.arange(n)[:, None, None], rows, cols] = images
    return out


def _overlay_pairs(
    rng: np.random.Generator, pool: np.ndarray, n: int, canvas: int, max_shift: int
) -> dict[str, np.ndarray]:
    """n canvases, each the max of two distinct digits of `pool` (sklearn row ids)."""
    if len(pool) < 2:
        raise ValueError("a multidigits split needs at least 2 source digits")
    images, labels = _load_digits()
    first = rng.integers(len(pool), size=n)
    second = (first + rng.integers(1, len(pool), size=n)) % len(pool)  # never the same image
    src_left, src_right = pool[first], pool[second]
    dy, dx, dy2, dx2 = rng.integers(0, max_shift + 1, size=(4, n))
    far = canvas - DIGIT
    image = np.maximum(
        _place(images[src_left], dy, dx, canvas),
        _place(images[src_right], far - dy2, far - dx2, canvas),
    )
    left, right = labels[src_left], labels[src_right]
    return {
        "image": image,
        "index": np.arange(n, dtype=np.int32),
        "left": left,
        "right": right,
        "sum": left + right,
        "same_parity": (left % 2 == right % 2).astype(np.int32),
        "left_gt_right": (left > right).astype(np.int32),
        "ink": image.mean(axis=(1, 2)),
        "src_left": src_left.astype(np.int32),
        "src_right": src_right.astype(np.int32),
    }


def multidigits(
    *,
    seed: int = 0,
    canvas: int = 12,
    max_shift: int = 2,
    num_train: int = 20000,
    num_val: int = 2000,
    num_test: int = 2000,
    fractions=(0.6, 0.2, 0.2),
    normalize: bool = True,
    label_noise: dict | None = None,
    shuffled_copies: tuple = (),
    copies: tuple = (),
) -> Dataset:
    if max_shift < 0 or canvas < DIGIT + max_shift:
        raise ValueError(
            f"need max_shift >= 0 and canvas >= {DIGIT} + max_shift, "
            f"got canvas={canvas}, max_shift={max_shift}"
        )
    sizes = (num_train, num_val, num_test)
    if min(sizes) < 1:
        raise ValueError(f"multidigits split sizes must be positive, got {sizes}")
    rows = split_digits(seed, fractions)
    raw = {
        split: _overlay_pairs(np.random.default_rng([seed, k]), rows[split], n, canvas, max_shift)
        for k, (split, n) in enumerate(zip(SPLITS, sizes))
    }
    train_image, train_ink = raw["train"]["image"], raw["train"]["ink"]
    for arrays in raw.values():
        arrays["image"] = _standardise(arrays["image"], train_image, normalize)[..., None]
        arrays["ink"] = _standardise(arrays["ink"], train_ink)
    tasks = {
        "left": TaskInfo("left", "classification", 10, "left"),
        "right": TaskInfo("right", "classification", 10, "right"),
        "sum": TaskInfo("sum", "classification", 19, "sum"),
        "same_parity": TaskInfo("same_parity", "classification", 2, "same_parity"),
        "left_gt_right": TaskInfo("left_gt_right", "classification", 2, "left_gt_right"),
        "ink": TaskInfo("ink", "regression", 0, "ink"),
    }
    for name in shuffled_copies:  # a task made to hurt: its labels carry no signal
        if name not in tasks:
            raise ValueError(f"shuffled_copies names task {name!r}; tasks are {', '.join(tasks)}")
        info, copy = tasks[name], f"{name}_shuffled"
        for k, arrays in enumerate(raw.values()):
            rng = np.random.default_rng([seed, 11, list(tasks).index(name), k])
            arrays[copy] = rng.permutation(arrays[info.label_key])
        tasks[copy] = TaskInfo(copy, info.kind, info.num_classes, copy)
    for name in copies:  # a task made to help: the same labels, a head of its own
        if name not in tasks:
            raise ValueError(f"copies names task {name!r}; tasks are {', '.join(tasks)}")
        info, copy = tasks[name], f"{name}_copy"
        for arrays in raw.values():
            arrays[copy] = arrays[info.label_key].copy()
        tasks[copy] = TaskInfo(copy, info.kind, info.num_classes, copy)
    _corrupt_labels(raw["train"], tasks, dict(label_noise or {}), seed)
    splits = {split: ArraySource(arrays) for split, arrays in raw.items()}
    return Dataset("multidigits", splits, (canvas, canvas, 1), tasks)


def _corrupt_labels(arrays: dict, tasks: dict, label_noise: dict, seed: int) -> None:
    """Symmetric label noise / Gaussian target noise on `arrays` in place (module docstring)."""
    for name, rate in label_noise.items():
        if name not in tasks:
            raise ValueError(f"label_noise names task {name!r}; tasks are {', '.join(tasks)}")
        info = tasks[name]
        limit = 1.0 if info.kind == "classification" else np.inf
        if not 0.0 <= float(rate) <= limit:
            raise ValueError(f"label_noise[{name!r}]={rate!r} must lie in [0, {limit}]")
        rng = np.random.default_rng([seed, 7, list(tasks).index(name)])
        labels = arrays[info.label_key]
        n = len(labels)
        if info.kind == "classification":
            flip = rng.random(n) < rate
            drawn = rng.integers(info.num_classes, size=n).astype(labels.dtype)
            arrays[info.label_key] = np.where(flip, drawn, labels)
        else:
            noise = rng.standard_normal(n).astype(labels.dtype)
            arrays[info.label_key] = labels + np.float32(rate) * noise
