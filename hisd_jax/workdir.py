"""Reading a trained workdir back, for the commands that work on one (`evaluate`, `export`,
`compare`, `plots`).

  stored_config(workdir)   the config its run started with (config.json, else its checkpoints')
  load_config(workdir)     that config, with fields added since the run at their defaults
  load_workdir(workdir)    (Experiment, {'params', 'batch_stats'}) of its latest checkpoint
  split_arrays(exp, ...)   a whole split as host arrays, in order
"""

from __future__ import annotations

import json
import os

import ml_collections
from absl import logging
import numpy as np

from hisd_jax import config as config_lib
from hisd_jax.data import eval_batches
from hisd_jax.errors import WorkdirError


def read_config_json(workdir: str) -> tuple[dict | None, str | None]:
    """(config.json of `workdir` as a dict, None), or (None, why) when the file is missing
    ("missing") or damaged (not JSON, not an object, unreadable: a kill during a write by an
    older version left 0 bytes). Raises nothing."""
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            stored = json.load(f)
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
    if not os.path.isdir(directory):
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


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of a trained `workdir` (`stored_config`); fields added to `base_config` since
    the run take their defaults. FileNotFoundError naming config.json when the workdir holds no
    config at all; WorkdirError when its config.json is damaged and no checkpoint records one."""
    stored = stored_config(workdir)
    if stored is None:
        path = os.path.join(workdir, "config.json")
        _, problem = read_config_json(workdir)
        if problem == "missing":
            raise FileNotFoundError(f"{path} not found: {workdir} is not a trained workdir")
        raise WorkdirError(f"{path} is damaged ({problem}) and no checkpoint records the config")
    defaults = json.loads(config_lib.base_config().to_json_best_effort())
    return ml_collections.ConfigDict(config_lib.fill_defaults(stored, defaults))


def load_workdir(workdir: str):
    """(Experiment, variables {'params', 'batch_stats'}) of a workdir's latest checkpoint.

    Restored like a resume (`loop.restore_latest`): onto the current devices, replicated,
    whatever device count or process count the run trained on, from the newest checkpoint that
    reads cleanly (`WorkdirError` if none does, FileNotFoundError if there is none). An
    unfinished run (no results.json) is used with a warning naming its step.
    """
    config = load_config(workdir)  # first: a missing workdir fails before heavy imports
    from hisd_jax import experiment  # noqa: PLC0415
    from hisd_jax import loop as loop_lib  # noqa: PLC0415

    exp = experiment.build_experiment(config)
    # the trainer's own restore: onto this process's devices, whatever the run trained on
    # (Orbax reshards), the newest checkpoint that reads cleanly
    state, data_state = loop_lib.restore_latest(exp, workdir)
    if not os.path.exists(os.path.join(workdir, "results.json")):
        logging.warning(
            "%s is unfinished (no results.json): using its latest checkpoint, step %d of %d",
            workdir,
            int(data_state["step"]),
            config.train.steps,
        )
    return exp, {"params": state.params, "batch_stats": state.batch_stats}


def split_arrays(exp, split: str, label_key: str):
    """Host images [N, ...] and labels [N] of a whole split (read once, in order)."""
    images, labels = [], []
    for batch in eval_batches(exp.dataset.splits[split], exp.config.train.eval_batch_size):
        real = batch["mask"] > 0
        images.append(batch["image"][real])
        labels.append(batch[label_key][real])
    return np.concatenate(images), np.concatenate(labels)
