"""What produced a result: the code's commit, the package versions and the devices.

`environment()` is stored in every results.json (key "environment") so that a number in a
table names the exact software and hardware behind it; `constraints.txt` pins the versions the
README's tables were produced with (`scripts/setup_env.sh` installs with it).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

# The distributions whose versions change the numbers (the stack and what it computes with).
PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "chex",
    "numpy",
    "scipy",
    "scikit-learn",
    "ml-collections",
    "tensorflow-datasets",
    "grain",
    "tensorstore",
)


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """{distribution: installed version, or None when it is not installed}."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: str | None = None) -> dict[str, str | bool | None]:
    """{"commit": HEAD's sha of the checkout holding `path` (default: this package), "dirty":
    whether tracked files differ from it}; both None outside a git checkout (an installed
    wheel) or without git."""
    path = path or os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=path, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def environment() -> dict:
    """JSON-ready: commit, dirty flag, Python, platform, JAX backend, device kind and counts,
    and `package_versions()`."""
    import jax  # noqa: PLC0415

    devices = jax.devices()
    return {
        **git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "packages": package_versions(),
    }
