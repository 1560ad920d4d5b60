"""TFDS-backed datasets, exercised only under `tfds.testing.mock_data` (nothing is downloaded)."""

import itertools
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from test_data import check_positions

from hisd_jax.data import BatchIterator, eval_batches, get_dataset

N = 20  # mock records per TFDS split


@pytest.fixture
def mock():
    with tfds.testing.mock_data(num_examples=N):
        yield


def everything(source):
    return source.get_batch(np.arange(len(source)))


def raw_records(name, split):
    source = tfds.data_source(name, split=split, download=False)
    return [source[i] for i in range(len(source))]


@pytest.mark.parametrize(
    "name, shape, classes",
    [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100)],
)
def test_classification_sources(mock, name, shape, classes):
    data = get_dataset(name)
    assert data.image_shape == shape and data.tasks["label"].num_classes == classes
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 18, "val": 2, "test": 20}
    raw = get_dataset(name, normalize=False)
    for split, tfds_split, first in [
        ("train", "train", 0),
        ("val", "train", 18),
        ("test", "test", 0),
    ]:
        batch, plain = everything(data.splits[split]), everything(raw.splits[split])
        assert batch["image"].dtype == np.float32 and batch["image"].shape[1:] == shape
        assert batch["index"].dtype == np.int32 and batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["index"], first + np.arange(len(batch["index"])))
        assert 0 <= plain["image"].min() and plain["image"].max() <= 1
        assert 0 <= batch["label"].min() and batch["label"].max() < classes
        records = raw_records(name, tfds_split)
        for image, label, index in zip(plain["image"], batch["label"], batch["index"]):
            np.testing.assert_allclose(image, records[index]["image"] / 255, atol=1e-6)
            assert label == records[index]["label"]
    if name == "cifar100":
        assert data.tasks["coarse_label"].num_classes == 20
        assert everything(data.splits["test"])["coarse_label"].max() < 20


def test_index_is_stable_across_val_fractions(mock):
    a, b = get_dataset("mnist", val_fraction=0.1), get_dataset("mnist", val_fraction=0.2)
    assert len(b.splits["val"]) == 4
    np.testing.assert_array_equal(everything(b.splits["val"])["index"], [16, 17, 18, 19])
    np.testing.assert_array_equal(
        a.splits["val"].get_batch(np.array([1]))["image"],
        b.splits["val"].get_batch(np.array([3]))["image"],
    )
    with pytest.raises(ValueError, match="val_fraction"):
        get_dataset("mnist", val_fraction=0.0)


def test_multimnist(mock):
    data = get_dataset("multimnist", seed=0)
    assert data.image_shape == (28, 28, 1) and set(data.tasks) == {"left", "right"}
    bounds = {"train": (0, 18), "val": (18, 20), "test": (0, 20)}
    for split, (first, stop) in bounds.items():
        batch = everything(data.splits[split])
        assert batch["image"].shape == (stop - first, 28, 28, 1)
        assert batch["image"].dtype == np.float32
        np.testing.assert_array_equal(batch["index"], np.arange(first, stop))
        np.testing.assert_array_equal(batch["src_left"], batch["index"])
        assert (batch["src_right"] != batch["src_left"]).all()
        assert first <= batch["src_right"].min() and batch["src_right"].max() < stop
        records = raw_records("mnist", "test" if split == "test" else "train")
        labels = np.array([r["label"] for r in records])
        np.testing.assert_array_equal(batch["left"], labels[batch["src_left"]])
        np.testing.assert_array_equal(batch["right"], labels[batch["src_right"]])
    again, other = get_dataset("multimnist", seed=0), get_dataset("multimnist", seed=1)
    train = everything(data.splits["train"])
    np.testing.assert_array_equal(train["image"], everything(again.splits["train"])["image"])
    assert not np.array_equal(train["src_right"], everything(other.splits["train"])["src_right"])


