"""Exact resume: a run killed mid-training (SIGKILL) or preempted (SIGTERM) and rerun in
the same workdir ends with a train state bitwise equal to an uninterrupted run's.

Every run is a fresh `python tests/_workers.py train ...` process; the final state is read
back from the last Orbax checkpoint and compared leaf by leaf (params, BatchNorm
statistics, optimizer state, RNG, step).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from _workers import cache_env, load_npz

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
# The interrupted runs save every 5 steps; the others only at the end (train.checkpoint_every
# may change between a run and its resumption, and does not change the training).
CONFIG = f"train__steps={STEPS},train__eval_every=20,train__log_every=10"
FREQUENT = CONFIG + ",train__checkpoint_every=5"
RARE = CONFIG + f",train__checkpoint_every={STEPS}"
TIMEOUT = 300


def start(workdir, arg, env):
    log = open(os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log"), "a")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "_workers.py"), "train", str(workdir), arg],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.log_path = log.name
    log.close()
    return proc


def finish(proc):
    code = proc.wait(timeout=TIMEOUT)
    with open(proc.log_path) as f:
        log = f.read()
    return code, log


def run(workdir, arg, env):
    code, log = finish(start(workdir, arg, env))
    assert code == 0, f"run in {workdir} failed ({code}):\n{log[-5000:]}"


def checkpoint_steps(workdir):
    """Finalised checkpoint steps (Orbax writes to a tmp dir and renames it to the step)."""
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def run_until_checkpoint(workdir, arg, env, min_step, sig):
    """Starts a run, sends `sig` once a checkpoint at step >= min_step exists; (code, log)."""
    proc = start(workdir, arg, env)
    deadline = time.monotonic() + TIMEOUT
    while not any(s >= min_step for s in checkpoint_steps(workdir)):
        if proc.poll() is not None:
            code, log = finish(proc)
            pytest.fail(
                f"run ended ({code}) before a checkpoint at step {min_step}:\n{log[-5000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint at step >= {min_step} after {TIMEOUT}s")
        time.sleep(0.01)
    proc.send_signal(sig)
    return finish(proc)


def assert_states_equal(got, want):
    got, want = load_npz(got), load_npz(want)
    assert sorted(got) == sorted(want)
    different = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not different, f"{len(different)} of {len(want)} leaves differ, e.g. {different[:5]}"


def data_step(workdir, step):
    """The data iterator's step saved (as JSON) in checkpoint `step`."""
    with open(os.path.join(workdir, "checkpoints", str(step), "data", "metadata")) as f:
        return json.load(f)["step"]


def results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def env(pytestconfig, tmp_path_factory):
    return cache_env(pytestconfig, tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """An uninterrupted run; started in the background, awaited on first use."""
    workdir = tmp_path_factory.mktemp("resume") / "reference"
    proc = start(workdir, RARE, env)

    def wait():
        code, log = finish(proc)
        assert code == 0, f"reference run failed ({code}):\n{log[-5000:]}"
        assert checkpoint_steps(workdir) == [STEPS]
        assert results(workdir)["train"]["resumed_from"] == 0
        return os.path.join(workdir, "final_state.npz")

    yield wait
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_resume_after_sigkill_is_bitwise_exact(tmp_path, env, reference):
    workdir = tmp_path / "run"
    code, log = run_until_checkpoint(workdir, FREQUENT, env, 10, signal.SIGKILL)
    assert code == -signal.SIGKILL, f"expected death by SIGKILL, got {code}:\n{log[-3000:]}"
    assert not os.path.exists(workdir / "results.json"), "the run finished before the kill"
    saved = checkpoint_steps(workdir)
    assert saved and 10 <= saved[-1] < STEPS, saved
    assert data_step(workdir, saved[-1]) == saved[-1]

    run(workdir, RARE, env)
    # Resumed from the last checkpoint that was complete at the kill (a save cut short
    # by the kill is a tmp dir, which Orbax ignores and cleans up).
    assert results(workdir)["train"]["resumed_from"] == saved[-1]
    assert checkpoint_steps(workdir)[-1] == STEPS
    assert not [n for n in os.listdir(workdir / "checkpoints") if not n.isdigit()]
    assert_states_equal(workdir / "final_state.npz", reference())


def test_resume_after_sigterm_is_bitwise_exact(tmp_path, env, reference):
    workdir = tmp_path / "run"
    code, log = run_until_checkpoint(workdir, FREQUENT, env, 10, signal.SIGTERM)
    assert code == 143, f"a preempted run exits with 143, got {code}:\n{log[-3000:]}"
    assert "Preempted at step" in log
    assert not os.path.exists(workdir / "results.json")
    saved = checkpoint_steps(workdir)
    assert saved and 10 <= saved[-1] < STEPS, saved
    # The preemption checkpoint holds the step the run stopped at: the data iterator has
    # handed out exactly that many batches, and the rerun's train state starts there.
    assert data_step(workdir, saved[-1]) == saved[-1]

    run(workdir, RARE, env)
    assert results(workdir)["train"]["resumed_from"] == saved[-1]
    assert_states_equal(workdir / "final_state.npz", reference())


def test_two_runs_racing_for_one_workdir_exactly_one_trains(pytestconfig, tmp_path_factory):
    """The same command started twice at once on one workdir: one run trains to the end, the
    other stops at once with one line naming the holder (exit 1) and writes nothing; then a
    rerun, the lock released, finds the run finished."""
    env = cache_env(pytestconfig, tmp_path_factory)
    workdir = tmp_path_factory.mktemp("race") / "run"
    cmd = [
        sys.executable,
        "-m",
        "hisd_jax.main",
        "--config=tests/_workers.py:train__steps=60,train__checkpoint_every=20",
        f"--workdir={workdir}",
    ]
    procs = [
        subprocess.Popen(
            cmd, cwd=REPO, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[1] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    loser = outs[[p.returncode for p in procs].index(1)]
    lines = [line for line in loser.strip().splitlines() if line.startswith("workdir error:")]
    assert len(lines) == 1 and "is in use by another run (pid " in lines[0], loser
    results = json.loads((workdir / "results.json").read_text())
    assert results["train"]["steps_taken"] == 60 and results["train"]["resumed_from"] == 0
    again = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.parametrize("after", ["config.json", "metrics.jsonl"])
def test_sigterm_during_start_up_leaves_a_workdir_that_reruns(tmp_path, env, reference, after):
    """SIGTERM as soon as `after` exists (start-up: the workdir and config.json are written,
    no checkpoint yet, or the preemption checkpoint of the first steps): the rerun of the same
    command finishes the run, equal to an uninterrupted run (the module's reference, the same
    config)."""
    killed = tmp_path / "killed"
    proc = start(killed, RARE, env)
    deadline = time.monotonic() + TIMEOUT
    while not (killed / after).exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "the run never wrote " + after
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    finish(proc)
    run(killed, RARE, env)
    assert_states_equal(killed / "final_state.npz", reference())
