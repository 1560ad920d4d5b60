"""`jsonio.write_json`: atomic replacement, numpy scalars, process 0 only."""

import json
import os

import jax
import numpy as np
import pytest

from hisd_jax import jsonio, storage


def test_writes_numpy_scalars_and_replaces(tmp_path):
    path = tmp_path / "results.json"
    jsonio.write_json(path, {"a": np.float32(0.5), "b": np.int64(3), "c": [1, "x"]})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": 3.0, "c": [1, "x"]}
    assert path.read_text().startswith('{\n  "a"')  # indent=2 by default
    jsonio.write_json(str(path), {"a": 1}, indent=None)
    assert path.read_text() == '{"a": 1}\n'
    assert os.listdir(tmp_path) == ["results.json"]


@pytest.mark.parametrize("bad", [object(), {1, 2}])
def test_failed_write_keeps_the_previous_file(tmp_path, bad):
    path = tmp_path / "results.json"
    jsonio.write_json(path, {"step": 1})
    before = path.read_text()
    # Big entries come before the value json cannot handle (float() of it fails too).
    obj = {"padding": ["x" * 100] * 1000, "bad": bad}
    with pytest.raises(TypeError):
        jsonio.write_json(path, obj)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


def test_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    jsonio.write_json(path, {"step": 1})

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        jsonio.write_json(path, {"step": 2})
    assert json.loads(path.read_text()) == {"step": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def test_only_process_zero_writes(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    jsonio.write_json(path, {"step": 1})
    assert not path.exists() and os.listdir(tmp_path) == []
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    jsonio.write_json(path, {"step": 1})
    assert json.loads(path.read_text()) == {"step": 1}
