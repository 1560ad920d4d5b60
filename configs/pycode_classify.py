"""Sequence classification through the multi-exit Transformer encoder, on real code.

Data: `pycode`, the functions of the installed Python sources (standard library, scikit-learn,
SciPy, NumPy, Matplotlib) as BPE token ids, split by module (`hisd_jax/data/pycode.py`; built
and its tokenizer trained on the training split the first time, ~20 s, then cached in
~/.cache/hisd_jax). Tasks: `package` (which of the five a function comes from; 5 classes) and
`returns` (whether it returns a value). Model: a pre-LN encoder, width 64, 4 heads, one layer per
stage and an exit after each of 3 stages; HiSD loss on both tasks, equal weights.

Run:
  python -m hisd_jax.main --config configs/pycode_classify.py --workdir runs/pycode
Variants: configs/pycode_classify.py:preset=sdn,steps=600,seed=1
Then early exit on it (the cascade skips whole encoder layers):
  python -m hisd_jax.evaluate --workdir runs/pycode --task package --budget 0.5
Expected: ~1 min on 2 CPU cores (400 steps, 56 s measured with the first build of the corpus and
tokenizer); test accuracy per exit printed and written to results.json: package 0.73 and returns
0.83 at every exit (the majority classes are 0.31 and 0.74 of the test split).
"""

from hisd_jax.config import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, preset="hisd", seed=0, steps=400, max_len=64, num_train=0)
    c = base_config()
    c.name = f"pycode_{arg.preset}"
    c.seed = arg.seed
    c.data.name = "pycode"
    c.data.tasks = ("package", "returns")
    c.data.kwargs = {"max_len": arg.max_len, "vocab_size": 4096}
    if arg.num_train:
        c.data.kwargs["num_train"] = arg.num_train
    c.model.name = "transformer"
    c.model.width = 64
    c.model.num_heads = 4
    c.model.mlp_ratio = 2
    c.model.stage_sizes = (1, 1, 1)
    c.objective.preset = arg.preset
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = min(50, max(arg.steps, 0) // 10)
    c.train.steps = arg.steps
    c.train.batch_size = 64
    c.train.log_every = 50
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    return c
