"""KD from converged tasks on five MultiDigits tasks with a small training split.

The setting of Lu et al. (NAACL 2022): tasks converge at different times, so some overfit
while others still learn. The 5-task MultiDigits benchmark of `mtl_multidigits.py` with only
`num_train` training canvases and a long budget: the digit tasks and the regression task peak
early on validation and then decline, while `sum` keeps improving (see the README's curves).

Run (EW, the paper's base, and the two KD settings):
  python -m hisd_jax.main --config configs/kd_multidigits.py --workdir runs/kd_ew
  python -m hisd_jax.main --config configs/kd_multidigits.py:program=kd_joint --workdir runs/kd_joint
  python -m hisd_jax.main --config configs/kd_multidigits.py:program=kd_sequential --workdir runs/kd_seq
Variants: method= any MTL method (with program=standard, kd_joint or kd_sequential), space=,
  seed=, steps=, num_train=, patience=, single=<task> (the single-task baseline).
Sweep with Delta_m% against the single-task baselines:
  python -m hisd_jax.sweep --config configs/kd_multidigits.py --seeds 0,1,2 \\
      --methods ew,cagrad,nashmtl,kd_joint,kd_sequential --workdir runs/kd_sweep
Figure (validation curves with the convergence markers):
  python -m hisd_jax.plots --workdirs runs/kd_ew,runs/kd_joint,runs/kd_seq --out kd_curves.png
Expected time and result: see the README's KD section (measured there).
"""

from hisd_jax.config import base_config, parse_arg
from hisd_jax.mtl.tasks import method_config, single_task_config

TASKS = ("left", "right", "sum", "same_parity", "ink")


def get_config(arg=None):
    arg = parse_arg(
        arg,
        method="ew",
        space="param",
        program="standard",
        seed=0,
        steps=3000,
        num_train=4000,
        patience=4,
        single="",
    )
    c = base_config()
    c.name = "kd_multidigits"
    c.seed = arg.seed
    c.data.name = "multidigits"
    c.data.tasks = TASKS
    c.data.kwargs = {"num_train": arg.num_train}
    c.model.name = "resnet"
    c.model.stage_sizes = (1, 1, 1, 1)
    c.model.width = 16
    c.model.strides = (1, 2, 2, 1)
    c.model.task_exits = {t: (3,) for t in TASKS}
    c.objective.preset = "final_only"
    c.mtl.metrics = {t: {"accuracy": "higher"} for t in TASKS if t != "ink"}
    c.mtl.metrics.ink = {"mae": "lower"}
    c.optimizer.name = "adam"
    c.optimizer.lr = 3e-3
    c.optimizer.schedule = "constant"
    c.train.steps = arg.steps
    c.train.batch_size = 128
    c.train.log_every = 100
    c.train.eval_every = 100
    c.train.checkpoint_every = 500
    c.program.patience = arg.patience
    if arg.single:
        return single_task_config(c, arg.single)
    return method_config(c, arg.method, arg.space, name=c.name, program=arg.program)
