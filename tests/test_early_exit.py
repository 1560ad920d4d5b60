"""Early-exit inference end to end on a tiny trained workdir: the compacting cascade against
the mask-based policy, FLOPs accounting, threshold fitting through `early_exit_report`, the
evaluate CLI, and a standalone exported exit loaded in a fresh process without hisd_jax."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python, tiny_config

from hisd_jax import evaluate, export, train
from hisd_jax import workdir as workdir_lib
from hisd_jax.inference import cascade, policies
from hisd_jax.inference import cost as cost_lib

INF = np.inf
TASK = "label"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("early_exit") / "run")
    train.train_and_evaluate(tiny_config(), path)
    return path


@pytest.fixture(scope="module")
def loaded(workdir):
    exp, variables = workdir_lib.load_workdir(workdir)
    images, labels = workdir_lib.split_arrays(exp, "test", TASK)
    logits = cascade.all_exit_logits(exp.model, variables, images, TASK, batch_size=128)
    return exp, variables, images, labels, logits


def gap_threshold(conf, q, margin=1e-4):
    """A threshold near the q-quantile of `conf` with no confidence within `margin` of it, so
    float32 (device) and float64 (host) confidences fall on the same side."""
    s = np.unique(conf)
    mids, ok = (s[1:] + s[:-1]) / 2, np.diff(s) > 2 * margin
    return mids[ok][np.argmin(np.abs(mids[ok] - np.quantile(conf, q)))]


def test_bucket_sizes():
    assert cascade.bucket_sizes(100) == (8, 16, 32, 64, 100)
    assert cascade.bucket_sizes(64, min_bucket=16) == (16, 32, 64)
    assert cascade.bucket_sizes(100, "batch") == (100,)


@pytest.mark.parametrize("batch_size", [64, 100])
def test_cascade_matches_mask_policy(loaded, batch_size):
    exp, variables, images, _, logits = loaded
    n, num_exits = images.shape[0], exp.model.num_exits
    assert num_exits == 3 and n % batch_size
    temps = np.array([0.7, 1.3, 1.0])
    conf = policies.confidence(logits.astype(np.float64) / temps[:, None, None], "max_softmax")
    cases = {
        "all_exit_at_0": [-INF, -INF, -INF],
        "never_early": [INF, INF, INF],
        "middle": [gap_threshold(conf[0], 0.6), gap_threshold(conf[1], 0.5), -INF],
        "only_exit1": [INF, gap_threshold(conf[1], 0.3), -INF],
    }
    runner = cascade.Cascade(
        exp.model,
        variables,
        TASK,
        batch_size=batch_size,
        min_bucket=16,
        image_shape=exp.dataset.image_shape,
    )
    seen = set()
    for name, thresholds in cases.items():
        want_exit = policies.threshold_exit(conf, np.array(thresholds))
        want_pred, want_logits = policies.apply_exits(logits, want_exit)
        out = runner(images, thresholds=thresholds, temperatures=temps)
        np.testing.assert_array_equal(out["exit_idx"], want_exit, err_msg=name)
        np.testing.assert_array_equal(out["preds"], want_pred, err_msg=name)
        np.testing.assert_allclose(out["logits"], want_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(
            out["stage_sizes"], [(want_exit >= e).sum() for e in range(3)]
        )
        seen.add(tuple(np.bincount(want_exit, minlength=3) > 0))
    assert (True, False, False) in seen and (False, False, True) in seen
    assert (True, True, True) in seen  # the middle case uses every exit

    patient = cascade.Cascade(
        exp.model, variables, TASK, "patience", batch_size=batch_size, min_bucket=16
    )
    for patience in (1, 2, 3):
        want_exit = policies.patience_exit(logits.argmax(-1), patience)
        out = patient(images, patience=patience)
        np.testing.assert_array_equal(out["exit_idx"], want_exit)
        np.testing.assert_array_equal(out["preds"], policies.apply_exits(logits, want_exit)[0])


def alone_final(pieces):
    return sum(pieces["segments"]) + pieces["heads"][-1]


def test_flops_add_up(loaded):
    exp, variables, images, _, logits = loaded
    pieces = cost_lib.piece_flops(exp.model, variables, exp.dataset.image_shape)
    costs = cost_lib.exit_costs(pieces)
    x = jax.ShapeDtypeStruct((1, *exp.dataset.image_shape), jnp.float32)
    for e in range(exp.model.num_exits):
        # The model cut at e, compiled as one program (segments 0..e and head e), costs what its
        # pieces add up to. XLA's fusion of the whole program changes the count slightly (a few
        # elementwise FLOPs per channel), hence the relative tolerance.
        model = export.cut_model(exp, e)
        flat = export.flatten(export.cut_variables(exp, variables, e))
        alone = cost_lib.compiled_flops(export.standalone_fn(model, e), flat, x)
        pieces_sum = sum(pieces["segments"][: e + 1]) + pieces["heads"][e]
        assert alone == pytest.approx(pieces_sum, rel=1e-3)
        assert costs["standalone"][e] == pieces_sum
        assert costs["cascade"][e] == sum(pieces["segments"][: e + 1]) + sum(
            pieces["heads"][: e + 1]
        )
    assert costs["fraction"][-1] == 1.0 and costs["full"] == alone_final(pieces)
    full = cascade.full_model_fn(exp.model, TASK)
    assert cost_lib.compiled_flops(full, variables, x) == pytest.approx(costs["full"], rel=1e-3)

    conf = policies.confidence(logits.astype(np.float64), "margin")
    thresholds = [gap_threshold(conf[0], 0.7), gap_threshold(conf[1], 0.4), -INF]
    runner = cascade.Cascade(
        exp.model,
        variables,
        TASK,
        "margin",
        batch_size=100,
        min_bucket=16,
        image_shape=exp.dataset.image_shape,
    )
    out = runner(images, thresholds=thresholds)
    expected = costs["cascade"][out["exit_idx"]].mean()
    assert out["flops_per_example"] == pytest.approx(expected, rel=1e-12)
    assert out["padded_flops_per_example"] >= out["flops_per_example"]


@pytest.mark.parametrize("policy", ["max_softmax", "neg_entropy", "patience"])
def test_report_meets_tolerance_on_validation(workdir, loaded, policy):
    exp, variables = loaded[:2]
    kw = dict(exp=exp, variables=variables, measure_speed=False, write=False, plot=False)
    r = evaluate.early_exit_report(workdir, policy, tolerance=0.02, **kw)
    val = r["val"]
    assert val["feasible"]
    assert val["accuracy"] >= val["final_exit_accuracy"] - 0.02 - 1e-12
    assert val["accuracy_drop"] <= 0.02 + 1e-12
    assert sum(val["exit_rates"]) == pytest.approx(1.0)
    assert 0 < r["test"]["avg_flops_fraction"] <= r["per_exit"]["cascade_fraction"][-1] + 1e-12
    cal = r["calibration"]
    assert len(cal["temperatures"]) == 3 and min(cal["temperatures"]) > 0
    assert len(cal["val"]["ece_before"]) == len(cal["test"]["ece_after"]) == 3

    b = evaluate.early_exit_report(workdir, policy, budget=0.8, **kw)
    assert b["val"]["feasible"] and b["val"]["avg_flops_fraction"] <= 0.8 + 1e-12


def test_evaluate_cli_writes_json_and_plot(workdir):
    proc = run_python(
        [
            "-m",
            "hisd_jax.evaluate",
            "--workdir",
            workdir,
            "--policy",
            "max_softmax",
            "--tolerance",
            "0.01",
            "--batch_size",
            "64",
        ]  # fmt: skip
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "measured speedup" in proc.stdout
    with open(os.path.join(workdir, "early_exit.json")) as f:
        report = json.load(f)
    assert report["goal"] == "tolerance" and report["value"] == 0.01
    assert report["checkpoint_step"] == 40  # the step evaluated, named in the table too
    assert f"{workdir}, step 40)" in proc.stdout
    speed = report["speed"]
    assert speed["batch_size"] == 64 and speed["full_s"] > 0 and speed["cascade_s"] > 0
    assert speed["agreement_exits"] >= 0.99 and speed["agreement_preds"] >= 0.99
    assert speed["cascade_avg_flops_fraction"] == pytest.approx(
        report["test"]["avg_flops_fraction"], abs=0.01
    )
    with open(os.path.join(workdir, "early_exit.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


LOADER = """
import sys
import numpy as np
import jax
d = sys.argv[1]
with open(d + "/model.jaxexport", "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
params = dict(np.load(d + "/params.npz"))
out = exported.call(params, np.load(d + "/images.npy"))
np.save(d + "/logits.npy", np.asarray(out["label"]))
assert not any(m.startswith("hisd_jax") for m in sys.modules), "hisd_jax was imported"
"""


def test_export_roundtrip_in_fresh_process(workdir, loaded, tmp_path):
    exp, variables, images = loaded[:3]
    out_dir = str(tmp_path / "exit1")
    proc = run_python(
        [
            "-m",
            "hisd_jax.export",
            "--workdir",
            workdir,
            "--exit",
            "exit1",
            "--out",
            out_dir,
            "--report",
            "--batch_size",
            "64",
        ]  # fmt: skip
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(name in proc.stdout for name in ("exit0", "exit1", "exit2", "peak MiB"))
    with open(os.path.join(workdir, "export_report.json")) as f:
        rows = json.load(f)["exits"]
    counts = cost_lib.exit_param_counts(jax.device_get(variables["params"]), exp.param_labels)
    assert [r["params"] for r in rows] == counts
    assert all(r["peak_memory_bytes"] > 0 and r["latency_ms"] > 0 for r in rows)

    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    assert meta["exit"] == "exit1" and meta["params"] == counts[1]
    keys = set(np.load(os.path.join(out_dir, "params.npz")).files)
    assert {k.split("/")[1] for k in keys} == {"segments_0", "segments_1", "heads_1"}
    assert not any("proj" in k for k in keys)

    x = images[:37]  # a batch size the export never saw (symbolic batch dimension)
    np.save(os.path.join(out_dir, "images.npy"), x)
    proc = subprocess.run(  # outside the repo: only jax, numpy and the saved files
        [sys.executable, "-c", LOADER, out_dir], cwd=out_dir, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(os.path.join(out_dir, "logits.npy"))

    model = export.cut_model(exp, 1)
    cut = export.cut_variables(exp, variables, 1, standalone=False)
    want = np.asarray(jax.jit(model.apply)(cut, x)["logits"][TASK][-1])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_tasks_with_heads_on_some_exits(tmp_path):
    """A multitask model whose tasks have heads on the last exit only (as every MTL config):
    evaluate says in one line that early exit needs two exits (a NumPy shape error before),
    export --report covers the exits the task has heads on (an IndexError before). A task on
    exits 0 and 2 of 3 gets the report over its own exits: the cascade's stage 2 runs segments
    1 and 2 and head 2 only, costs add up from the pieces, and the cascade agrees with the
    mask-based policy."""

    def config(tasks, task_exits):
        return tiny_config(
            data__name="multidigits",
            data__tasks=tasks,
            data__kwargs={"num_train": 64, "num_val": 32, "num_test": 32},
            model__task_exits=task_exits,
            objective__preset="final_only",
            train__steps=4,
            train__checkpoint_every=4,
            train__eval_every=0,
        )

    workdir = str(tmp_path / "mtl")
    train.train_and_evaluate(config(("left", "right"), {"left": (2,), "right": (2,)}), workdir)
    with pytest.raises(ValueError, match=r"at least two exits; 'left' has one \(exit2,") as info:
        evaluate.early_exit_report(workdir, measure_speed=False)
    assert "\n" not in str(info.value)
    report = export.exit_report(workdir, batch_size=16)
    assert [r["exit"] for r in report["exits"]] == ["exit2"]
    assert 0.0 <= report["exits"][0]["test_accuracy"] <= 1.0

    workdir = str(tmp_path / "subset")
    results = train.train_and_evaluate(config(("left",), {"left": (0, 2)}), workdir)
    assert [r["exit"] for r in export.exit_report(workdir, batch_size=16)["exits"]] == [
        "exit0",
        "exit2",
    ]
    exp, variables = workdir_lib.load_workdir(workdir)
    r = evaluate.early_exit_report(
        workdir, exp=exp, variables=variables, batch_size=16, speed_repeats=1, plot=False
    )
    assert r["exits"] == ["exit0", "exit2"]
    pieces = cost_lib.piece_flops(exp.model, variables, exp.dataset.image_shape)
    (s0, s1, s2), (h0, _, h2) = pieces["segments"], pieces["heads"]
    np.testing.assert_allclose(r["per_exit"]["cascade_flops"], [s0 + h0, s0 + s1 + s2 + h0 + h2])
    np.testing.assert_allclose(r["per_exit"]["flops"], [s0 + h0, s0 + s1 + s2 + h2])
    assert r["full_flops"] == pytest.approx(s0 + s1 + s2 + h2)
    rates = np.asarray(r["test"]["exit_rates"])
    want = rates @ np.asarray(r["per_exit"]["cascade_flops"]) / r["full_flops"]
    assert r["test"]["avg_flops_fraction"] == pytest.approx(want)
    assert r["speed"]["cascade_avg_flops_fraction"] == pytest.approx(want)
    assert r["speed"]["agreement_exits"] == 1.0 and r["speed"]["agreement_preds"] == 1.0
    for e, name in enumerate(r["exits"]):  # each own exit alone, as training evaluated it
        want = results["test"]["left"][name]["accuracy"]
        assert r["per_exit"]["test_accuracy"][e] == pytest.approx(want, abs=1e-6)
