"""The trainer: `train_and_evaluate(config, workdir) -> results`.

Build the experiment (validating the config before anything compiles or touches the
workdir), restore or initialise the state, run the loop with the config's training program,
evaluate every (task, exit) on the validation and test splits, and write `results.json`.

Workdir layout: config.json, metrics.jsonl, tb/ (TensorBoard), checkpoints/, results.json. A
workdir may be a local directory or a bucket URL (gs://...; `storage.py`).
"""

import os

import jax
from absl import logging

from hisd_jax import jsonio, provenance
from hisd_jax import loop as loop_lib
from hisd_jax.experiment import Experiment, TrainState, build_experiment
from hisd_jax.inference import cost as cost_lib
from hisd_jax.models import exit_positions, model_section


def exit_table(exp: Experiment, state: TrainState) -> dict:
    """Per exit: FLOPs (standalone cut model), fraction of the full model, parameters, depth."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    costs = cost_lib.exit_costs(
        cost_lib.piece_flops(exp.model, variables, exp.dataset.image_shape, exp.dataset.input_dtype)
    )
    params = cost_lib.exit_param_counts(jax.device_get(state.params), exp.param_labels)
    depths = exit_positions(model_section(exp.config))
    return {
        name: {
            "flops": float(costs["standalone"][e]),
            "fraction": float(costs["fraction"][e]),
            "cascade_flops": float(costs["cascade"][e]),
            "params": params[e],
            "depth": depths[e],
        }
        for e, name in enumerate(exp.exit_names)
    }


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (resuming from the workdir's latest checkpoint), evaluates, returns results.

    Raises:
      ConfigError: an invalid config, a path that cannot be a workdir, or a workdir holding a
        run of another config (nothing is written then).
      FloatingPointError: a non-finite loss, gradient or parameter (the last good checkpoint
        is kept).
      WorkdirError: the workdir is in use by another run, or none of its checkpoints restores.
    """
    loop_lib.check_workdir_path(workdir)
    exp = build_experiment(config)
    with loop_lib.prepare_workdir(workdir, config), loop_lib.Loop(exp, workdir) as loop:
        logging.info("Config (valid):\n%s", config)
        state = loop.restore_or_init()
        state, info = loop.run(state)
        results = {
            "name": config.name,
            "val": loop.evaluate(state, "val"),
            "test": loop.evaluate(state, "test"),
            "exits": exit_table(exp, state),
            "train": {
                "steps": config.train.steps,
                "steps_taken": info.end,
                "resumed_from": info.start,
                "jobs": loop.jobs,  # one per job that ran it: its devices and mesh
                "wall_time_s": info.wall_time_s,
                "steps_per_s": (info.end - info.start) / info.wall_time_s
                if info.end > info.start
                else None,
            },
            **exp.program.results(state),
            "environment": provenance.environment(),  # commit, package versions, devices
        }
        for split in ("val", "test"):  # once: the last step may have validated already
            loop.writer.write(info.end, split, loop_lib.flat_metrics(results[split]), once=True)
        jsonio.write_json(os.path.join(workdir, "results.json"), results)
    return results
