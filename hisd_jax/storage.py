"""Workdir files on a local disk or on object storage (gs://, s3://), through `etils.epath`.

Every file the project writes or reads in a workdir besides Orbax's checkpoints (config.json,
metrics.jsonl, results.json, reports, plots, exports) goes through here; Orbax takes the same
paths. (The run's lock, `loop.WorkdirLock`, is an flock on a local disk; object storage has
none.) A local path and a URL run the same code; what differs is what the storage offers:

  local disk       rename is atomic, files can be appended to, `flock` works
  object storage   one object is written whole or not at all (a reader sees the old object
                   or the new one); no rename, no append, no locks

so `write_atomic` writes a temporary file and renames it over the target on a local disk and
uploads the object directly on object storage, and `metrics.MetricWriter` appends to
metrics.jsonl locally but rewrites the whole object on object storage (as tensorboardX does
with its event files on gs://). Object storage needs its file-system packages (gs://:
`pip install gcsfs google-cloud-storage`, the second for TensorBoard); `check_backend` names
what is missing in one line before anything runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import secrets

from etils import epath

OBJECT_STORE_SCHEMES = ("gs://", "s3://", "az://")
# What each scheme needs installed: etils reads and writes through fsspec (gcsfs, s3fs, adlfs)
# or TensorFlow's gfile; tensorboardX writes gs:// event files with google-cloud-storage and
# s3:// ones with boto3. (readers: any one of them; writers: all; the pip command)
_PACKAGES = {
    "gs://": (("gcsfs", "tensorflow"), ("google.cloud.storage",), "gcsfs google-cloud-storage"),
    "s3://": (("s3fs", "tensorflow"), ("boto3",), "s3fs boto3"),
    "az://": (("adlfs",), (), "adlfs"),
}


def is_url(path) -> bool:
    """Whether `path` is a URL (`scheme://...`) rather than a local path."""
    return "://" in os.fspath(path)


def is_object_store(path) -> bool:
    """Whether `path` lies on object storage (gs://, s3://, az://): no rename, append or flock."""
    return os.fspath(path).startswith(OBJECT_STORE_SCHEMES)


def check_backend(path) -> str | None:
    """Why files at `path` cannot be read or written here (an unsupported URL scheme, or a
    missing package, named with its pip command), or None."""
    for scheme, (readers, writers, pip) in _PACKAGES.items():
        if os.fspath(path).startswith(scheme):
            missing = [m for m in writers if not _installed(m)]
            if not any(_installed(m) for m in readers):
                missing.insert(0, readers[0])
            if missing:
                return f"{scheme} paths need {' and '.join(missing)} (pip install {pip})"
            return None
    if is_url(path):
        schemes = ", ".join(OBJECT_STORE_SCHEMES)
        return f"unsupported URL scheme (a local path, or one of {schemes})"
    return None


def check_url(path, flag: str = "workdir") -> None:
    """ConfigError (one line, naming `--flag`) when `path` is a URL this machine cannot use
    (`check_backend`); nothing for a local path."""
    problem = check_backend(path)
    if problem:
        from hisd_jax.errors import ConfigError  # noqa: PLC0415

        raise ConfigError(f"--{flag}={os.fspath(path)!r}: {problem}")


@functools.cache
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def absolute(path) -> str:
    """`path` made absolute (a local path) or unchanged (a URL), as a string."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def _path(path) -> epath.Path:
    """`path` as an epath.Path; OSError (one line) for a URL this machine cannot use."""
    problem = check_backend(path)
    if problem:
        raise OSError(f"{os.fspath(path)}: {problem}")
    return epath.Path(path)


def exists(path) -> bool:
    return _path(path).exists()


def isdir(path) -> bool:
    return _path(path).is_dir()


def makedirs(path) -> None:
    """Creates directory `path` and its parents (object storage: a no-op in effect)."""
    _path(path).mkdir(parents=True, exist_ok=True)


def listdir(path) -> list[str]:
    """The names in directory `path`, sorted."""
    return sorted(p.name for p in _path(path).iterdir())


def read_text(path) -> str:
    """The text of file `path`; FileNotFoundError if there is none."""
    return _path(path).read_text()


def write_atomic(path, write, *, binary: bool = False) -> None:
    """Writes file `path` with `write(f)` so a reader (or a rerun after a crash) sees the
    previous file or the complete new one, never a partial one; a failed write leaves the
    previous file as it was.

    Local disk: a temporary file beside `path`, flushed and fsynced, renamed over it
    (`os.replace`), and the directory fsynced. Object storage: the object uploaded directly
    (an upload is atomic there). `binary`: `f` takes bytes.
    """
    mode = "wb" if binary else "w"
    if is_object_store(path):
        with _path(path).open(mode) as f:
            write(f)
        return
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    )
    # Created like open(path, "w") would (mode 0o666 less the umask), but never over a file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Makes the rename durable where the platform allows fsync on a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_figure(fig, path, *, dpi: int) -> None:
    """A matplotlib figure written to `path` (PNG) with `write_atomic`."""
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi), binary=True)
