"""A GLUE task through the multi-exit Transformer encoder (for users with network).

Data: `glue/<task>` from TFDS through `tfds.data_source` (`hisd_jax/data/glue.py`): prepare it
once with network, in a random-access format:
  python -c "import tensorflow_datasets as tfds; tfds.builder('glue/sst2').download_and_prepare(file_format='array_record')"
then nothing is downloaded. Train = the TFDS train split less its last 10% (val); test = the TFDS
validation split (GLUE's test labels are hidden). A BPE tokenizer is trained on the training
texts the first time and cached in ~/.cache/hisd_jax/glue. Model: a pre-LN encoder, width 128,
4 heads, 2 layers per stage and an exit after each of 3 stages (6 layers); HiSD loss.

Run (one machine: every local GPU, data parallel; `pip install -U "jax[cuda12]"`):
  python -m hisd_jax.main --config configs/glue.py:task=sst2 --workdir runs/glue_sst2
TPU pod slice (each worker runs the same command; `pip install gcsfs google-cloud-storage`):
  launch/tpu_pod.sh TPU_NAME ZONE configs/glue.py:task=mnli gs://BUCKET/runs/glue_mnli
Variants: configs/glue.py:task=mnli,preset=sdn,steps=20000,seed=1 (task: cola, sst2, mrpc, qqp,
stsb (regression), mnli, qnli, rte, wnli); --config.data.kwargs.data_dir=/path/to/tfds.
Expected: on one GPU a few minutes for the default 5000 steps of 64 examples; test accuracy per
exit in results.json. Not run here (no network); the data path is tested on
`tfds.testing.mock_data` (tests/test_tfds_data.py).
"""

from hisd_jax.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, task="sst2", preset="hisd", seed=0, steps=5000, max_len=128)
    c = base_config()
    c.name = f"glue_{arg.task}_{arg.preset}"
    c.seed = arg.seed
    c.data.name = "glue"
    c.data.tasks = ("label",)
    c.data.kwargs = {"config": arg.task, "max_len": arg.max_len, "vocab_size": 16384}
    c.model.name = "transformer"
    c.model.width = 128
    c.model.num_heads = 4
    c.model.mlp_ratio = 4
    c.model.stage_sizes = (2, 2, 2)
    c.objective.preset = arg.preset
    c.optimizer.name = "adamw"
    c.optimizer.lr = 5e-4
    c.optimizer.weight_decay = 0.01
    c.optimizer.warmup_steps = min(500, max(arg.steps, 0) // 10)
    c.train.steps = arg.steps
    c.train.batch_size = 64
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    return c
