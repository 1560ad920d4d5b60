"""SPMD over 8 fake CPU devices gives the same training and evaluation as 1 device, with the
train state replicated and with it sharded over a (data 2, fsdp 4) mesh (FSDP).

Each device setting runs in its own process (XLA_FLAGS must be set before JAX starts):
`tests/_workers.py spmd` runs the trainer's jitted step by hand for a few steps, asserting
inside the process that there are 8 devices, every batch is sharded over all of them along
`data` and the train state stays replicated; it then evaluates val and test with an eval
batch size that needs padding. The model uses BatchNorm, so the 8-device run only matches
if batch statistics are computed over the global batch, not per device.

The same holds for a multitask run (the `mtl` case): HiSD on a (task x exit) grid of heads
with GradVac in representation space, whose Gram matrix of per-task gradients sums over the
batch-sharded representation, whose strategy state (target cosines) is carried in the train
state and whose task orders are drawn from the step's key.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _workers import cache_env, load_npz
from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5
# Global batch 32 = 4 rows per device; eval batch 128 over 360 val / 359 test examples, so
# the last eval batch of each split is padded. (The tiny config's defaults, so the 1-device
# programs are shared through the compilation cache with the other tests' runs.)
ARG = "train__batch_size=32,train__eval_batch_size=128,model__norm=batch"
MTL_ARG = (
    ARG + ",data__name=multidigits,data__tasks=('left','same_parity','ink'),"
    "data__kwargs={'num_train':256,'num_val':200,'num_test':200},"
    "model__task_exits={'left':(0,1,2),'same_parity':(2,),'ink':(2,)},"
    "mtl__method=gradvac,mtl__space=rep"
)
RTOL, ATOL = 1e-5, 1e-6
# Parameters after STEPS Adam steps: an element whose gradient is at rounding level can take
# a different fraction of Adam's (normalised, lr-sized) step on 8 devices. 1e-5 is 0.3% of
# the learning rate (3e-3), so any real difference in the updates still fails.
STATE_ATOL = {"hisd": ATOL, "mtl": 1e-5}


CASES = {"hisd": ARG, "mtl": MTL_ARG}
# FSDP: the state sharded over a 2 x 4 (data, fsdp) mesh; small leaves too (min 64 elements)
FSDP = ",mesh__data=2,mesh__fsdp=4,mesh__min_shard_size=64"
# (label, devices, extra ARG): 1 device, 8 replicated, 8 with the state sharded (FSDP); the
# multitask case runs 1 device and FSDP only (its 8 devices split the batch there too)
SETTINGS = {
    "hisd": ((1, 1, ""), (8, 8, ""), ("fsdp", 8, FSDP)),
    "mtl": ((1, 1, ""), ("fsdp", 8, FSDP)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return request.param


@pytest.fixture(scope="module")
def runs(case, pytestconfig, tmp_path_factory):
    """{devices: (summary, final state)} for 1 and 8 devices, run side by side."""
    arg = CASES[case]
    out_dir = tmp_path_factory.mktemp("multidevice")
    env = {**os.environ, **cache_env(pytestconfig, tmp_path_factory)}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    procs = {}
    for label, devices, extra in SETTINGS[case]:
        out = str(out_dir / f"devices{label}")
        device_env = {**env, "XLA_FLAGS": xla_flags(devices if devices > 1 else None)}
        with open(out + ".log", "w") as log:  # a file: an unread pipe could fill up
            procs[label] = subprocess.Popen(
                [
                    sys.executable,
                    "tests/_workers.py",
                    "spmd",
                    arg + extra,
                    str(STEPS),
                    str(devices),
                    out,
                ],  # fmt: skip
                cwd=REPO,
                env=device_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    results = {}
    for devices, proc in procs.items():
        out = str(out_dir / f"devices{devices}")
        try:
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with open(out + ".log") as f:
            log = f.read()
        assert code == 0, f"{devices}-device run failed:\n{log[-5000:]}"
        with open(out + ".json") as f:
            results[devices] = (json.load(f), load_npz(out + ".npz"))
    return results


def test_runs_used_the_requested_devices(runs):
    assert runs[1][0]["device_count"] == 1
    assert all(runs[k][0]["device_count"] == 8 for k in runs if k != 1)


@pytest.mark.parametrize("other", [8, "fsdp"])
def test_losses_match_per_step(runs, other):
    """8 devices, the state replicated or FSDP-sharded, train as 1 device does."""
    if other not in runs:
        pytest.skip("the multitask case runs 1 device and FSDP only")
    one, eight = runs[1][0]["losses"], runs[other][0]["losses"]
    assert len(one) == len(eight) == STEPS
    np.testing.assert_allclose(eight, one, rtol=RTOL, atol=ATOL)
    assert one[-1] < one[0]  # it trains


@pytest.mark.parametrize("other", [8, "fsdp"])
def test_final_state_matches(runs, case, other):
    if other not in runs:
        pytest.skip("the multitask case runs 1 device and FSDP only")
    one, eight = runs[1][1], runs[other][1]
    assert sorted(one) == sorted(eight)
    assert int(one[".step"]) == int(eight[".step"]) == STEPS
    assert any("batch_stats" in k for k in one), "the test wants a BatchNorm model"
    for k in one:
        np.testing.assert_allclose(eight[k], one[k], rtol=RTOL, atol=STATE_ATOL[case], err_msg=k)


@pytest.mark.parametrize("other", [8, "fsdp"])
def test_eval_metrics_match(runs, other):
    if other not in runs:
        pytest.skip("the multitask case runs 1 device and FSDP only")
    one, eight = runs[1][0]["metrics"], runs[other][0]["metrics"]
    assert one.keys() == eight.keys() == {"val", "test", "val_unpadded"}
    for split in one:
        for task, per_exit in one[split].items():
            for name, metrics in per_exit.items():
                for k, v in metrics.items():
                    got = eight[split][task][name][k]
                    assert np.isclose(got, v, rtol=RTOL, atol=ATOL), (split, task, name, k, got, v)


def test_eval_padding_is_masked(runs):
    """Padded eval batches give the metrics of batches that need no padding."""
    for devices in runs:
        metrics = runs[devices][0]["metrics"]
        for task, per_exit in metrics["val"].items():
            for name, m in per_exit.items():
                for k, v in m.items():
                    want = metrics["val_unpadded"][task][name][k]
                    assert np.isclose(v, want, rtol=RTOL, atol=ATOL), (devices, task, name, k)


def test_a_run_trained_on_4_devices_is_evaluated_and_exported_on_1(pytestconfig, tmp_path):
    """evaluate/export restore like a resume, onto the current devices ("Topology mismatch"
    before): a run trained on 4 fake devices, its state FSDP-sharded over them, loads here on
    1 with its final parameters (its mesh.fsdp=4 cannot be this job's: replicated instead)."""
    import jax  # noqa: PLC0415

    from hisd_jax import workdir as workdir_lib  # noqa: PLC0415

    env = {**os.environ, **cache_env(pytestconfig, tmp_path)}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    env["XLA_FLAGS"] = xla_flags(4)
    workdir = tmp_path / "run4"
    arg = "train__steps=8,train__checkpoint_every=4,train__batch_size=32,mesh__fsdp=4"
    proc = subprocess.run(
        [sys.executable, "tests/_workers.py", "train", str(workdir), arg],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert jax.device_count() == 1
    exp, variables = workdir_lib.load_workdir(str(workdir))
    want = load_npz(workdir / "final_state.npz")
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
        key = ".params" + jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(leaf), want[key], err_msg=key)
    assert exp.config.train.steps == 8 and exp.config.mesh.fsdp == 1
