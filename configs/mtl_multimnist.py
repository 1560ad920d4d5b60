"""MTL on MultiMNIST (TFDS): two tasks, the top-left digit (the target) and the bottom-right one.

Each 28x28 image overlays two MNIST digits on a 36x36 canvas (top-left and bottom-right, each
shifted by up to 4 px) resized to 28x28 (hisd_jax/data/tfds_sources.py). Shared trunk: a
4-stage ResNet (one basic block per stage, width 16, strides 1,2,2,2), both heads on the
final exit, final_only objective; 5000 Adam steps (~12 epochs) at batch 128.

Needs the TFDS `mnist` data prepared beforehand (nothing is downloaded):
  python -c "import tensorflow_datasets as tfds; tfds.builder('mnist').download_and_prepare(file_format='array_record')"
Run:
  python -m hisd_jax.main --config configs/mtl_multimnist.py:method=pcgrad --workdir runs/mm
Variants: configs/mtl_multimnist.py:method=mgda,space=rep,seed=1,steps=2000,data_dir=/data
  single=left (or right) is that task's single-task baseline.
αVIL and the target-focused baselines (the left digit is the target, as in the αVIL paper):
  program=alphavil (αVIL with the settings of configs/alphavil_multidigits.py), program=diw,
  method=gcosine; budget=examples gives αVIL the examples, not the epochs, of the others.
Sweep with Delta_m% against single-task baselines (see hisd_jax/sweep.py):
  python -m hisd_jax.sweep --config configs/mtl_multimnist.py --methods ew,mgda,pcgrad,nashmtl \\
      --seeds 0,1,2 --workdir runs/mm_sweep
Expected: not measured here (no network on the development machine); MultiMNIST models of
this size usually reach ~95-97% on the left digit and ~93-95% on the right one. On 2 CPU
cores one run takes several minutes; on one GPU about a minute.
"""

from hisd_jax.config import base_config, parse_arg
from hisd_jax.mtl.tasks import method_config, single_task_config
from hisd_jax.programs import alphavil

TASKS = ("left", "right")


def get_config(arg=None):
    arg = parse_arg(
        arg,
        method="ew",
        space="param",
        program="standard",
        budget="epochs",
        seed=0,
        steps=5000,
        single="",
        data_dir="",
    )
    c = base_config()
    c.name = "mtl_multimnist"
    c.seed = arg.seed
    c.data.name = "multimnist"
    c.data.tasks = TASKS
    if arg.data_dir:
        c.data.kwargs.data_dir = arg.data_dir
    c.model.name = "resnet"
    c.model.stage_sizes = (1, 1, 1, 1)
    c.model.width = 16
    c.model.strides = (1, 2, 2, 2)  # 28 -> 28, 14, 7, 4
    c.model.task_exits = {t: (3,) for t in TASKS}
    c.objective.preset = "final_only"
    c.mtl.metrics = {t: {"accuracy": "higher"} for t in TASKS}
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = min(200, max(arg.steps, 0) // 10)
    c.train.steps = arg.steps
    c.train.batch_size = 128
    c.train.eval_batch_size = 1000
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.program.target = "left"  # αVIL, DIW and gcosine's target
    alphavil.benchmark_settings(c, arg.budget)  # αVIL: see configs/alphavil_multidigits.py
    if arg.single:
        return single_task_config(c, arg.single)
    return method_config(c, arg.method, arg.space, name=c.name, program=arg.program)
