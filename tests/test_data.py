"""Embedded datasets (digits, multidigits) and the batch pipeline."""

import itertools
import json
import threading

import numpy as np
import pytest
from sklearn.datasets import load_digits

from hisd_jax.data import (
    DATASETS,
    BatchIterator,
    TaskInfo,
    eval_batches,
    get_dataset,
    steps_per_epoch,
)
from hisd_jax.data.embedded import ArraySource

SKLEARN = load_digits()
SIZES = dict(num_train=3000, num_val=500, num_test=500)


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def multidigits():
    return get_dataset("multidigits", seed=0, **SIZES)


def everything(source):
    return source.get_batch(np.arange(len(source)))


def test_registry():
    assert DATASETS == (
        "digits", "multidigits", "mnist", "cifar10", "cifar100", "multimnist", "pycode",
        "pycode_search", "glue", "synthetic",
    )  # fmt: skip
    message = (
        r"^data.name='x' is not one of digits, multidigits, mnist, cifar10, cifar100, "
        r"multimnist, pycode, pycode_search, glue, synthetic$"
    )
    with pytest.raises(ValueError, match=message):
        get_dataset("x")


def test_digits_splits_disjoint_and_cover_all(digits):
    assert set(digits.splits) == {"train", "val", "test"}
    rows = {split: everything(source)["index"] for split, source in digits.splits.items()}
    all_rows = np.concatenate(list(rows.values()))
    assert len(all_rows) == 1797 and set(all_rows) == set(range(1797))
    assert abs(len(rows["train"]) - 0.6 * 1797) < 10 and abs(len(rows["val"]) - 0.2 * 1797) < 10
    assert digits.image_shape == (8, 8, 1)
    assert list(digits.tasks) == ["label"] and digits.tasks["label"].num_classes == 10


def test_digits_content_and_normalisation(digits):
    raw = get_dataset("digits", seed=0, normalize=False)
    for split in ("train", "test"):
        batch = everything(raw.splits[split])
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        assert batch["index"].dtype == np.int32
        np.testing.assert_array_equal(batch["label"], SKLEARN.target[batch["index"]])
        np.testing.assert_allclose(batch["image"][..., 0], SKLEARN.images[batch["index"]] / 16)
    train = everything(digits.splits["train"])["image"]
    assert abs(train.mean()) < 1e-4 and abs(train.std() - 1) < 1e-4


def test_digits_split_depends_on_seed(digits):
    other = get_dataset("digits", seed=1)
    assert not np.array_equal(
        everything(digits.splits["val"])["index"], everything(other.splits["val"])["index"]
    )


def test_multidigits_sources_never_cross_splits(multidigits, digits):
    sources = {}
    for split, source in multidigits.splits.items():
        batch = everything(source)
        assert len(source) == SIZES[f"num_{split}"]
        np.testing.assert_array_equal(batch["index"], np.arange(len(source)))
        assert (batch["src_left"] != batch["src_right"]).all()
        sources[split] = set(batch["src_left"]) | set(batch["src_right"])
        # Drawn from the digits split of the same seed.
        assert sources[split] <= set(everything(digits.splits[split])["index"])
    for a, b in itertools.combinations(sources.values(), 2):
        assert not a & b


def test_multidigits_labels(multidigits):
    for source in multidigits.splits.values():
        b = everything(source)
        np.testing.assert_array_equal(b["left"], SKLEARN.target[b["src_left"]])
        np.testing.assert_array_equal(b["right"], SKLEARN.target[b["src_right"]])
        np.testing.assert_array_equal(b["sum"], b["left"] + b["right"])
        np.testing.assert_array_equal(b["same_parity"], b["left"] % 2 == b["right"] % 2)
        np.testing.assert_array_equal(b["left_gt_right"], b["left"] > b["right"])
        for key, task in multidigits.tasks.items():
            assert task.label_key == key
            if task.kind == "classification":
                assert b[key].dtype == np.int32
                assert 0 <= b[key].min() and b[key].max() < task.num_classes
            else:
                assert b[key].dtype == np.float32
    assert multidigits.tasks["sum"].num_classes == 19
    assert multidigits.tasks["ink"].kind == "regression"
    train = everything(multidigits.splits["train"])
    assert abs(train["ink"].mean()) < 1e-4 and abs(train["ink"].std() - 1) < 1e-3
    assert abs(train["image"].mean()) < 1e-4 and abs(train["image"].std() - 1) < 1e-3
    # ink is an affine function of the raw canvas's mean intensity.
    raw = everything(get_dataset("multidigits", seed=0, normalize=False, **SIZES).splits["train"])
    assert np.corrcoef(raw["image"].mean(axis=(1, 2, 3)), raw["ink"])[0, 1] > 0.99999


