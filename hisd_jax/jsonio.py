"""Result files (JSON, text tables), written atomically and by one process.

`write_json(path, obj)` (and `write_text(path, text)`) writes into a temporary file next to
`path`, flushes and fsyncs it, then renames it over `path` (`os.replace`), so a reader (or a rerun after a crash)
sees either the previous file or the complete new one, never a partial one; a failed write
leaves the previous file as it was and no temporary file behind. Only process 0 of a
multi-process JAX run writes; on the others it does nothing, so every process may call it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets

import jax


def write_json(path: str, obj, *, indent: int | None = 2) -> None:
    """Writes `obj` as JSON to `path` atomically, on process 0 only (see the module doc).

    Values json does not know are converted with `float` (numpy scalars, 0-d arrays); anything
    else that json cannot serialise raises, and `path` is left untouched.
    """

    def dump(f):
        json.dump(obj, f, indent=indent, default=float)
        f.write("\n")

    _write_atomic(path, dump)


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically, on process 0 only (tables such as sweep.md)."""
    _write_atomic(path, lambda f: f.write(text))


def _write_atomic(path: str, write) -> None:
    if jax.process_index() != 0:
        return
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    )
    # Created like open(path, "w") would (mode 0o666 less the umask), but never over a file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
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
