"""Elastic resume: a run checkpointed on one mesh resumes on another and ends where an
uninterrupted run ends.

The reference trains STEPS steps on 8 fake CPU devices with the state sharded over a
(data 2, fsdp 4) mesh (FSDP). Then:
  * a copy of its workdir cut back to its checkpoint at step CUT (a run stopped there) resumes
    on 4 devices (fsdp 4) and on 1 (replicated); Orbax reshards the state into the new mesh,
    and the data position is exact because the global batch does not depend on the device
    count;
  * 2 processes x 2 devices (fsdp 2 across the processes) are SIGKILLed once the step-CUT
    checkpoint is written, and resume as 1 process x 4 devices.
Every resumed run ends equal to the reference (float tolerance). A resume with another global
batch size is refused in one line.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from _workers import load_npz
from conftest import xla_flags
from test_multihost import base_env, check_launch, checkpoint_steps, finish, launch, read

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CUT = 12, 6
ARG = (
    f"train__steps={STEPS},train__batch_size=32,train__eval_batch_size=128,"
    "train__checkpoint_every=3,train__keep_checkpoints=10,mesh__min_shard_size=64"
)
RTOL, ATOL = 1e-5, 1e-5  # Adam on rounding-level gradients: see test_multidevice.STATE_ATOL


def mesh(fsdp):
    return f",mesh__data=-1,mesh__fsdp={fsdp}"


def train(workdir, arg, env, devices):
    """`_workers.py train` on `devices` fake CPU devices; its log file."""
    env = dict(env)
    if devices > 1:
        env["XLA_FLAGS"] = xla_flags(devices)
    log = open(f"{workdir}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "tests/_workers.py", "train", str(workdir), arg],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return proc


def wait(proc, workdir, code=0):
    got = proc.wait(timeout=300)
    assert got == code, f"{workdir} exited {got}:\n{read(f'{workdir}.log')[-4000:]}"


def cut_back(source, target, step):
    """A copy of the finished workdir `source` as it was when step `step` was checkpointed."""
    shutil.copytree(source, target)
    os.remove(target / "results.json")
    os.remove(target / "final_state.npz")
    for later in checkpoint_steps(target):
        if later > step:
            shutil.rmtree(target / "checkpoints" / str(later))


def final(workdir):
    return {
        k: v for k, v in load_npz(workdir / "final_state.npz").items() if not k.startswith("__")
    }


def jobs(workdir):
    with open(workdir / "results.json") as f:
        return json.load(f)["train"]["jobs"]


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)


@pytest.fixture(scope="module")
def reference(pytestconfig, tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    env = base_env(pytestconfig, tmp_path_factory)
    workdir = root / "fsdp8"
    wait(train(workdir, ARG + mesh(4), env, 8), workdir)
    return root, env, workdir


@pytest.mark.parametrize("devices", [4, 1])
def test_an_8_device_fsdp_checkpoint_resumes_on_fewer_devices(reference, devices):
    root, env, workdir = reference
    resumed = root / f"resumed_on_{devices}"
    cut_back(workdir, resumed, CUT)
    wait(train(resumed, ARG + mesh(min(devices, 4)), env, devices), resumed)
    assert f"Resumed from step {CUT}" in read(f"{resumed}.log")
    assert_same(final(resumed), final(workdir))
    # results.json names both jobs: where the run started, and where it resumed
    assert [(j["from_step"], j["devices"], j["processes"], j["mesh"]) for j in jobs(resumed)] == [
        (0, 8, 1, {"data": 2, "fsdp": 4}),
        (CUT, devices, 1, {"data": devices // min(devices, 4), "fsdp": min(devices, 4)}),
    ]


def test_a_resume_with_another_global_batch_is_refused(reference):
    """The trainer's command line: exit code 2, one line naming the field, nothing written."""
    root, env, workdir = reference
    other = root / "other_batch"
    cut_back(workdir, other, CUT)
    before = sorted(os.listdir(other / "checkpoints"))
    arg = ARG.replace("train__batch_size=32", "train__batch_size=64") + mesh(4)
    done = subprocess.run(
        [sys.executable, "-m", "hisd_jax.main", f"--config=tests/_workers.py:{arg}",
         f"--workdir={other}"],
        cwd=REPO, env={**env, "XLA_FLAGS": xla_flags(8)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "changed: train.batch_size" in lines[0], lines
    assert sorted(os.listdir(other / "checkpoints")) == before


def test_2_processes_killed_resume_as_1_process_on_4_devices(
    reference, pytestconfig, tmp_path_factory
):
    root, env, workdir = reference
    multi = root / "multi"
    launched = launch(multi, env, ARG + mesh(2))
    try:
        deadline = time.monotonic() + 300
        while CUT not in checkpoint_steps(multi) and launched.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint at step CUT in 300 s"
            time.sleep(0.01)
        os.killpg(launched.pid, signal.SIGKILL)  # every process of the job, at once
    finally:
        log = finish(launched, multi, timeout=60)
    if launched.returncode not in (-signal.SIGKILL, 128 + signal.SIGKILL):
        check_launch(pytestconfig, tmp_path_factory, launched, log, multi, expect=-9)
    assert not os.path.exists(multi / "results.json")
    assert CUT in checkpoint_steps(multi)
    wait(train(multi, ARG + mesh(4), env, 4), multi)
    assert "Resumed from step" in read(f"{multi}.log")
    assert_same(final(multi), final(workdir))
    resumed_at = jobs(multi)[1]["from_step"]
    assert [(j["from_step"], j["devices"], j["processes"], j["mesh"]) for j in jobs(multi)] == [
        (0, 4, 2, {"data": 2, "fsdp": 2}),
        (resumed_at, 4, 1, {"data": 1, "fsdp": 4}),
    ]
    assert CUT <= resumed_at < STEPS
