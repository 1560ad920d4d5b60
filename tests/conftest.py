"""Shared fixtures: a tiny but real config that trains in seconds on 2 CPU cores."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """A small multi-exit CNN on the embedded digits; `section__field=value` overrides."""
    from hisd_jax.config import base_config

    c = base_config()
    c.name = "tiny"
    c.data.name = "digits"
    c.data.tasks = ("label",)
    c.model.name = "cnn"
    c.model.width = 8
    c.model.stage_sizes = (1, 1, 1)
    c.objective.preset = "hisd"
    c.optimizer.lr = 3e-3
    c.optimizer.schedule = "constant"
    c.train.steps = 40
    c.train.batch_size = 32
    c.train.eval_batch_size = 128
    c.train.log_every = 10
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.train.progress = False
    for key, value in overrides.items():
        section, field = key.split("__")
        c[section][field] = value
    return c


@pytest.fixture
def make_config():
    return tiny_config


def run_python(code_or_args, env_extra=None, timeout=600, **kw):
    """Runs `python -c code` (str) or `python args...` (list) in a fresh process from the repo."""
    env = dict(os.environ)
    env.update(env_extra or {})
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args)
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )
