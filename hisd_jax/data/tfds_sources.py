"""TFDS datasets, read through `tfds.data_source` (random access, no TensorFlow) and grain.

mnist, cifar10, cifar100: 'train' is the first records of the TFDS train split, 'val' its last
round(n * val_fraction) records (index arithmetic on the full split, which also works under
`tfds.testing.mock_data`), 'test' the TFDS test split. 'index' is the record's position in the
full TFDS train (or test) split, so it does not move when `val_fraction` changes the split sizes.
Tasks: 'label' (10 / 10 / 100 classes) and, for cifar100, 'coarse_label' (20).

multimnist (MultiMNIST, Sabour et al. 2017, here at 28x28): the example of a split whose left
digit is record i of the TFDS split puts record i at the top-left and a partner record of the
same split at the bottom-right of a 36x36 canvas, each shifted by up to 4 px (left at (dy, dx),
right at (8 - dy', 8 - dx')), combined by pixel-wise max and resized bilinearly to 28x28. The
partner and shifts come from `np.random.default_rng([seed, split_number, i])`, so each example
is generated lazily and deterministically. 'index' is i. Tasks: 'left' (the target) and
'right'; extras 'src_left', 'src_right' (positions in the full TFDS split).

Normalisation (`NORMALIZATION`, per channel, on [0, 1] pixels): the usual published training-set
statistics; multimnist uses the MNIST ones.

Nothing is downloaded (`download=False`): prepare the data with TFDS beforehand, in a
random-access file format (`prepare_command`), and pass `data_dir` if it is not TFDS's default
directory; a data set not prepared so is refused in one line (`data_source`). The `seed` of
mnist/cifar is unused (their splits are fixed); it is accepted so that every builder has the
same signature.
"""

from __future__ import annotations

import functools
import logging as std_logging

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from PIL import Image

from hisd_jax.data import Dataset, TaskInfo
from hisd_jax.errors import ConfigError

NORMALIZATION = {  # name -> (mean, std) per channel
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
SPLITS = ("train", "val", "test")
CANVAS, MAX_SHIFT, SIZE = 36, 4, 28  # multimnist


class GrainSource:
    """A split as a grain MapDataset of decoded examples; get_batch reads per item and stacks."""

    def __init__(self, dataset: grain.MapDataset):
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self._dataset[int(i)] for i in indices]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def prepare_command(name: str) -> str:
    """The command that prepares TFDS data set `name` once (with network) in a format
    `tfds.data_source` reads (TFDS's default, TFRecord, has no random access)."""
    return (
        'python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{name}').download_and_prepare(file_format='array_record')\""
    )


def data_source(name: str, split: str, data_dir):
    """`tfds.data_source(name, split)` without downloading. ConfigError (one line) when the data
    set is not prepared in `data_dir` (None: TFDS's default directory) in a random-access
    format, naming the command that prepares it."""
    logger = absl_logging.get_absl_logger()  # TFDS warns about a missing dataset_info.json
    level = logger.level  # in the same breath: the error below says it in its one line
    logger.setLevel(std_logging.ERROR)
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 - KeyError (no splits), NotImplementedError (TFRecord),
        # DatasetNotFoundError, ...: all mean the same to the user
        why = " ".join(str(e).split())[:160]
        where = data_dir or "TFDS's default directory"
        raise ConfigError(
            f"data.name: TFDS {name!r} split {split!r} cannot be read from {where} "
            f"({type(e).__name__}: {why}); prepare it once with network: {prepare_command(name)}"
        ) from None
    finally:
        logger.setLevel(level)


def _splits(name: str, data_dir, val_fraction: float) -> dict[str, tuple]:
    """split -> (TFDS data source, first, stop): the split is records [first, stop) of it."""
    train, test = (data_source(name, s, data_dir) for s in ("train", "test"))
    n_val = round(len(train) * val_fraction)
    if not 0 < n_val < len(train):
        raise ValueError(
            f"val_fraction={val_fraction} leaves no train or no val records out of {len(train)}"
        )
    return {
        "train": (train, 0, len(train) - n_val),
        "val": (train, len(train) - n_val, len(train)),
        "test": (test, 0, len(test)),
    }


