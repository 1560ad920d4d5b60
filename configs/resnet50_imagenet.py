"""ResNet-50 at ImageNet size (224x224x3, 1000 classes) with an exit after each of its 4
stages: the scale-out config (FSDP, bf16, remat) for GPU nodes and TPU pods.

Data: `synthetic` (noise images of that shape, `hisd_jax/data/synthetic.py`): the model, the
mesh and the memory are real, the data are not; an ImageNet input pipeline (decoding and
random-resized crops from TFDS `imagenet2012`) is not built yet. Use it to size a job and to
check the sharding before spending accelerator hours.

Memory per device, replicated against FSDP, without and with remat (compiles only; 8 fake CPU
devices here, the same numbers per device on 8 GPUs):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m hisd_jax.bench \
      --config configs/resnet50_imagenet.py --memory
Multi-GPU node (one process sees all local GPUs), FSDP over the 8 GPUs, bf16 compute:
  python -m hisd_jax.main --config configs/resnet50_imagenet.py:fsdp=8 --workdir runs/r50
TPU v4-32 pod slice (16 chips), FSDP within each host's 4 chips, data parallel across hosts:
  launch/tpu_pod.sh TPU_NAME ZONE configs/resnet50_imagenet.py:fsdp=4 gs://BUCKET/runs/r50
Variants: configs/resnet50_imagenet.py:preset=hisd,fsdp=8,dtype=float32,remat=1,batch=1024
Expected: on the synthetic data nothing is learnt (chance: 0.1%); step time and memory are what
it is for (see the README's scaling section for the measured memory table).
"""

from hisd_jax.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(
        arg, preset="hisd", seed=0, steps=1000, fsdp=-1, dtype="bfloat16", remat=0, batch=256
    )
    c = base_config()
    c.name = f"resnet50_224_{arg.preset}"
    c.seed = arg.seed
    c.data.name = "synthetic"
    c.data.tasks = ("label",)
    c.data.kwargs = {"image_shape": (224, 224, 3), "num_classes": 1000}
    c.model.name = "resnet50"
    c.model.stage_sizes = (3, 4, 6, 3)
    c.model.width = 64
    c.model.stem = "imagenet"
    c.model.dtype = arg.dtype
    c.model.remat = bool(arg.remat)
    c.objective.preset = arg.preset
    c.optimizer.name = "momentum"
    c.optimizer.lr = 0.1 * arg.batch / 256
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = min(500, arg.steps // 10)
    c.train.steps = arg.steps
    c.train.batch_size = arg.batch
    c.train.eval_batch_size = arg.batch
    c.train.log_every = 50
    c.train.eval_every = 0
    c.train.checkpoint_every = 500
    # FSDP over every device by default (-1: data axis 1); fsdp=1 is plain data parallelism
    c.mesh.data, c.mesh.fsdp = (1, -1) if arg.fsdp == -1 else (-1, arg.fsdp)
    return c
