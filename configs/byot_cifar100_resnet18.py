"""BYOT's CIFAR-100 setting (Zhang et al., ICCV 2019, "Be Your Own Teacher"): ResNet-18 with an
exit after each of its 4 stages, for a GPU node or a TPU pod (not runnable on 2 CPU cores).

Published (BYOT, Table 1, ResNet-18 on CIFAR-100, test accuracy per exit): 67.85 / 74.57 /
78.23 / 78.64 %. Training as there: SGD lr 0.1 (momentum 0.9, weight decay 5e-4), batch 128,
200 epochs, lr divided by 10 at 1/3 and 2/3 of training (epochs 66, 133: optimizer.schedule
"step"), random 32 x 32 crops of the 4-pixel zero-padded image and horizontal flips
(data.augment "crop_flip").

Needs TFDS `cifar100` prepared beforehand (nothing is downloaded):
  python -c "import tensorflow_datasets as tfds; tfds.builder('cifar100').download_and_prepare(file_format='array_record')"
Multi-GPU node (every local GPU; `pip install -U "jax[cuda12]"`), data parallel:
  python -m hisd_jax.main --config configs/byot_cifar100_resnet18.py --workdir runs/byot_c100
TPU pod slice (each worker runs the same command; the workdir in a bucket every worker sees,
`pip install gcsfs google-cloud-storage` on the workers):
  launch/tpu_pod.sh TPU_NAME ZONE configs/byot_cifar100_resnet18.py gs://BUCKET/runs/byot_c100
Variants: configs/byot_cifar100_resnet18.py:preset=hisd,seed=1,epochs=200,fsdp=1
Expected: ~1 h on one A100-class GPU for 200 epochs (70,200 steps of 128); not measured here.
"""

from hisd_jax.config import base_config, parse_arg

TRAIN_EXAMPLES = 45_000  # TFDS cifar100 train less its last 10% (val)


def get_config(arg=None):
    arg = parse_arg(arg, preset="byot", seed=0, epochs=200, fsdp=1, data_dir="")
    c = base_config()
    c.name = f"cifar100_resnet18_{arg.preset}"
    c.seed = arg.seed
    c.data.name = "cifar100"
    c.data.tasks = ("label",)
    c.data.augment = "crop_flip"
    c.data.crop_padding = 4
    if arg.data_dir:
        c.data.kwargs = {"data_dir": arg.data_dir}
    c.model.name = "resnet18"
    c.model.stage_sizes = (2, 2, 2, 2)
    c.model.width = 64
    c.model.stem = "cifar"
    c.objective.preset = arg.preset
    c.optimizer.name = "momentum"
    c.optimizer.lr = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "step"
    c.optimizer.step_fractions = (1 / 3, 2 / 3)
    c.optimizer.step_factor = 0.1
    steps = arg.epochs * (TRAIN_EXAMPLES // 128)
    c.optimizer.warmup_steps = 0
    c.train.steps = steps
    c.train.batch_size = 128
    c.train.log_every = 200
    c.train.eval_every = 5000
    c.train.checkpoint_every = 5000
    c.mesh.fsdp = arg.fsdp  # 1: data parallel (11M parameters fit any device)
    return c