def test_multidigits_label_noise_corrupts_training_labels_only(multidigits):
    noise = {"left": 0.5, "same_parity": 0.2, "ink": 0.3}
    noisy = get_dataset("multidigits", seed=0, label_noise=noise, **SIZES)
    for split in ("val", "test"):  # clean
        for key in ("left", "same_parity", "ink", "right"):
            np.testing.assert_array_equal(
                everything(noisy.splits[split])[key], everything(multidigits.splits[split])[key]
            )
    got, clean = everything(noisy.splits["train"]), everything(multidigits.splits["train"])
    np.testing.assert_array_equal(got["image"], clean["image"])
    np.testing.assert_array_equal(got["right"], clean["right"])  # no noise asked
    np.testing.assert_array_equal(got["sum"], clean["sum"])  # its own labels, not left + right
    n = len(clean["left"])
    for task, classes in (("left", 10), ("same_parity", 2)):
        # A flipped label keeps its class with probability 1/C: P(change) = rate (1 - 1/C).
        want = noise[task] * (1 - 1 / classes)
        changed = np.mean(got[task] != clean[task])
        assert abs(changed - want) < 4 * np.sqrt(want * (1 - want) / n), (task, changed, want)
        assert got[task].dtype == np.int32 and got[task].max() < classes and got[task].min() >= 0
    residual = got["ink"] - clean["ink"]
    assert abs(residual.std() - 0.3) < 4 * 0.3 / np.sqrt(2 * n) and abs(residual.mean()) < 0.05
    again = everything(
        get_dataset("multidigits", seed=0, label_noise=noise, **SIZES).splits["train"]
    )
    np.testing.assert_array_equal(again["left"], got["left"])  # fixed by the seed


def test_multidigits_shuffled_copies_keep_the_label_distribution_and_lose_the_signal(
    multidigits,
):
    got = get_dataset("multidigits", seed=0, shuffled_copies=("left",), **SIZES)
    assert got.tasks["left_shuffled"] == TaskInfo(
        "left_shuffled", "classification", 10, "left_shuffled"
    )
    for split in ("train", "val", "test"):
        b, clean = everything(got.splits[split]), everything(multidigits.splits[split])
        np.testing.assert_array_equal(b["left"], clean["left"])
        np.testing.assert_array_equal(np.sort(b["left_shuffled"]), np.sort(b["left"]))
        agree = np.mean(b["left_shuffled"] == b["left"])
        chance = np.sum(np.bincount(b["left"], minlength=10) ** 2) / len(b["left"]) ** 2
        assert abs(agree - chance) < 4 * np.sqrt(chance / len(b["left"])), (split, agree, chance)
    with pytest.raises(ValueError, match="shuffled_copies names task 'up'"):
        get_dataset("multidigits", seed=0, shuffled_copies=("up",), **SIZES)


@pytest.mark.parametrize(
    "noise, message",
    [({"up": 0.1}, "label_noise names task 'up'"), ({"left": 1.5}, r"must lie in \[0, 1.0\]")],
)
def test_multidigits_label_noise_rejects_bad_values(noise, message):
    with pytest.raises(ValueError, match=message):
        get_dataset("multidigits", seed=0, label_noise=noise, **SIZES)


def test_multidigits_reconstructs_from_sklearn_images():
    """Every canvas is max(left at (dy, dx), right at (4 - dy', 4 - dx')) for shifts in [0, 2]."""
    data = get_dataset("multidigits", seed=3, normalize=False, num_train=20, num_val=2, num_test=2)
    batch = everything(data.splits["train"])
    images = (SKLEARN.images / 16).astype(np.float32)
    for image, left, right in zip(batch["image"][..., 0], batch["src_left"], batch["src_right"]):
        matches = []
        for dy, dx, dy2, dx2 in itertools.product(range(3), repeat=4):
            a, b = np.zeros((12, 12), np.float32), np.zeros((12, 12), np.float32)
            a[dy : dy + 8, dx : dx + 8] = images[left]
            b[4 - dy2 : 12 - dy2, 4 - dx2 : 12 - dx2] = images[right]
            matches.append(np.array_equal(np.maximum(a, b), image))
        assert any(matches)


