"""The standard program: one batch -> one update, every task active, labels as targets."""

from hisd_jax import steps
from hisd_jax.programs.base import Program


class StandardProgram(Program):
    name = "standard"

    def make_unit_fn(self):
        return steps.standard_step_fn(self.exp)
