"""KD from converged tasks on five MultiDigits tasks whose training labels are noisy.

The setting of Lu et al. (NAACL 2022): tasks converge at different times, and a task that has
peaked declines while the others still learn. Here that happens because part of the training
labels are wrong (`data.kwargs.label_noise`: 20 % of the `left` and `same_parity` labels and
30 % of the `right` and `sum` labels are redrawn uniformly over the classes, so ~18 / 10 / 27 /
28 % are wrong; `ink` and the validation and test splits are clean): the network fits the clean signal first and memorises the noise later, so
each task's validation accuracy peaks (left/right at ~1100 steps, sum/same_parity at ~1300,
ink's MAE at ~1600, seed 0) and then declines (left 87.5 -> 78.1 %, right 86.4 -> 73.9 %,
sum 71.3 -> 56.1 %, same_parity 88.2 -> 80.8 % at step 3000 under EW). The 5-task benchmark
of `mtl_multidigits.py` with 20000 training canvases, a constant learning rate (no decay to
hide the decline) and validation every 100 steps (the curves convergence is tracked on).

Run (EW, the paper's base, and the two KD settings):
  python -m hisd_jax.main --config configs/kd_multidigits.py --workdir runs/kd_ew
  python -m hisd_jax.main --config configs/kd_multidigits.py:program=kd_joint --workdir runs/kd_joint
  python -m hisd_jax.main --config configs/kd_multidigits.py:program=kd_sequential --workdir runs/kd_seq
Variants: method= any MTL method (with program=standard, kd_joint or kd_sequential), space=,
  seed=, steps=, num_train=, patience=, noise= (a factor on every noise rate; 0 = clean
  labels), single=<task> (the single-task baseline).
Sweep with Delta_m% against the single-task baselines (README: the whole table's command):
  python -m hisd_jax.sweep --config configs/kd_multidigits.py --seeds 0,1,2 \\
      --methods ew,cagrad@rep,kd_joint,kd_sequential --workdir runs/kd_sweep
Figure (validation curves with the convergence markers):
  python -m hisd_jax.plots --workdirs runs/kd_ew,runs/kd_joint,runs/kd_seq --out kd_curves.png
Expected: ~3 min an EW run on 2 CPU cores (3000 steps, validation every 100); a KD run stops
when every task has converged. Test-split numbers for every method, 3 seeds: README.
"""

import os

from hisd_jax.config import ConfigError, config_from_file, parse_arg
from hisd_jax.mtl.tasks import method_config, single_task_config

_HERE = os.path.dirname(os.path.abspath(__file__))
LABEL_NOISE = {"left": 0.2, "right": 0.3, "sum": 0.3, "same_parity": 0.2}  # training split only


def get_config(arg=None):
    arg = parse_arg(
        arg,
        method="ew",
        space="param",
        program="standard",
        seed=0,
        steps=3000,
        num_train=20000,
        patience=4,
        noise=1.0,
        single="",
    )
    c = config_from_file(
        os.path.join(_HERE, "mtl_multidigits.py"), f"seed={arg.seed},steps={arg.steps}"
    )
    c.unlock()
    c.name = "kd_multidigits"
    top = 1.0 / max(LABEL_NOISE.values())
    if not 0.0 <= arg.noise <= top:  # every rate must stay a probability
        raise ConfigError(
            f"configs/kd_multidigits.py: noise={arg.noise} must lie in [0, {top:.3g}]"
        )
    noise = {t: arg.noise * r for t, r in LABEL_NOISE.items()}
    c.data.kwargs = {"num_train": arg.num_train, "label_noise": noise}
    c.optimizer.schedule = "constant"  # no decay that would hide overfitting
    c.optimizer.warmup_steps = 0
    c.train.eval_every = 100  # the validation curves convergence is tracked on
    c.program.patience = arg.patience
    c.lock()
    if arg.single:
        return single_task_config(c, arg.single)
    return method_config(c, arg.method, arg.space, name=c.name, program=arg.program)
