"""MTL benchmark: five tasks of different difficulty on the embedded MultiDigits data set.

Two real handwritten digits (scikit-learn) on a 12x12 canvas; five tasks that converge at
very different speeds:

  left, right   the top-left / bottom-right digit (10 classes)
  sum           their sum (19 classes, the hardest)
  same_parity   whether both digits have the same parity (2 classes: slow to start alone,
                easy once the digits are known)
  ink           the canvas's mean intensity, standardised (regression, judged by MAE)

A shared 4-stage ResNet trunk (one basic block per stage, width 16, strides 1,2,2,1) with
every task's head on the final exit only (model.task_exits) and the final_only objective:
HiSD composes with any MTL method, but this benchmark is about balancing the tasks. 1000
Adam steps, batch 128, cosine schedule.

Run one method:
  python -m hisd_jax.main --config configs/mtl_multidigits.py:method=pcgrad --workdir runs/pcgrad
Variants: configs/mtl_multidigits.py:method=nashmtl,space=rep,seed=1,steps=500
  method: ew, uw, dwa, rlw, gls (loss weightings), mgda, pcgrad, gradvac, cagrad, imtlg,
  gradnorm, nashmtl (per-task gradients; space=param or rep). `static` needs
  --config.mtl.hparams.weights=(...). single=<task> is that task's single-task baseline
  (data.tasks=(task,), EW, same model and budget).
Every method and baseline over 3 seeds, with Delta_m% (hisd_jax/sweep.py):
  python -m hisd_jax.sweep --config configs/mtl_multidigits.py --seeds 0,1,2 \\
      --methods ew,uw,dwa,rlw,gls,mgda,pcgrad,gradvac,cagrad,imtlg,gradnorm,nashmtl \\
      --workdir runs/mtl_sweep
Expected: an EW run takes ~50 s on 2 CPU cores (start-up, compilation, the 1000-step loop,
evaluation), a parameter-space gradient method ~105 s; the whole sweep above (51 runs) ~65
min. Per-step ratios to EW: `python -m hisd_jax.bench --config configs/mtl_multidigits.py
--strategies all` (see the README). --config.model.width=12 is ~25% faster and a few points
less accurate.
Measured with the sweep above (test split, mean over seeds 0-2; accuracy %, ink MAE):
  single-task  left 93.5  right 94.1  sum 68.3  same_parity 79.4  ink 0.041
  ew           left 92.0  right 93.4  sum 83.3  same_parity 93.2  ink 0.140  (Delta_m -40.2%)
  cagrad       left 92.0  right 93.2  sum 80.6  same_parity 92.9  ink 0.076  (Delta_m -10.1%)
Sharing helps the slow tasks (sum, same_parity) and hurts the regression task, whose small
MSE loss EW under-weights; its relative MAE change dominates Delta_m. Full table: README.
"""

from hisd_jax.config import base_config, parse_arg
from hisd_jax.mtl.tasks import method_config, single_task_config

TASKS = ("left", "right", "sum", "same_parity", "ink")


def get_config(arg=None):
    arg = parse_arg(arg, method="ew", space="param", seed=0, steps=1000, single="")
    c = base_config()
    c.name = "mtl_multidigits"
    c.seed = arg.seed
    c.data.name = "multidigits"
    c.data.tasks = TASKS
    c.model.name = "resnet"
    c.model.stage_sizes = (1, 1, 1, 1)
    c.model.width = 16
    # The last stage keeps the 3x3 resolution (XLA:CPU is slow on 2x2 maps; see
    # configs/hisd_multidigits.py).
    c.model.strides = (1, 2, 2, 1)
    c.model.task_exits = {t: (3,) for t in TASKS}  # every head on the final exit
    c.objective.preset = "final_only"
    c.mtl.metrics = {t: {"accuracy": "higher"} for t in TASKS if t != "ink"}
    c.mtl.metrics.ink = {"mae": "lower"}
    c.optimizer.name = "adam"
    c.optimizer.lr = 3e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = min(50, max(arg.steps, 0) // 10)
    c.train.steps = arg.steps
    c.train.batch_size = 128
    c.train.log_every = 100
    c.train.eval_every = 0  # validation only at the end
    c.train.checkpoint_every = 500
    if arg.single:
        return single_task_config(c, arg.single)
    return method_config(c, arg.method, arg.space, name=c.name)
