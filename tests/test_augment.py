"""Training-time augmentation (`data/augment.py`): crop + flip against a per-pixel reference,
its draws in the training stream (deterministic by (seed, step), the same global batch for any
process count, exact after a restart), evaluation untouched, and the config checks."""

import numpy as np
import pytest
from conftest import tiny_config

from hisd_jax import data as data_lib
from hisd_jax import experiment as experiment_lib
from hisd_jax import loop as loop_lib
from hisd_jax.config import ConfigError
from hisd_jax.data import augment


def reference_crop_flip(images, dy, dx, flip, padding):
    """Pixel by pixel, in float64: output (i, j) reads input (i + dy - p, j' + dx - p), with
    j' = W - 1 - j when flipped, and 0 outside the image."""
    n, h, w, c = images.shape
    out = np.zeros((n, h, w, c), np.float64)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                jj = w - 1 - j if flip[b] else j
                y, x = i + dy[b] - padding, jj + dx[b] - padding
                if 0 <= y < h and 0 <= x < w:
                    out[b, i, j] = images[b, y, x]
    return out


@pytest.mark.parametrize("padding", [0, 1, 4])
def test_crop_flip_equals_a_per_pixel_reference(padding):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 5, 7, 2)).astype(np.float32)
    span = 2 * padding + 1
    dy, dx = rng.integers(0, span, 6), rng.integers(0, span, 6)
    dy[:2], dx[:2] = [0, span - 1], [span - 1, 0]  # the extreme corners
    flip = np.array([True, False, True, False, True, False])
    got = augment.crop_flip(images, dy, dx, flip, padding=padding)
    assert got.dtype == np.float32 and got.shape == images.shape
    np.testing.assert_array_equal(got, reference_crop_flip(images, dy, dx, flip, padding))
    if padding == 0:  # no room to move: identity, or a mirror image
        np.testing.assert_array_equal(got[1], images[1])
        np.testing.assert_array_equal(got[0], images[0][:, ::-1])
    with pytest.raises(ValueError, match="crop offsets"):
        augment.crop_flip(images, dy + span, dx, flip, padding=padding)


def test_draws_cover_every_offset_and_flip_half_the_rows():
    draws = augment.CropFlip(padding=2).draw(np.random.default_rng(1), 20000)
    assert set(np.unique(draws["dy"])) == set(range(5)) == set(np.unique(draws["dx"]))
    counts = np.bincount(draws["dy"] * 5 + draws["dx"], minlength=25)
    assert counts.min() > 0.8 * 20000 / 25
    assert abs(draws["flip"].mean() - 0.5) < 0.02


def stream(
    source, *, process_index=0, process_count=1, seed=3, aug=None, steps=5, start=0, size=16
):
    it = data_lib.BatchIterator(
        source,
        size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        prefetch=2,
        augment=aug,
    )
    it.set_state({"step": start, "seed": seed})
    out = [next(it) for _ in range(steps)]
    it.close()
    return out


def test_the_training_stream_is_augmented_by_seed_and_step_alone():
    exp = experiment_lib.build_experiment(tiny_config(data__augment="crop_flip"))
    source, aug = exp.dataset.splits["train"], exp.augment
    assert aug == augment.CropFlip(padding=4, key="image")
    plain, augmented = stream(source), stream(source, aug=aug)
    for s, (p, a) in enumerate(zip(plain, augmented)):
        np.testing.assert_array_equal(p["position"], a["position"])  # the same examples
        assert not np.array_equal(p["image"], a["image"])
        draws = aug.draw(np.random.default_rng([3, augment.STREAM, s]), 16)
        np.testing.assert_array_equal(
            a["image"], reference_crop_flip(p["image"], **draws, padding=4).astype(np.float32)
        )
        for k in p:
            if k != "image":
                np.testing.assert_array_equal(p[k], a[k])
    # Two processes' halves make the same global batch; a restart at step 3 continues exactly.
    halves = [stream(source, process_index=i, process_count=2, aug=aug) for i in (0, 1)]
    for s in range(5):
        joined = np.concatenate([halves[0][s]["image"], halves[1][s]["image"]])
        np.testing.assert_array_equal(joined, augmented[s]["image"])
    for s, batch in enumerate(stream(source, aug=aug, steps=2, start=3), start=3):
        np.testing.assert_array_equal(batch["image"], augmented[s]["image"])
    # Evaluation batches are never augmented.
    first = next(data_lib.eval_batches(exp.dataset.splits["val"], 16))
    np.testing.assert_array_equal(
        first["image"], exp.dataset.splits["val"].get_batch(np.arange(16))["image"]
    )


def test_augmentation_config_is_checked_before_anything_runs():
    with pytest.raises(ConfigError, match="data.augment='flip'.*none, crop_flip"):
        experiment_lib.build_experiment(tiny_config(data__augment="flip"))
    with pytest.raises(ConfigError, match="data.crop_padding"):
        experiment_lib.build_experiment(
            tiny_config(data__augment="crop_flip", data__crop_padding=-1)
        )
    config = tiny_config(data__name="pycode", data__tasks=("package",), data__augment="crop_flip")
    config.model.name = "transformer"
    with pytest.raises(ConfigError, match="data.augment='crop_flip' needs images"):
        experiment_lib.build_experiment(config)
    assert experiment_lib.build_experiment(tiny_config()).augment is None


def test_the_trainer_reads_the_augmented_stream(tmp_path):
    config = tiny_config(data__augment="crop_flip")
    config.seed = 5
    exp = experiment_lib.build_experiment(config)
    with loop_lib.Loop(exp, str(tmp_path)) as loop:
        got = [next(loop.iterator) for _ in range(2)]
    want = stream(exp.dataset.splits["train"], seed=5, aug=exp.augment, steps=2, size=32)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["image"], w["image"])
