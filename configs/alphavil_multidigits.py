"""αVIL on MultiDigits: the left digit is the target; right and sum help, right_shuffled hurts.

Tasks: left (target), right, sum (auxiliary tasks that share the digit features) and
right_shuffled (the right digit's labels permuted within each split, `data.kwargs.
shuffled_copies`: no signal, built to hurt). 2000 training canvases so that the target alone
is short of data, the 4-stage ResNet of `mtl_multidigits.py`, Adam at a constant 1e-3.

Run (αVIL and its baselines on one budget):
  python -m hisd_jax.main --config configs/alphavil_multidigits.py:program=alphavil --workdir runs/av
  python -m hisd_jax.main --config configs/alphavil_multidigits.py:single=left --workdir runs/av_single
  python -m hisd_jax.main --config configs/alphavil_multidigits.py --workdir runs/av_ew
  python -m hisd_jax.main --config configs/alphavil_multidigits.py:method=gcosine --workdir runs/av_gcos
  python -m hisd_jax.main --config configs/alphavil_multidigits.py:program=diw --workdir runs/av_diw
Variants: method= (any MTL method with program=standard), program= (standard, alphavil, diw),
  seed=, steps= (batches of the training stream), budget= (epochs: every method consumes
  `steps` batches; examples: αVIL consumes steps / number of tasks, so that its inner passes
  see as many examples as one pass of the others), rho=, num_train=.
gcosine's target is the first task (left). Every run reports test metrics at its final parameters (the validation split feeds αVIL's α
fit and DIW's classifier, so it selects nothing).
"""

import os

from hisd_jax.config import ConfigError, config_from_file, parse_arg
from hisd_jax.mtl.tasks import method_config, single_task_config

_HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("left", "right", "sum", "right_shuffled")
BUDGETS = ("epochs", "examples")


def get_config(arg=None):
    arg = parse_arg(
        arg,
        method="ew",
        space="param",
        program="standard",
        seed=0,
        steps=1600,
        budget="epochs",
        rho=0.25,
        num_train=2000,
        single="",
    )
    if arg.budget not in BUDGETS:
        raise ConfigError(
            f"configs/alphavil_multidigits.py: budget={arg.budget!r} is not one of "
            f"{', '.join(BUDGETS)}"
        )
    c = config_from_file(os.path.join(_HERE, "mtl_multidigits.py"), f"seed={arg.seed}")
    c.unlock()
    c.name = "alphavil_multidigits"
    c.data.tasks = TASKS
    c.data.kwargs = {"num_train": arg.num_train, "shuffled_copies": ("right",)}
    c.model.task_exits = {t: (3,) for t in TASKS}
    c.mtl.metrics = {t: {"accuracy": "higher"} for t in TASKS}
    c.optimizer.lr = 1e-3
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.program.target = "left"
    c.program.rho = arg.rho
    steps, log_every = arg.steps, 100
    if arg.program == "alphavil" and arg.budget == "examples":
        steps = steps // len(TASKS)
    if arg.program == "alphavil":  # whole αVIL epochs of K = round(rho x steps per epoch)
        k = max(1, round(arg.rho * -(-arg.num_train // c.train.batch_size)))
        steps, log_every = max(k, steps // k * k), k  # α and w logged every epoch
    c.train.steps = steps
    c.train.log_every = log_every
    c.train.eval_every = 0
    c.train.checkpoint_every = 400
    c.lock()
    if arg.single:
        return single_task_config(c, arg.single)
    return method_config(c, arg.method, arg.space, name=c.name, program=arg.program)