def test_multimnist_reconstructs_from_records(mock):
    """Example 0 is max(left at (dy, dx), right at (8 - dy', 8 - dx')) on 36x36, resized to 28."""
    example = get_dataset("multimnist", normalize=False).splits["test"].get_batch(np.array([0]))
    records = raw_records("mnist", "test")
    left = records[0]["image"][..., 0].astype(np.float32)
    right = records[example["src_right"][0]]["image"][..., 0].astype(np.float32)
    found = []
    for dy, dx, dy2, dx2 in itertools.product(range(5), repeat=4):
        a, b = np.zeros((36, 36), np.float32), np.zeros((36, 36), np.float32)
        a[dy : dy + 28, dx : dx + 28] = left
        b[8 - dy2 : 36 - dy2, 8 - dx2 : 36 - dx2] = right
        resized = np.asarray(Image.fromarray(np.maximum(a, b)).resize((28, 28), Image.BILINEAR))
        found.append(np.allclose(resized / 255, example["image"][0, ..., 0], atol=1e-6))
    assert sum(found) >= 1


@pytest.mark.parametrize("name", ["cifar10", "multimnist"])
def test_iterators_over_tfds_sources(mock, name):
    train = get_dataset(name).splits["train"]
    whole = BatchIterator(train, 8, seed=0)
    halves = [BatchIterator(train, 8, seed=0, process_index=p, process_count=2) for p in range(2)]
    for _ in range(4):  # 32 examples: crosses the 18-example epoch
        batch = next(whole)
        parts = [next(h) for h in halves]
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
    for it in [whole, *halves]:
        it.close()
    batches = list(eval_batches(train, 8))
    assert len(batches) == 3 and batches[-1]["mask"].sum() == 2
    seen = np.concatenate([b["index"][b["mask"] == 1] for b in batches])
    np.testing.assert_array_equal(seen, np.arange(18))


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "multimnist"])
def test_position_is_the_row_in_the_split(mock, name):
    data = get_dataset(name)
    for source in data.splits.values():  # 18, 2 and 20 examples: padding, straddling epochs
        check_positions(source, 8)
    val = everything(data.splits["val"])  # 'index' keeps the record id; 'position' is the row
    np.testing.assert_array_equal(val["index"], [18, 19])


@pytest.mark.parametrize("budget", ["epochs", "examples"])
def test_alphavil_trains_on_multimnist(mock, tmp_path, budget):
    """The MultiMNIST config's αVIL variant end to end on mock records (18 train, 2 val):
    3 epochs of 3 joint steps (batch 8), each followed by an αVIL update whose α fit samples
    the 2 validation rows with replacement; "examples" fits 1 epoch: (3 + 2 x 1) x 8 + 4 x 8
    = 72 examples an epoch, 9 x 8 = 72 in the budget."""
    from conftest import override  # noqa: PLC0415
    from test_mtl_train import load_config_file  # noqa: PLC0415

    from hisd_jax import train  # noqa: PLC0415

    config = override(
        load_config_file("mtl_multimnist.py", f"program=alphavil,budget={budget},steps=9"),
        model__width=4,
        model__stage_sizes=(1, 1),
        model__strides=(1, 2),
        model__task_exits={"left": (1,), "right": (1,)},
        program__alpha_batch_size=8,
        train__batch_size=8,
        train__eval_batch_size=8,
        train__log_every=3,
        train__eval_every=9,
        train__checkpoint_every=9,
    )
    results = train.train_and_evaluate(config, str(tmp_path))
    av = results["alphavil"]
    assert av["target"] == "left" and av["joint_steps_per_epoch"] == 3
    assert av["inner_steps_per_epoch"] == 1  # round(0.25 x 3)
    assert av["epochs"] == {"epochs": 3, "examples": 1}[budget]
    assert results["train"]["steps_taken"] == 3 * av["epochs"]
    assert set(results["test"]) == {"left", "right"}
    assert all(np.isfinite(w) and 0.0 <= w <= 3.0 for w in av["weights"].values())


# --------------------------------------------------------------------------- GLUE (text)
def glue_records(config, split):
    import tensorflow_datasets.text.glue  # noqa: F401, PLC0415

    return raw_records(f"glue/{config}", split)


