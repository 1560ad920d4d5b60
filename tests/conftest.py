"""Shared fixtures: a tiny but real config that trains in seconds on 2 CPU cores."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_ENV = (
    "JAX_COMPILATION_CACHE_DIR",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
    "XLA_FLAGS",
)
# XLA's CPU backend compiles with LLVM at -O3 by default. The suite's programs are tiny and
# compiled once or run a few hundred steps, so compilation is most of their cost: at -O1 the
# tiny config's init compiles in 1.0 s instead of 3.4 s and its train step in 2.4 s instead of
# 2.9 s, and the step runs as fast (2.2 ms). XLA's HLO passes (fusion, layout, sharding) are
# the same; only the machine code generator works less. Every process the suite starts
# inherits it, and adds its device count to it (`xla_flags`).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole test session: this process, the
    pytest-xdist workers and every process a test starts (they inherit the environment), so
    a program compiled once (the tiny config's train step, say) is read from disk elsewhere.

    It lives in pytest's cache directory (.pytest_cache/d/jax_compilation_cache), so later
    sessions skip most compilation too; entries are keyed by the program, the JAX version and
    the flags, so a stale entry is never used. Without pytest's cache provider
    (-p no:cacheprovider) it lasts one session. Set before any test module imports JAX; a
    JAX_COMPILATION_CACHE_DIR set by the user wins.
    """
    cache = getattr(config, "cache", None)
    if cache is not None:
        path = str(cache.mkdir("jax_compilation_cache"))
    else:
        import tempfile  # noqa: PLC0415

        path = tempfile.mkdtemp(prefix="jax_compilation_cache_")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", path)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    os.environ["XLA_FLAGS"] = xla_flags()


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a process of the suite: the user's (less any device count),
    TEST_XLA_FLAGS, and `devices` fake CPU devices when given."""
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    if TEST_XLA_FLAGS not in flags:
        flags.append(TEST_XLA_FLAGS)
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


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
    return override(c, **overrides)


def override(c, **overrides):
    """`c` with `section__field=value` overrides applied (in place); returns `c`."""
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