def test_multidigits_determinism_and_config():
    a = get_dataset("multidigits", seed=5, num_train=200, num_val=20, num_test=20)
    b = get_dataset("multidigits", seed=5, num_train=200, num_val=20, num_test=20)
    c = get_dataset("multidigits", seed=6, num_train=200, num_val=20, num_test=20)
    for split in ("train", "val", "test"):
        x, y, z = (everything(d.splits[split]) for d in (a, b, c))
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
        assert not np.array_equal(x["src_left"], z["src_left"])
    big = get_dataset("multidigits", canvas=16, max_shift=4, num_train=10, num_val=2, num_test=2)
    assert big.image_shape == (16, 16, 1)
    assert big.splits["val"].get_batch(np.arange(2))["image"].shape == (2, 16, 16, 1)
    with pytest.raises(ValueError, match="canvas"):
        get_dataset("multidigits", canvas=10, max_shift=3)
    with pytest.raises(ValueError, match="fractions"):
        get_dataset("multidigits", fractions=(0.5, 0.5, 0.5))


def check_positions(source, global_batch_size, seed=3):
    """'position' is the row of the example in its split: eval_batches gives 0..N-1 once each
    (padding repeats row 0, masked), one epoch of BatchIterator (shuffled, whole or split over
    2 processes) visits every row once, and get_batch(position) gives the same examples."""
    n = len(source)

    def same_examples(batch):
        again = source.get_batch(batch["position"])
        for key, value in again.items():
            np.testing.assert_array_equal(value, batch[key], err_msg=key)

    batches = list(eval_batches(source, global_batch_size))
    for batch in batches:
        assert batch["position"].dtype == np.int32
        np.testing.assert_array_equal(batch["position"][batch["mask"] == 0], 0)
        same_examples(batch)
    masked = np.concatenate([b["position"][b["mask"] == 1] for b in batches])
    np.testing.assert_array_equal(masked, np.arange(n))
    halves = [list(eval_batches(source, global_batch_size, process_index=p, process_count=2))
              for p in range(2)]  # fmt: skip
    masked = [b["position"][b["mask"] == 1] for step in zip(*halves) for b in step]
    np.testing.assert_array_equal(np.concatenate(masked), np.arange(n))

    whole = BatchIterator(source, global_batch_size, seed=seed)
    shards = [
        BatchIterator(source, global_batch_size, seed=seed, process_index=p, process_count=2)
        for p in range(2)
    ]
    assert whole.steps_per_epoch == shards[0].steps_per_epoch == -(-n // global_batch_size)
    epoch = []
    for _ in range(whole.steps_per_epoch):
        batch, parts = next(whole), [next(shard) for shard in shards]
        assert batch["position"].dtype == np.int32
        np.testing.assert_array_equal(
            np.concatenate([p["position"] for p in parts]), batch["position"]
        )
        same_examples(batch)
        epoch.append(batch["position"])
    epoch = np.concatenate(epoch)[:n]  # the last batch may straddle into the next epoch
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    if n > 2:
        assert not np.array_equal(epoch, np.arange(n))  # shuffled
    for it in [whole, *shards]:
        it.close()


@pytest.mark.parametrize("name, batch_size", [("digits", 64), ("multidigits", 256)])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_position_is_the_row_in_the_split(request, name, batch_size, split):
    check_positions(request.getfixturevalue(name).splits[split], batch_size)


# ---------------------------------------------------------------- pipeline

N = 50


def toy_source(n=N):
    return ArraySource(
        {"index": np.arange(n, dtype=np.int32), "x": np.arange(n, dtype=np.float32)[:, None] * 2}
    )


def take(iterator, k):
    return [next(iterator)["index"] for _ in range(k)]


def test_same_seed_same_batches_and_prefetch_does_not_matter():
    its = [BatchIterator(toy_source(), 8, seed=1, prefetch=p) for p in (0, 1, 2, 2)]
    other = BatchIterator(toy_source(), 8, seed=2)
    runs = [take(it, 20) for it in its]
    for run in runs[1:]:
        np.testing.assert_array_equal(runs[0], run)
    assert not np.array_equal(runs[0], take(other, 20))
    for it in [*its, other]:
        it.close()


def test_epochs_are_seeded_permutations_visited_once():
    it = BatchIterator(toy_source(), 7, seed=4)  # 7 does not divide 50: batches straddle epochs
    stream = np.concatenate(take(it, 15))  # 105 positions: two full epochs and a bit
    it.close()
    for epoch in range(2):
        order = stream[epoch * N : (epoch + 1) * N]
        np.testing.assert_array_equal(order, np.random.default_rng([4, epoch]).permutation(N))
    assert not np.array_equal(stream[:N], stream[N : 2 * N])
    plain = BatchIterator(toy_source(), 20, seed=4, shuffle=False, prefetch=0)
    np.testing.assert_array_equal(np.concatenate(take(plain, 5)), np.tile(np.arange(N), 2))


def test_batch_contents_follow_indices():
    it = BatchIterator(toy_source(), 10, seed=0, prefetch=0)
    batch = next(it)
    np.testing.assert_array_equal(batch["x"][:, 0], batch["index"] * 2)


def test_resume_is_exact():
    it = BatchIterator(toy_source(), 8, seed=3)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    assert state == {"step": 7, "seed": 3}
    expected = take(it, 9)
    fresh = BatchIterator(toy_source(), 8, seed=3)
    fresh.set_state(state)  # before the first next()
    np.testing.assert_array_equal(take(fresh, 9), expected)
    it.set_state({"step": 7, "seed": 3})  # rewind while the prefetch thread runs
    np.testing.assert_array_equal(take(it, 9), expected)
    for i in (it, fresh):
        i.close()


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_make_the_global_batch(process_count):
    whole = BatchIterator(toy_source(), 12, seed=0)
    shards = [
        BatchIterator(toy_source(), 12, seed=0, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    for _ in range(10):
        expected = next(whole)["index"]
        parts = [next(s)["index"] for s in shards]
        assert all(len(p) == 12 // process_count for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), expected)
    for it in [whole, *shards]:
        it.close()


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_batches_cover_each_example_once(process_count):
    per_process = [
        list(eval_batches(toy_source(), 16, process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    assert all(len(b) == 4 for b in per_process)  # ceil(50 / 16)
    seen = []
    for step in range(4):
        batch = {k: np.concatenate([b[step][k] for b in per_process]) for k in ("index", "mask")}
        assert batch["mask"].dtype == np.float32 and len(batch["mask"]) == 16
        seen.append(batch["index"][batch["mask"] == 1])
        expected_mask = (step * 16 + np.arange(16) < N).astype(np.float32)
        np.testing.assert_array_equal(batch["mask"], expected_mask)
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(N))


def test_steps_per_epoch():
    assert steps_per_epoch(50, 8) == 7 and steps_per_epoch(48, 8) == 6
    assert steps_per_epoch(1, 8) == 1 and steps_per_epoch(0, 8) == 0
    with pytest.raises(ValueError):
        steps_per_epoch(50, 0)
    with pytest.raises(ValueError):
        steps_per_epoch(-1, 8)
    assert BatchIterator(toy_source(), 7, seed=0, prefetch=0).steps_per_epoch == 8
    shard = BatchIterator(toy_source(), 10, seed=0, process_index=1, process_count=2, prefetch=0)
    assert shard.steps_per_epoch == 5  # global batches, whatever the process count
    # An epoch of that many steps visits every example (the stream of the module doc).
    it = BatchIterator(toy_source(), 7, seed=1, prefetch=0)
    seen = np.concatenate(take(it, it.steps_per_epoch))
    assert set(seen[:N]) == set(range(N)) and len(seen) >= N > len(seen) - 7


def test_bad_arguments():
    src = toy_source()
    for kwargs in (
        dict(global_batch_size=0),
        dict(global_batch_size=10, process_count=3),
        dict(global_batch_size=10, process_count=2, process_index=2),
        dict(global_batch_size=10, process_index=-1),
    ):
        with pytest.raises(ValueError):
            BatchIterator(src, seed=0, **kwargs)
        with pytest.raises(ValueError):
            eval_batches(src, **kwargs)
    with pytest.raises(ValueError):
        BatchIterator(src, 10, seed=0, prefetch=-1)
    with pytest.raises(ValueError):
        BatchIterator(toy_source(0), 10, seed=0)
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(src, 10, seed=0).set_state({"step": 3, "seed": 1})


def prefetch_threads():
    return sum(t.name == "BatchIterator" for t in threading.enumerate())


def test_threads_are_closed_and_errors_propagate():
    before = prefetch_threads()
    its = [BatchIterator(toy_source(), 8, seed=0) for _ in range(3)]
    for it in its:
        next(it)
        it.set_state({"step": 0, "seed": 0})
        next(it)
    assert prefetch_threads() == before + 3
    for it in its:
        it.close()
    assert prefetch_threads() == before

    class Broken:
        def __len__(self):
            return 10

        def get_batch(self, indices):
            raise RuntimeError("broken source")

    it = BatchIterator(Broken(), 2, seed=0)
    with pytest.raises(RuntimeError, match="broken source"):
        next(it)
    assert it.get_state()["step"] == 0
    it.close()


def test_labels_outside_their_classes_are_one_line_errors():
    """A -1 ("missing") label, a label equal to the class count, a float label and a NaN
    regression target: errors.DataError naming the data set, split, task and first bad position
    (before, -1 trained silently as class C-1 and C gave NaN losses)."""
    from hisd_jax import data as data_lib  # noqa: PLC0415
    from hisd_jax.data.embedded import ArraySource  # noqa: PLC0415
    from hisd_jax.errors import DataError  # noqa: PLC0415

    good = data_lib.get_dataset("multidigits", num_train=64, num_val=32, num_test=32)

    def with_split(split, key, values):
        arrays = {k: v for k, v in good.splits[split].get_batch(np.arange(32)).items()}
        arrays[key] = values
        splits = {**good.splits, split: ArraySource(arrays)}
        return data_lib.Dataset(good.name, splits, good.image_shape, good.tasks)

    labels = np.zeros(32, np.int32)
    for split, key, values, message in [
        ("train", "left", np.where(np.arange(32) == 5, -1, labels), "label -1 at position 5"),
        ("val", "sum", np.where(np.arange(32) >= 30, 19, labels), "label 19 at position 30"),
        ("test", "right", labels.astype(np.float32), "labels have dtype float32"),
        ("train", "ink", np.where(np.arange(32) == 3, np.nan, 0.0), "label nan at position 3"),
    ]:
        with pytest.raises(DataError, match=message) as info:
            data_lib.check_labels(with_split(split, key, values))
        text = str(info.value)
        assert f"data set 'multidigits', split {split!r}" in text and "\n" not in text
    data_lib.check_labels(good)  # the real data passes


def test_duplicate_task_names_are_config_errors():
    from hisd_jax import config as config_lib  # noqa: PLC0415

    c = config_lib.base_config()
    c.data.name, c.data.tasks = "multidigits", ("sum", "left", "sum")
    with pytest.raises(config_lib.ConfigError, match="data.tasks=.* names 'sum' twice"):
        config_lib.validate(c)


def test_synthetic_images_are_generated_by_index_and_seed():
    data = get_dataset("synthetic", seed=1, image_shape=(4, 5, 2), num_classes=3, sizes=(6, 2, 2))
    assert data.image_shape == (4, 5, 2) and data.tasks["label"].num_classes == 3
    batch = data.splits["train"].get_batch(np.array([4, 1]))
    assert batch["image"].shape == (2, 4, 5, 2) and batch["image"].dtype == np.float32
    np.testing.assert_array_equal(batch["label"], [1, 1])  # index % classes
    want = np.random.default_rng([1, 0, 4]).standard_normal((4, 5, 2), np.float32)
    np.testing.assert_array_equal(batch["image"][0], want)
    other = get_dataset("synthetic", seed=2, image_shape=(4, 5, 2), num_classes=3)
    assert not np.array_equal(other.splits["train"].get_batch(np.array([4]))["image"][0], want)
    with pytest.raises(ValueError, match="data.kwargs.image_shape"):
        get_dataset("synthetic", image_shape=(4, 5))