def _scale(image: np.ndarray, mean, std) -> np.ndarray:
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return (image.astype(np.float32) / 255 - mean) / std


def _decode(position: int, record: dict, *, first: int, mean, std, label_keys) -> dict:
    out = {"image": _scale(record["image"], mean, std), "index": np.int32(first + position)}
    out.update({key: np.int32(record[key]) for key in label_keys})
    return out


def _classification(name: str, data_dir, val_fraction: float, normalize: bool) -> Dataset:
    mean, std = NORMALIZATION[name] if normalize else (0.0, 1.0)
    splits = _splits(name, data_dir, val_fraction)
    features = splits["train"][0].dataset_info.features
    label_keys = [key for key in ("label", "coarse_label") if key in features]
    tasks = {
        key: TaskInfo(key, "classification", features[key].num_classes, key) for key in label_keys
    }
    sources = {
        split: GrainSource(
            grain.MapDataset.source(data)[first:stop].map_with_index(
                functools.partial(_decode, first=first, mean=mean, std=std, label_keys=label_keys)
            )
        )
        for split, (data, first, stop) in splits.items()
    }
    return Dataset(name, sources, tuple(features["image"].shape), tasks)


def mnist(*, seed: int = 0, data_dir=None, val_fraction: float = 0.1, normalize: bool = True):
    return _classification("mnist", data_dir, val_fraction, normalize)


def cifar10(*, seed: int = 0, data_dir=None, val_fraction: float = 0.1, normalize: bool = True):
    return _classification("cifar10", data_dir, val_fraction, normalize)


def cifar100(*, seed: int = 0, data_dir=None, val_fraction: float = 0.1, normalize: bool = True):
    return _classification("cifar100", data_dir, val_fraction, normalize)


def _pair(index: int, *, data, first: int, stop: int, key: tuple[int, int], mean, std) -> dict:
    """MultiMNIST example whose left digit is record `index` of `data` (see the module doc)."""
    rng = np.random.default_rng([*key, index])
    partner = first + (index - first + rng.integers(1, stop - first)) % (stop - first)
    dy, dx, dy2, dx2 = rng.integers(0, MAX_SHIFT + 1, size=4)
    left, right = data[index], data[partner]
    canvas = np.zeros((CANVAS, CANVAS), np.float32)
    canvas[dy : dy + SIZE, dx : dx + SIZE] = left["image"][..., 0]
    far = CANVAS - SIZE
    region = (slice(far - dy2, CANVAS - dy2), slice(far - dx2, CANVAS - dx2))
    canvas[region] = np.maximum(canvas[region], right["image"][..., 0])
    image = np.asarray(Image.fromarray(canvas).resize((SIZE, SIZE), Image.BILINEAR))
    return {
        "image": _scale(image, mean, std)[..., None],
        "index": np.int32(index),
        "left": np.int32(left["label"]),
        "right": np.int32(right["label"]),
        "src_left": np.int32(index),
        "src_right": np.int32(partner),
    }


def multimnist(
    *, seed: int = 0, data_dir=None, val_fraction: float = 0.1, normalize: bool = True
) -> Dataset:
    mean, std = NORMALIZATION["mnist"] if normalize else (0.0, 1.0)
    sources = {}
    splits = _splits("mnist", data_dir, val_fraction)
    for number, (split, (data, first, stop)) in enumerate(splits.items()):
        if stop - first < 2:
            raise ValueError(f"multimnist split {split!r} needs at least 2 records")
        render = functools.partial(
            _pair, data=data, first=first, stop=stop, key=(seed, number), mean=mean, std=std
        )
        sources[split] = GrainSource(grain.MapDataset.range(first, stop).map(render))
    tasks = {
        "left": TaskInfo("left", "classification", 10, "left"),
        "right": TaskInfo("right", "classification", 10, "right"),
    }
    return Dataset("multimnist", sources, (SIZE, SIZE, 1), tasks)
