"""Reading a trained workdir back, for the commands that work on one (`evaluate`, `export`,
`compare`, `plots`).

  load_config(workdir)     its config.json, with fields added since the run at their defaults
  load_workdir(workdir)    (Experiment, {'params', 'batch_stats'}) of its latest checkpoint
  split_arrays(exp, ...)   a whole split as host arrays, in order
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import logging
import numpy as np

from hisd_jax import config as config_lib
from hisd_jax import parallel
from hisd_jax.data import eval_batches


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The workdir's config.json; fields added to `base_config` since the run take defaults."""
    with open(os.path.join(workdir, "config.json")) as f:
        stored = json.load(f)
    defaults = json.loads(config_lib.base_config().to_json_best_effort())
    return ml_collections.ConfigDict(config_lib.fill_defaults(stored, defaults))


def load_workdir(workdir: str):
    """(Experiment, variables {'params', 'batch_stats'}) of a workdir's latest checkpoint.

    Only what inference needs is taken from the checkpoint (not the optimizer or MTL
    strategy state); its structure is checked against the model of config.json. An unfinished
    run (no results.json) is used with a warning naming its step.
    """
    config = load_config(workdir)  # first: a missing workdir fails before heavy imports
    import orbax.checkpoint as ocp  # noqa: PLC0415

    from hisd_jax import experiment  # noqa: PLC0415

    exp = experiment.build_experiment(config)
    replicated = parallel.replicated(exp.mesh)
    like = jax.eval_shape(lambda: experiment.init_state(exp))
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    with ocp.CheckpointManager(directory, item_names=("state",)) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        saved = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    if not os.path.exists(os.path.join(workdir, "results.json")):
        logging.warning(
            "%s is unfinished (no results.json): using its latest checkpoint, step %d of %d",
            workdir,
            step,
            config.train.steps,
        )
    variables = {}
    for key in ("params", "batch_stats"):
        got = saved.state.get(key) or {}
        if jax.tree.structure(got) != jax.tree.structure(getattr(like, key)):
            raise ValueError(
                f"checkpoint {key} in {directory} do not match the model of config.json"
            )
        variables[key] = jax.tree.map(lambda x: jax.device_put(np.asarray(x), replicated), got)
    return exp, variables


def split_arrays(exp, split: str, label_key: str):
    """Host images [N, ...] and labels [N] of a whole split (read once, in order)."""
    images, labels = [], []
    for batch in eval_batches(exp.dataset.splits[split], exp.config.train.eval_batch_size):
        real = batch["mask"] > 0
        images.append(batch["image"][real])
        labels.append(batch[label_key][real])
    return np.concatenate(images), np.concatenate(labels)
