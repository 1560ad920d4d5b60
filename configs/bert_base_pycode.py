"""Code search with a BERT-base-sized multi-exit encoder (12 layers, width 768, 12 heads, MLP
3072; exits after layers 4, 8 and 12): the MoSE setting at the paper's scale, for GPU nodes and
TPU pods. Data: `pycode_search` (the embedded code corpus, configs/mose_pycode.py).

Multi-GPU node, FSDP over 8 GPUs, bf16 compute:
  python -m hisd_jax.main --config configs/bert_base_pycode.py:fsdp=8 --workdir runs/bert_pycode
TPU pod slice (each worker the same command; workdir every worker sees):
  launch/tpu_pod.sh TPU_NAME ZONE configs/bert_base_pycode.py:fsdp=4 gs://BUCKET/runs/bert_pycode
Every preset and the dedicated models: configs/compare_mose_pycode.py with this base (edit its
`base` line), or one preset: configs/bert_base_pycode.py:preset=mose.
Memory per device: XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m hisd_jax.bench
  --config configs/bert_base_pycode.py --memory
Expected: not measured here (2 CPU cores); ~110M parameters, 20,000 steps of 256 pairs.
"""

from hisd_jax.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, preset="hisd", seed=0, steps=20000, fsdp=-1, dtype="bfloat16",
                    remat=0, batch=256, max_len=256)  # fmt: skip
    c = base_config()
    c.name = f"bert_base_pycode_{arg.preset}"
    c.seed = arg.seed
    c.data.name = "pycode_search"
    c.data.tasks = ("search",)
    c.data.kwargs = {"max_len": arg.max_len, "vocab_size": 32768}
    c.model.name = "transformer"
    c.model.width = 768
    c.model.num_heads = 12
    c.model.mlp_ratio = 4
    c.model.stage_sizes = (4, 4, 4)
    c.model.embed_dim = 768
    c.model.dtype = arg.dtype
    c.model.remat = bool(arg.remat)
    c.objective.preset = arg.preset
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 0.01
    c.optimizer.warmup_steps = min(1000, arg.steps // 10)
    c.train.steps = arg.steps
    c.train.batch_size = arg.batch
    c.train.eval_batch_size = arg.batch
    c.train.log_every = 100
    c.train.eval_every = 2000
    c.train.checkpoint_every = 2000
    c.mesh.data, c.mesh.fsdp = (1, -1) if arg.fsdp == -1 else (-1, arg.fsdp)
    return c
