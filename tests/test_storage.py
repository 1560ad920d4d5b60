"""Workdirs on object storage (gs://): every file of ours goes through `hisd_jax.storage`
(etils.epath), and a run whose workdir has object storage's semantics (no rename, no append,
no lock) trains, resumes and reports like a local one.

No object store is reachable here. Two checks stand in for one:
  * the same code path on a local disk: `storage.is_object_store` made true for a temporary
    directory, so the trainer writes it as it writes gs:// (whole objects, metrics.jsonl
    rewritten at every event, no lock); it trains, is cut back as a killed run would be, and
    resumes to the same results;
  * gs:// paths themselves: etils.epath's gs:// backend pointed at a local directory
    (`epath.testing.mock_epath`) and tensorboardX's gs:// writer at local files, so a gs://
    workdir's files land there under their names, written by the object-storage code.
"""

import contextlib
import json
import logging
import os
import shutil

import numpy as np
import pytest
from conftest import tiny_config
from etils import epath

from hisd_jax import checkpointing, jsonio, loop, storage, stored_config, train
from hisd_jax.config import ConfigError
from hisd_jax.metrics import MetricWriter


def events(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def files_under(root):
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


@pytest.fixture
def object_store_here(tmp_path, monkeypatch):
    """`tmp_path` treated as object storage; the paths our code renamed files onto."""
    root = str(tmp_path)
    monkeypatch.setattr(storage, "is_object_store", lambda p: os.fspath(p).startswith(root))
    renamed = []
    real_replace = os.replace

    def replace(src, dst, **kw):
        renamed.append(os.fspath(dst))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(storage.os, "replace", replace)
    return renamed


def test_a_run_on_object_storage_trains_and_resumes_like_a_local_one(
    tmp_path, object_store_here, caplog
):
    workdir = str(tmp_path / "run")
    config = tiny_config()  # 40 steps: log every 10, validate and checkpoint every 20
    with caplog.at_level(logging.WARNING):
        results = train.train_and_evaluate(config, workdir)
    assert caplog.text.count("has no locks") == 1  # said once (the lock is entered twice)
    names = files_under(workdir)
    assert {"config.json", "metrics.jsonl", "results.json"} <= set(names)
    assert not any(n == ".lock" or n.endswith(".tmp") for n in names), names
    assert any(n.startswith("tb/") for n in names)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40"]
    # None of our files was renamed into place (Orbax's own commit of a step may rename).
    ours = [p for p in object_store_here if "/checkpoints/" not in p]
    assert ours == [], ours
    logged = events(open(os.path.join(workdir, "metrics.jsonl")).read())
    train_steps = [e["step"] for e in logged if e["split"] == "train"]
    assert train_steps == [10, 20, 30, 40]

    # A kill after step 40 was logged but before its checkpoint: the rerun resumes from 20,
    # drops the events logged after it (the object is rewritten) and logs 30 and 40 again.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "40"))
    os.remove(os.path.join(workdir, "results.json"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = train.train_and_evaluate(config, workdir)
    assert "Resumed from step 20" in caplog.text
    assert again["train"]["resumed_from"] == 20
    relogged = events(open(os.path.join(workdir, "metrics.jsonl")).read())
    assert [(e["step"], e["split"]) for e in relogged] == [(e["step"], e["split"]) for e in logged]
    for split in ("val", "test"):
        assert again[split] == results[split]  # an exact resume
    for a, b in zip(relogged, logged):
        assert a == b
    assert jsonio.read_json(os.path.join(workdir, "results.json"))["test"] == results["test"]


@contextlib.contextmanager
def gs_on_disk(root):
    """gs://... read and written by etils.epath under `root` (and tensorboardX's gs:// event
    files as local files there)."""
    from tensorboardX import record_writer  # noqa: PLC0415

    def local(path):
        path = os.fspath(path)
        return os.path.join(root, path[len("gs://") :]) if path.startswith("gs://") else path

    def one(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def two(original, path, dst, *args, **kwargs):
        return original(local(path), local(dst), *args, **kwargs)

    class LocalFactory:
        def open(self, path):
            os.makedirs(os.path.dirname(local(path)), exist_ok=True)
            return open(local(path), "wb")

        def directory_check(self, path):
            del path

    saved = dict(record_writer.REGISTERED_FACTORIES)
    record_writer.register_writer_factory("gs", LocalFactory())
    fns = ("exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rmtree", "stat")
    try:
        with epath.testing.mock_epath(
            **{name: one for name in fns}, rename=two, replace=two, copy=two
        ):
            yield
    finally:
        record_writer.REGISTERED_FACTORIES.clear()
        record_writer.REGISTERED_FACTORIES.update(saved)


def test_a_gs_workdirs_files_go_through_epath_as_objects(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(storage, "_installed", lambda m: True)  # gcsfs, as it would be there
    workdir = "gs://bucket/run"
    on_disk = tmp_path / "bucket" / "run"
    with gs_on_disk(str(tmp_path)):
        storage.makedirs(workdir)
        assert storage.isdir(workdir) and on_disk.is_dir()

        jsonio.write_json(f"{workdir}/config.json", {"seed": 3})
        assert stored_config.read_config_json(workdir) == ({"seed": 3}, None)
        assert jsonio.read_json(f"{workdir}/config.json") == {"seed": 3}

        writer = MetricWriter(workdir)
        for step in (1, 2, 3):
            writer.write(step, "train", {"loss": float(step)})
        writer.event(3, "note", {"why": "test"})
        writer.close()
        text = (on_disk / "metrics.jsonl").read_text()
        assert [e["step"] for e in events(text)] == [1, 2, 3, 3]
        # A resume from step 2 drops the later events, in the object itself.
        writer = MetricWriter(workdir, resume_step=2)
        writer.write(3, "train", {"loss": 30.0})
        writer.close()
        got = [(e["step"], e.get("loss")) for e in events((on_disk / "metrics.jsonl").read_text())]
        assert got == [(1, 1.0), (2, 2.0), (3, 30.0)]
        assert os.listdir(on_disk / "tb")  # event files, through tensorboardX's gs:// writer

        with caplog.at_level(logging.WARNING):
            with loop.WorkdirLock(workdir):
                pass
        assert "has no locks" in caplog.text and not (on_disk / ".lock").exists()

        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        fig = plt.figure()
        storage.save_figure(fig, f"{workdir}/plot.png", dpi=20)
        plt.close(fig)
        assert (on_disk / "plot.png").read_bytes().startswith(b"\x89PNG")
        storage.write_atomic(f"{workdir}/a.npz", lambda f: np.savez(f, x=np.arange(3)), binary=True)
        np.testing.assert_array_equal(np.load(on_disk / "a.npz")["x"], np.arange(3))
        assert storage.listdir(workdir) == sorted(
            ["a.npz", "config.json", "metrics.jsonl", "plot.png", "tb"]
        )
    assert storage.absolute(workdir) == workdir  # a URL is not made a local path
    assert storage.absolute("rel") == os.path.abspath("rel")


def test_checkpoints_of_a_gs_workdir_are_addressed_as_gs(monkeypatch):
    """Orbax is given the gs:// URL itself (epath's absolute() turned it into a local
    '<cwd>/gs:/...' directory before)."""
    seen = []

    class Manager:
        def __init__(self, directory, **kwargs):
            seen.append(directory)

    monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", Manager)
    checkpointing.Checkpointer("gs://bucket/run/checkpoints", every=1, keep=1)
    checkpointing.ItemStore("gs://bucket/run/kd/soft_labels/t")
    assert [str(d) for d in seen] == [
        "gs://bucket/run/checkpoints",
        "gs://bucket/run/kd/soft_labels/t",
    ]


@pytest.mark.parametrize(
    "workdir,installed,want",
    [
        ("gs://bucket/run", set(), r"need gcsfs and google.cloud.storage \(pip install gcsfs"),
        ("gs://bucket/run", {"gcsfs"}, r"paths need google.cloud.storage \(pip install"),
        ("gs://bucket/run", {"gcsfs", "google.cloud.storage"}, None),
        ("gs://bucket/run", {"tensorflow", "google.cloud.storage"}, None),
        ("ftp://host/run", set(), "unsupported URL scheme"),
    ],
)
def test_a_url_workdir_without_its_package_is_refused_in_one_line(
    monkeypatch, workdir, installed, want
):
    monkeypatch.setattr(storage, "_installed", lambda m: m in installed)
    if want is None:
        loop.check_workdir_path(workdir)
        return
    with pytest.raises(ConfigError, match=want) as e:
        loop.check_workdir_path(workdir)
    assert "\n" not in str(e.value) and workdir in str(e.value)
