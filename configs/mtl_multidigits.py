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
Expected: on 2 free CPU cores an EW run takes ~50 s (33 ms per train step, 42 s for the
1000-step loop, plus start-up, compilation and evaluation; 2-3x longer on shared cores);
param-space gradient methods take ~4.1x EW's step time, rep-space ones ~1.3x
(`python -m hisd_jax.bench --config configs/mtl_multidigits.py --strategies all`).
--config.model.width=12 is ~25% faster (34 s loop) and a few points less accurate.
Measured at 1000 steps, seed 0 (test accuracy %, ink MAE):
  single-task  left 94.1  right 94.6  sum 66.7  same_parity 85.0  ink 0.032
  ew           left 93.1  right 93.5  sum 85.1  same_parity 94.2  ink 0.129  (Delta_m -54.7%)
  mgda@rep     left 90.4  right 92.6  sum 50.6  same_parity 93.5  ink 0.061  (Delta_m -22.8%)
Sharing helps the slow tasks (sum, same_parity) and hurts the regression task, whose small
MSE loss EW under-weights; its relative MAE change dominates Delta_m.
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
    c.optimizer.warmup_steps = min(50, arg.steps // 10)
    c.train.steps = arg.steps
    c.train.batch_size = 128
    c.train.log_every = 100
    c.train.eval_every = 0  # validation only at the end
    c.train.checkpoint_every = 500
    if arg.single:
        return single_task_config(c, arg.single)
    return method_config(c, arg.method, arg.space, name=c.name)
