"""The program protocol: what one unit of work is and what happens at evaluation time.

The loop (`loop.py`) calls, in this order:

  program.init_state(variables)            the program's state pytree (inside the jitted init;
                                           it lives in `TrainState.program`, so it is
                                           checkpointed, restored and replicated with the rest)
  program.run_unit(state, sums, batches)   one unit of work on `batches_per_unit` global
                                           batches of the training stream; it adds its metrics
                                           to `sums` (None after a log step) and takes exactly
                                           `updates_per_unit` optimizer steps (`state.step`)
  program.after_eval(state, step, val)     host side, after each periodic validation; may
                                           return a changed state (e.g. switch a task's loss)
  program.total_steps                      the run's length in steps (default train.steps)
  program.done(state)                      asked at evaluation steps: stop before the budget
  program.results(state)                   extra entries for results.json

and, around checkpoints (every process):

  program.save_artifacts(workdir, state)   before each checkpoint: write what the rolling
                                           checkpoints leave out (`checkpointed`)
  program.checkpointed(state)              the state the rolling checkpoints hold
  program.restore_artifacts(workdir, restored, fresh)
                                           after a restore: the full state from the restored
                                           `checkpointed` state (`fresh`: a new initial state)

The default checkpoints the whole state. A program with large data that is written once (KD's
soft labels) or must outlive the retention of rolling checkpoints (each task's best parameters)
keeps it in `checkpointing.ItemStore`s of its own under the workdir.

A subclass usually only writes `make_unit_fn`, returning a pure function `(state, sums,
*batches) -> (state, sums)` composed from `steps.py` (the base class jits it with donated state
and sums); see `standard.py`.
"""

from __future__ import annotations

from typing import Any

from hisd_jax import steps


class Program:
    """Base class of training programs (see the module docstring)."""

    name = "base"
    batches_per_unit = 1  # training-stream batches one unit consumes
    updates_per_unit = 1  # optimizer steps (increments of state.step) one unit takes

    @staticmethod
    def check_fields(program_cfg) -> None:
        """Raises ConfigError for an invalid value of this program's own `program.*` settings,
        without the experiment. Called for every registered program on every run (a setting of
        a program that is not running would otherwise be ignored silently)."""
        del program_cfg

    def __init__(self, exp):
        self.exp = exp
        self._unit = None
        self._zeros = None

    @property
    def total_steps(self) -> int:
        """The steps (`state.step`) the run takes: `train.steps`, unless the program converts
        the budget (αVIL's `program.budget = "examples"`)."""
        return self.exp.config.train.steps

    # ---------------------------------------------------------------- state
    def init_state(self, variables) -> Any:
        """The program's initial state pytree (traced inside the jitted init); `variables` are
        the model's initial {"params", "batch_stats"}."""
        del variables
        return {}

    # ---------------------------------------------------------------- the unit of work
    def make_unit_fn(self):
        """A pure `(state, sums, *batches) -> (state, sums)`; subclasses define it."""
        raise NotImplementedError

    @property
    def unit(self):
        """The unit function jitted as the loop runs it (`steps.jit_unit`), built once."""
        if self._unit is None:
            self._unit = steps.jit_unit(self.exp, self.make_unit_fn(), self.batches_per_unit)
        return self._unit

    def run_unit(self, state, sums, batches: list[dict]):
        """One unit of work; `sums` None starts new metric sums. Returns (state, sums)."""
        if sums is None:
            if self._zeros is None:
                self._zeros = steps.metric_sums_zeros_fn(self.exp, self.unit, state, *batches)
            sums = self._zeros()
        return self.unit(state, sums, *batches)

    # ---------------------------------------------------------------- evaluation time
    def after_eval(self, state, step: int, val_metrics: dict):
        """Called after each periodic validation with {task: {exit: metrics}}; returns state."""
        del step, val_metrics
        return state

    def done(self, state) -> bool:
        """Whether training may stop before `train.steps` (asked at evaluation steps)."""
        del state
        return False

    # ---------------------------------------------------------------- checkpointing
    def checkpointed(self, state):
        """The part of `state` the loop's rolling checkpoints hold (default: all of it)."""
        return state

    def save_artifacts(self, workdir: str, state) -> None:
        """Writes, before each checkpoint, what `checkpointed` leaves out (default: nothing)."""
        del workdir, state

    def restore_artifacts(self, workdir: str, restored, fresh):
        """The full train state from a restored `checkpointed(...)` state (default: itself)."""
        del workdir, fresh
        return restored

    def results(self, state) -> dict:
        """Extra entries for results.json (e.g. convergence steps)."""
        del state
        return {}
