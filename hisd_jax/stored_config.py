"""The config a workdir's run started with, read back even when config.json was lost or damaged.

  read_config_json(workdir)     its config.json, or why it cannot be read
  checkpointed_config(workdir)  the config its newest readable checkpoint records
  stored_config(workdir)        the first, else the second (what a resume compares against)

Used by the trainer's resume check (`loop.check_workdir_config`) and by the commands that read a
trained workdir (`workdir.load_config`).
"""

from __future__ import annotations

import json
import os

from absl import logging

from hisd_jax import storage


def read_config_json(workdir: str) -> tuple[dict | None, str | None]:
    """(config.json of `workdir` as a dict, None), or (None, why) when the file is missing
    ("missing") or damaged (not JSON, not an object, unreadable: a kill during a write by an
    older version left 0 bytes). Raises nothing."""
    path = os.path.join(workdir, "config.json")
    try:
        stored = json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"unreadable: {' '.join(str(e).split())[:120]}"
    if not isinstance(stored, dict):
        return None, f"not a JSON object but {type(stored).__name__}"
    return stored, None


def checkpointed_config(workdir: str) -> dict | None:
    """The resolved config stored in the newest checkpoint of `workdir` that has one (every
    checkpoint carries it in its `extra` item), or None. Damaged steps are passed over."""
    directory = os.path.join(workdir, "checkpoints")
    if not storage.isdir(directory):
        return None
    from hisd_jax import checkpointing  # noqa: PLC0415 - Orbax only when there are checkpoints

    ckpt = checkpointing.Checkpointer(directory, every=1, keep=None, async_save=False)
    try:
        for step in reversed(ckpt.all_steps()):
            try:
                config = ckpt.extra(step).get("config")
            except Exception:  # noqa: BLE001 - a damaged step, read in any way: try an older one
                continue
            if isinstance(config, dict):
                return config
        return None
    finally:
        ckpt.close()


def stored_config(workdir: str) -> dict | None:
    """The config `workdir`'s run started with, as JSON: its config.json or, when that file is
    lost or damaged, the config its newest readable checkpoint records (with a warning for a
    damaged file). None when neither exists (a new workdir)."""
    stored, problem = read_config_json(workdir)
    if stored is not None:
        return stored
    stored = checkpointed_config(workdir)
    if problem != "missing":
        logging.warning(
            "%s is damaged (%s)%s",
            os.path.join(workdir, "config.json"),
            problem,
            "; using the config its newest checkpoint records" if stored else "",
        )
    return stored
