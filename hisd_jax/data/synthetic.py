"""Synthetic images of any shape: for benchmarks and memory accounting of paper-scale models
(ResNet-50 at 224x224) on machines without the real data. Nothing here is learnable on purpose.

`synthetic(image_shape=(224, 224, 3), num_classes=1000, sizes=(1024, 256, 256))`: example i of
a split is standard-normal noise drawn from `np.random.default_rng([seed, split, i])` (generated
when read, nothing held in memory) with label i % num_classes; 'index' is i. Task: 'label'.
"""

from __future__ import annotations

import numpy as np

from hisd_jax.data import Dataset, TaskInfo

SPLITS = ("train", "val", "test")


class NoiseSource:
    """One split of `size` examples, each generated from (seed, split number, index)."""

    def __init__(self, size: int, shape, num_classes: int, key: tuple[int, int]):
        self._size, self._shape, self._classes, self._key = size, tuple(shape), num_classes, key

    def __len__(self) -> int:
        return self._size

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        images = np.stack([
            np.random.default_rng([*self._key, int(i)]).standard_normal(self._shape, np.float32)
            for i in indices
        ])  # fmt: skip
        return {
            "image": images,
            "index": indices.astype(np.int32),
            "label": (indices % self._classes).astype(np.int32),
        }

    def label_array(self, key: str) -> np.ndarray:
        """Every row's label (read by `data.check_labels`)."""
        return (np.arange(self._size) % self._classes).astype(np.int32)


def synthetic(
    *, seed: int = 0, image_shape=(224, 224, 3), num_classes: int = 1000, sizes=(1024, 256, 256)
) -> Dataset:
    """See the module docstring. ValueError naming the argument for a bad shape, class count
    or split size."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"data.kwargs.image_shape={tuple(image_shape)} must be (H, W, C) >= 1")
    if int(num_classes) < 2:
        raise ValueError(f"data.kwargs.num_classes={num_classes} must be >= 2")
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"data.kwargs.sizes={tuple(sizes)} must be 3 split sizes >= 1")
    sources = {
        split: NoiseSource(int(n), shape, int(num_classes), (seed, number))
        for number, (split, n) in enumerate(zip(SPLITS, sizes))
    }
    task = TaskInfo("label", "classification", int(num_classes), "label")
    return Dataset("synthetic", sources, shape, {"label": task})
