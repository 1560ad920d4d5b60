"""Result files (JSON, text tables), written atomically and by one process.

`write_json(path, obj)` (and `write_text(path, text)`) writes `path` through
`storage.write_atomic`: a reader (or a rerun after a crash) sees either the previous file or
the complete new one, never a partial one, on a local disk (temporary file, fsync, rename) and
on object storage (one upload); a failed write leaves the previous file as it was. Only process
0 of a multi-process JAX run writes; on the others it does nothing, so every process may call
it.
"""

from __future__ import annotations

import json

import jax

from hisd_jax import storage


def write_json(path: str, obj, *, indent: int | None = 2) -> None:
    """Writes `obj` as JSON to `path` atomically, on process 0 only (see the module doc).

    Values json does not know are converted with `float` (numpy scalars, 0-d arrays); anything
    else that json cannot serialise raises, and `path` is left untouched.
    """
    text = json.dumps(obj, indent=indent, default=float) + "\n"  # fails before any write
    write_text(path, text)


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically, on process 0 only (tables such as sweep.md)."""
    if jax.process_index() == 0:
        storage.write_atomic(path, lambda f: f.write(text))


def read_json(path: str):
    """The JSON value in file `path` (local or object storage); FileNotFoundError if none."""
    return json.loads(storage.read_text(path))
