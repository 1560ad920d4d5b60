"""Reading a trained workdir back, for the commands that work on one (`evaluate`, `export`,
`compare`, `plots`).

  load_config(workdir)     the config its run started with (`stored_config`), with fields added
                           since the run at their defaults
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
from hisd_jax import storage
from hisd_jax.data import eval_batches
from hisd_jax.errors import WorkdirError
from hisd_jax.stored_config import read_config_json, stored_config


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of a trained `workdir` (`stored_config`); fields added to `base_config` since
    the run take their defaults. FileNotFoundError naming config.json when the workdir holds no
    config at all; WorkdirError when its config.json is damaged and no checkpoint records one;
    ConfigError for a URL this machine cannot read (`storage.check_url`)."""
    storage.check_url(workdir)
    stored = stored_config(workdir)
    if stored is None:
        path = os.path.join(workdir, "config.json")
        _, problem = read_config_json(workdir)
        if problem == "missing":
            raise FileNotFoundError(f"{path} not found: {workdir} is not a trained workdir")
        raise WorkdirError(f"{path} is damaged ({problem}) and no checkpoint records the config")
    defaults = json.loads(config_lib.base_config().to_json_best_effort())
    config = ml_collections.ConfigDict(config_lib.fill_defaults(stored, defaults))
    return on_these_devices(config)


def on_these_devices(config) -> ml_collections.ConfigDict:
    """`config` with its mesh fitted to this job's devices: the mesh it trained on when it fits,
    else every device on `data` with the state replicated (mesh.fsdp = 1; logged). The mesh is
    where the state lives, not what it is: a restore reshards into whichever mesh this is."""
    from hisd_jax import parallel  # noqa: PLC0415

    try:
        parallel.mesh_shape(config.mesh)
    except ValueError as e:
        logging.warning("%s; evaluating with the state replicated on this job's devices", e)
        config.mesh.data, config.mesh.fsdp = -1, 1
    return config


def load_workdir(workdir: str, *, with_step: bool = False):
    """(Experiment, variables {'params', 'batch_stats'}) of a workdir's latest checkpoint.

    Restored like a resume (`loop.restore_latest`): onto the current devices, replicated,
    whatever device count or process count the run trained on, from the newest checkpoint that
    reads cleanly (`WorkdirError` if none does, FileNotFoundError if there is none). An
    unfinished run (no results.json) is used with a warning naming its step. With `with_step`,
    returns (Experiment, variables, the checkpoint's step).
    """
    config = load_config(workdir)  # first: a missing workdir fails before heavy imports
    from hisd_jax import experiment  # noqa: PLC0415
    from hisd_jax import loop as loop_lib  # noqa: PLC0415

    exp = experiment.build_experiment(config)
    # the trainer's own restore: onto this process's devices, whatever the run trained on
    # (Orbax reshards), the newest checkpoint that reads cleanly
    state, data_state = loop_lib.restore_latest(exp, workdir)
    if not storage.exists(os.path.join(workdir, "results.json")):
        logging.warning(
            "%s is unfinished (no results.json): using its latest checkpoint, step %d of %d",
            workdir,
            int(data_state["step"]),
            config.train.steps,
        )
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return (exp, variables, int(data_state["step"])) if with_step else (exp, variables)


def split_arrays(exp, split: str, label_key: str):
    """Host images [N, ...] and labels [N] of a whole split (read once, in order)."""
    images, labels = [], []
    for batch in eval_batches(exp.dataset.splits[split], exp.config.train.eval_batch_size):
        real = batch["mask"] > 0
        images.append(batch[exp.dataset.input_key][real])
        labels.append(batch[label_key][real])
    return np.concatenate(images), np.concatenate(labels)
