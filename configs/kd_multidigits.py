"""KD from converged tasks on five MultiDigits tasks with a small training split.

The setting of Lu et al. (NAACL 2022): tasks converge at different times, so some overfit
while others still learn. The 5-task MultiDigits benchmark of `mtl_multidigits.py` with only
`num_train` training canvases, a constant learning rate and validation every 100 steps: the
digit tasks reach their plateau by step ~500 while `sum` improves until ~1700 (on this data
the curves plateau rather than decline after their peak).

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
Expected: ~3.5 min a run on 2 CPU cores (3000 steps, validation every 100). Seed 0, test split:
EW left 84.6 / right 87.4 / sum 62.2 / same_parity 86.1 % / ink MAE 0.150; kd_joint 85.0 / 88.0
/ 62.8 / 86.4 % / 0.157 (4 of 5 tasks converged by step 1500); kd_sequential finishes only 2
tasks in 3000 steps (give it steps >= 5 x the time one task takes to converge).
"""

import os

from hisd_jax.config import config_from_file, parse_arg
from hisd_jax.mtl.tasks import method_config, single_task_config

_HERE = os.path.dirname(os.path.abspath(__file__))


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
    c = config_from_file(
        os.path.join(_HERE, "mtl_multidigits.py"), f"seed={arg.seed},steps={arg.steps}"
    )
    c.unlock()
    c.name = "kd_multidigits"
    c.data.kwargs = {"num_train": arg.num_train}
    c.optimizer.schedule = "constant"  # no decay that would hide overfitting
    c.optimizer.warmup_steps = 0
    c.train.eval_every = 100  # the validation curves convergence is tracked on
    c.program.patience = arg.patience
    c.lock()
    if arg.single:
        return single_task_config(c, arg.single)
    return method_config(c, arg.method, arg.space, name=c.name, program=arg.program)