def test_glue_single_sentences_tokenized_with_a_tokenizer_of_the_training_split(mock, tmp_path):
    from hisd_jax.data import glue  # noqa: PLC0415

    data = get_dataset("glue", config="sst2", cache_dir=str(tmp_path), max_len=48, vocab_size=300)
    assert data.input_key == "tokens" and data.image_shape == (48,)
    assert data.tasks["label"].kind == "classification" and data.tasks["label"].num_classes == 2
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 18, "val": 2, "test": 20}
    check_positions(data.splits["train"], 4)
    train, test = everything(data.splits["train"]), everything(data.splits["test"])
    records = {s: glue_records("sst2", s) for s in ("train", "validation")}
    assert (train["tokens"][:, 0] == glue.CLS_ID).all() and train["tokens"].dtype == np.int32
    tokenizer = glue._tokenizer(  # the cached one: trained on the 18 training records only
        tfds.data_source("glue/sst2", split="train", download=False), 0, 18, ("sentence",), 300,
        "sst2", str(tmp_path),
    )  # fmt: skip
    for row, rec in ((train, records["train"]), (test, records["validation"])):
        for i in range(3):
            ids = [t for t in row["tokens"][i, 1:] if t != glue.PAD_ID]
            text = rec[int(row["index"][i])]["sentence"]
            text = text.decode() if isinstance(text, bytes) else text
            assert tokenizer.decode(ids).strip() == text.strip()
            assert row["label"][i] == rec[int(row["index"][i])]["label"]
    assert list(everything(data.splits["val"])["index"]) == [18, 19]  # the train split's tail
    assert len(os.listdir(os.path.join(str(tmp_path), "glue"))) == 1  # cached once


def test_glue_sentence_pairs_and_the_regression_task(mock, tmp_path):
    from hisd_jax.data import glue  # noqa: PLC0415

    data = get_dataset("glue", config="mrpc", cache_dir=str(tmp_path), max_len=64, vocab_size=300)
    row = everything(data.splits["train"])
    assert ((row["tokens"] == glue.SEP_ID).sum(1) == 1).all()  # one [SEP] between the two
    stsb = get_dataset("glue", config="stsb", cache_dir=str(tmp_path), max_len=16, vocab_size=300)
    assert stsb.tasks["label"].kind == "regression"
    labels = everything(stsb.splits["test"])["label"]
    want = [r["label"] for r in glue_records("stsb", "validation")]
    np.testing.assert_allclose(labels, want, rtol=1e-6)
    with pytest.raises(ValueError, match="data.kwargs.config='sst3' is not one of cola, sst2"):
        get_dataset("glue", config="sst3", cache_dir=str(tmp_path))


def test_the_glue_config_builds_its_experiment(mock, tmp_path):
    """configs/glue.py validates and builds data, tasks and the multi-exit encoder on mock
    records (random text, nothing to learn; the trainer's path is the one pycode's tests run)."""
    from hisd_jax import experiment  # noqa: PLC0415
    from hisd_jax.config import config_from_file  # noqa: PLC0415

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "glue.py")
    config = config_from_file(path, "task=mrpc,steps=4,max_len=16")
    config.unlock()
    config.data.kwargs.update(cache_dir=str(tmp_path / "cache"), vocab_size=300)
    exp = experiment.build_experiment(config)
    assert exp.dataset.input_key == "tokens" and exp.dataset.image_shape == (16,)
    assert exp.model.num_exits == 3 and exp.task_names == ("label",)
    assert exp.tasks[0].num_classes == 2


@pytest.mark.parametrize(
    "name,kwargs", [("cifar100", {}), ("multimnist", {}), ("glue", {"config": "sst2"})]
)
def test_a_data_set_not_prepared_is_refused_in_one_line_naming_the_command(tmp_path, name, kwargs):
    """No data in data_dir (TFDS raises a KeyError about empty splits; a TFRecord-only
    preparation raises NotImplementedError the same way): one ConfigError line naming the data
    set and the command that prepares it in a format tfds.data_source reads."""
    from hisd_jax.errors import ConfigError  # noqa: PLC0415

    tfds_name = {"multimnist": "mnist", "glue": "glue/sst2"}.get(name, name)
    with pytest.raises(ConfigError) as e:
        get_dataset(name, data_dir=str(tmp_path), **kwargs)
    message = str(e.value)
    assert "\n" not in message and f"TFDS '{tfds_name}'" in message
    assert (
        f"tfds.builder('{tfds_name}').download_and_prepare(file_format='array_record')" in message
    )
    assert os.listdir(tmp_path) == []  # nothing downloaded or created
