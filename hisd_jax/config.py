"""Experiment configs: defaults, `:k=v` variants, and validation before anything compiles.

Every experiment file in `configs/` starts from `base_config()` and changes what it
needs. `validate(config)` checks every field a run depends on and raises
`ConfigError` with one line naming the field and the allowed values; `main.py` turns
that into exit code 2 before the workdir is touched.
"""

import ast
import importlib.util
import math
import os

import jax
import ml_collections

from hisd_jax import models, parallel, programs
from hisd_jax.data import DATASETS
from hisd_jax.data import augment as augment_lib
from hisd_jax.errors import ConfigError
from hisd_jax.models import BACKBONES, DTYPES, exit_positions, model_section
from hisd_jax.models.transformer import POOLS
from hisd_jax.models.backbones import backbone_blocks
from hisd_jax.models.layers import NORMS, STEMS
from hisd_jax.mtl.strategy import BACKWARDS, GRADIENT_METHODS, SPACES, STRATEGIES
from hisd_jax.mtl.tasks import check_metrics_field
from hisd_jax.objectives.hisd import PRESETS

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum", "nesterov")
SCHEDULES = ("constant", "cosine", "linear", "step")
# Fields that may differ between a run and its resumption in the same workdir.
RESUMABLE_CHANGES = (
    "train.log_every",
    "train.progress",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "mtl.backward",  # how the per-task backward passes are batched: same gradients
    # where the state lives, not what it is: a run resumes on another mesh (elastic resume)
    "mesh.data",
    "mesh.fsdp",
    "mesh.min_shard_size",
    "mesh.rules",
    "model.remat",  # recomputes activations in the backward pass: same values
    # what a run stopped by a non-finite loss may change to go on from its last good checkpoint
    # (the optimizer state keeps its structure; the change is an event in metrics.jsonl)
    "optimizer.lr",
    "optimizer.grad_clip",
    "optimizer.momentum",
)
OPTIMIZER_CHANGES = ("optimizer.lr", "optimizer.grad_clip", "optimizer.momentum")


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with defaults. Experiment files override these."""
    c = ml_collections.ConfigDict()
    c.name = "experiment"
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "multidigits"
    c.data.tasks = ("sum",)  # task names offered by the data set
    c.data.seed = 0  # how the embedded data set is built (pairs, shifts, splits)
    c.data.kwargs = ml_collections.ConfigDict()  # passed to data.get_dataset (sizes, data_dir, ...)
    # training-time augmentation of image inputs (data/augment.py): none | crop_flip (a random
    # crop of the image zero-padded by crop_padding on each side, and a random left-right flip)
    c.data.augment = "none"
    c.data.crop_padding = 4

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet"  # one of models.BACKBONES
    c.model.width = 16  # channels of the first stage (doubles each stage)
    c.model.stage_sizes = ()  # blocks per stage (every config names them: resnet50 (3, 4, 6, 3))
    c.model.strides = ()  # downsampling per stage; () = 1 then 2 for every later stage
    c.model.exits = ()  # block counts after which exits sit; () = after every stage
    c.model.task_exits = ml_collections.ConfigDict()  # {task: exit indices}; default every exit
    c.model.cut_at = -1  # -1: full model; e >= 0: only up to exit e (dedicated baseline)
    c.model.stem = "cifar"
    c.model.stem_features = 0  # 0 = width
    c.model.norm = "batch"
    c.model.head_pool = 1  # adaptive pooling size at each exit
    c.model.head_hidden = ()  # hidden Dense widths in each exit head
    c.model.dtype = "float32"
    c.model.remat = False  # jax.checkpoint each block / encoder layer: less memory, more compute
    # model.name="transformer" only (models/transformer.py):
    c.model.num_heads = 4  # attention heads (model.width must be a multiple)
    c.model.mlp_ratio = 4  # MLP width = mlp_ratio * width
    c.model.pool = "mean"  # exit pooling: "mean" over real tokens or "cls"
    c.model.embed_dim = 0  # width of a retrieval task's embedding at each exit (0: model.width)

    c.objective = ml_collections.ConfigDict()
    c.objective.preset = "hisd"  # one of objectives.hisd.PRESETS
    # None keeps the preset's value; set a number (or a list for ce) to override.
    c.objective.ce = ml_collections.FieldReference(None, field_type=tuple)
    c.objective.kd = ml_collections.FieldReference(None, field_type=float)
    c.objective.hier = ml_collections.FieldReference(None, field_type=float)
    c.objective.feat = ml_collections.FieldReference(None, field_type=float)
    c.objective.temperature = ml_collections.FieldReference(None, field_type=float)
    # retrieval tasks: tau of the in-batch similarities q d^T / tau (objectives/retrieval.py)
    c.objective.similarity_temperature = 0.05

    c.mtl = ml_collections.ConfigDict()
    c.mtl.method = "ew"  # how task losses/gradients combine: one of mtl.strategy.STRATEGIES
    c.mtl.space = "param"  # gradient methods: "param" (shared parameters) or "rep" (representation)
    # per-task backward passes of gradient methods: "auto", "unroll" or "vmap" (speed only;
    # see mtl/strategy.py)
    c.mtl.backward = "auto"
    c.mtl.hparams = ml_collections.ConfigDict()  # the method's hyper-parameters
    # {task: {metric: "higher" | "lower"}} judging each task (Delta_m, sweeps); a task not
    # named here gets its kind's default: accuracy (higher) or mae (lower). See mtl/tasks.py.
    c.mtl.metrics = ml_collections.ConfigDict()

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-3
    c.optimizer.schedule = "cosine"
    # schedule "step": lr multiplied by step_factor at each of step_fractions of the steps after
    # warmup (ResNet/BYOT's "divide by 10 at 1/3 and 2/3 of training": (1/3, 2/3) and 0.1)
    c.optimizer.step_fractions = (1 / 3, 2 / 3)
    c.optimizer.step_factor = 0.1
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.0
    c.optimizer.momentum = 0.9
    c.optimizer.grad_clip = 0.0  # global-norm clipping; 0 = off

    # The device mesh (parallel.py): sizes of the `data` and `fsdp` axes (one may be -1: the
    # device count over the other); mesh.fsdp > 1 shards the train state (FSDP). Leaves with
    # fewer than min_shard_size elements stay replicated; rules ((regex, "fsdp"|"replicated"),
    # ...) searched in each state leaf's path override that, first match wins.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.min_shard_size = 2**14
    c.mesh.rules = ()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 128  # global batch, split over all devices
    c.train.eval_batch_size = 512
    c.train.log_every = 100
    c.train.eval_every = 500  # validation evaluation; 0 = only at the end
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.progress = True  # progress bar on stderr

    # The training program: what one unit of work is and what happens at evaluation time
    # (hisd_jax/programs: "standard" = one batch, one update).
    c.program = ml_collections.ConfigDict()
    c.program.name = "standard"
    # KD from converged tasks (kd_joint, kd_sequential; programs/kd_converged.py): a task has
    # converged after `patience` validations (train.eval_every) without improving its judging
    # metric by more than `min_delta`; its soft labels are softmax(z / temperature) of its
    # best parameters, optionally top_k (0 = all classes) and stored as label_dtype; its loss
    # becomes hard_weight * loss(labels) + (1 - hard_weight) * loss(soft labels).
    c.program.patience = 3
    c.program.min_delta = 0.0
    c.program.temperature = 1.0
    c.program.hard_weight = 0.0
    c.program.top_k = 0
    c.program.label_dtype = "float32"
    c.program.order = ()  # kd_sequential: the order tasks enter in; () = data.tasks
    # αVIL (alphavil; programs/alphavil.py; needs mtl.method "ew"): an epoch is a joint pass
    # (steps per epoch optimizer steps on Σ_t w_t L_t) and then one αVIL update: from θ, every
    # task trains alone (the `optimizer` section, state "fresh" each epoch or "carried") on
    # round(rho x steps per epoch) sampled training batches with loss w_t L_t (task_batching
    # "loop", "vmap" or "scan": the same deltas; see mtl/alphavil.py for their memory and
    # speed); alpha_steps steps of alpha_optimizer (sgd, adam) at alpha_lr fit α on the
    # target's validation batches; θ += Σ α_t δ_t, w_t += α_t - 1 (clipped to weight_clamp =
    # (lo, hi) if given). target: the target task ("" = the first of data.tasks).
    # inner_optimizer / inner_lr: the inner runs' optimizer name and learning rate ("" / 0:
    # the optimizer section's). budget: what train.steps buys, "epochs" (as many as a standard
    # run) or "examples" (the whole epochs whose examples fit in train.steps batches).
    c.program.target = ""
    c.program.rho = 0.25
    c.program.inner_state = "fresh"
    c.program.inner_optimizer = ""
    c.program.inner_lr = 0.0
    c.program.budget = "epochs"
    c.program.task_batching = "loop"
    c.program.alpha_optimizer = "sgd"
    c.program.alpha_lr = 0.1
    c.program.alpha_steps = 4
    c.program.alpha_batch_size = 0  # validation rows per α step (0: train.batch_size)
    c.program.weight_clamp = ()
    # Discriminative importance weighting (diw; programs/diw.py): auxiliary examples weighted
    # by p/(1 - p) of a logistic regression (inverse regularisation diw_c) telling the target's
    # validation inputs from the training inputs; `target` as above.
    c.program.diw_c = 1.0
    return c


def config_from_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the experiment file at `path` (one config building on another)."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"hisd_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses a config-path variant such as 'preset=sdn,seed=1' over typed defaults."""
    result = ml_collections.ConfigDict(defaults)
    if not arg:
        return result
    for item in arg.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ConfigError(
                f"config argument {item!r}: expected key=value with key in {', '.join(defaults)}"
            )
        default = defaults[key]
        if isinstance(default, str):
            result[key] = value
        else:
            try:
                literal = ast.literal_eval(value)
                result[key] = type(default)(literal)
                if result[key] != literal:  # e.g. seed=1.5 must not become seed=1
                    raise ValueError(f"{literal!r} is not a {type(default).__name__}")
            except (ValueError, SyntaxError, TypeError) as e:
                raise ConfigError(
                    f"config argument {key}={value!r}: expected {type(default).__name__}"
                ) from e
    return result


def _one_of(field, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{field}={value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(field, value, allow_zero=False):
    if (
        not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        raise ConfigError(f"{field}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _integer(field, value, minimum: int | None = None, maximum: int | None = None):
    """An int (not bool) in [minimum, maximum]."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        low = "" if minimum is None else f" >= {minimum}"
        high = "" if maximum is None else f" and <= {maximum}"
        raise ConfigError(f"{field}={value!r} must be an integer{low}{high}")


def _integers(field, values, minimum: int, allowed=None):
    """A tuple of ints >= minimum (each in `allowed` if given)."""
    try:
        values = tuple(values)
    except TypeError:
        values = None
    ok = values is not None and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values
    )
    if ok and allowed is not None:
        ok = all(v in allowed for v in values)
    if not ok:
        what = f"one of {', '.join(map(str, allowed))}" if allowed else f"integers >= {minimum}"
        raise ConfigError(f"{field}={values if values is not None else values!r} must be {what}")


SEED_LIMIT = 2**31 - 1  # seeds travel as int32 inside jitted code


def num_exits(config) -> int:
    """The number of exits of the config's model (after `model.cut_at`)."""
    return models.num_exits(config.model)


def validate(config, num_devices: int | None = None) -> None:
    """Raises ConfigError for the first invalid field. Touches nothing on disk, compiles nothing.

    `num_devices` (default: `jax.device_count()`) must divide the global batch sizes.
    """
    _validate_data(config)
    _validate_model(config)
    _validate_objective(config)
    _validate_mtl(config)
    _validate_optimizer(config)
    _validate_train(config, jax.device_count() if num_devices is None else num_devices)
    _validate_mesh(config, jax.device_count() if num_devices is None else num_devices)
    _one_of("program.name", config.program.name, programs.PROGRAMS)


def _validate_mesh(config, num_devices: int) -> None:
    m = config.mesh
    for field in ("data", "fsdp"):
        if not (isinstance(m[field], int) and not isinstance(m[field], bool)) or not (
            m[field] == -1 or m[field] >= 1
        ):
            raise ConfigError(
                f"mesh.{field}={m[field]!r} must be an integer >= 1, or -1 (inferred)"
            )
    _integer("mesh.min_shard_size", m.min_shard_size, 1)
    try:
        parallel.mesh_shape(m, num_devices)
        parallel.check_rules(m.rules)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _validate_data(config) -> None:
    _one_of("data.name", config.data.name, DATASETS)
    _integer("seed", config.seed, 0, SEED_LIMIT)
    _integer("data.seed", config.data.seed, 0, SEED_LIMIT)
    _one_of("data.augment", config.data.augment, augment_lib.AUGMENTATIONS)
    _integer("data.crop_padding", config.data.crop_padding, 0, 1024)
    if not config.data.tasks:
        raise ConfigError("data.tasks is empty: name at least one task of the data set")
    tasks = tuple(config.data.tasks)
    if not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"data.tasks={tasks!r} must be task names (non-empty strings)")
    twice = sorted({t for t in tasks if tasks.count(t) > 1})
    if twice:
        raise ConfigError(f"data.tasks={tasks!r} names {', '.join(map(repr, twice))} twice")


def _validate_model(config) -> None:
    m = config.model
    _one_of("model.name", m.name, BACKBONES)
    _one_of("model.norm", m.norm, NORMS)
    _one_of("model.stem", m.stem, STEMS)
    _one_of("model.dtype", m.dtype, tuple(DTYPES))
    _integer("model.width", m.width, 1)
    _integer("model.stem_features", m.stem_features, 0)
    _integer("model.head_pool", m.head_pool, 1)
    _integer("model.num_heads", m.num_heads, 1)
    _integer("model.mlp_ratio", m.mlp_ratio, 1)
    _integer("model.embed_dim", m.embed_dim, 0)
    _one_of("model.pool", m.pool, POOLS)
    if m.name == "transformer" and m.width % m.num_heads:
        raise ConfigError(
            f"model.width={m.width} must be a multiple of model.num_heads={m.num_heads}"
        )
    _integers("model.head_hidden", m.head_hidden, 1)
    _integers("model.stage_sizes", m.stage_sizes, 1)
    if not tuple(m.stage_sizes):
        raise ConfigError("model.stage_sizes=() must name at least one stage")
    _integers("model.strides", m.strides, 1, allowed=(1, 2))
    _integers("model.exits", m.exits, 0)  # types here; the ranges below name 1..n
    try:
        blocks, _ = backbone_blocks(m.name, m.width, m.stage_sizes, m.strides)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    exits = exit_positions(model_section(config))
    n = len(blocks)
    if any(e < 1 or e > n for e in exits) or list(exits) != sorted(set(exits)) or exits[-1] != n:
        raise ConfigError(
            f"model.exits={tuple(exits)} must be strictly increasing block counts in 1..{n} "
            f"ending at {n} (the final exit); use model.cut_at to truncate the model"
        )
    if not -1 <= m.cut_at < len(exits):
        raise ConfigError(
            f"model.cut_at={m.cut_at} must be -1 (full model) or an exit index in 0..{len(exits) - 1}"
        )
    for task, chosen in m.task_exits.items():
        if task not in config.data.tasks:
            raise ConfigError(f"model.task_exits names {task!r}, which is not in data.tasks")
        if (
            not chosen
            or list(chosen) != sorted(set(chosen))
            or not 0 <= chosen[0] <= chosen[-1] < len(exits)
        ):
            raise ConfigError(
                f"model.task_exits.{task}={tuple(chosen)} must be increasing exit indices in 0..{len(exits) - 1}"
            )


def _validate_objective(config) -> None:
    o = config.objective
    _one_of("objective.preset", o.preset, PRESETS)
    for field in ("kd", "hier", "feat"):
        if o[field] is not None:
            _positive(f"objective.{field}", o[field], allow_zero=True)
    if o.temperature is not None:
        _positive("objective.temperature", o.temperature)
    _positive("objective.similarity_temperature", o.similarity_temperature)
    if o.ce is not None and not config.model.task_exits:
        numbers = isinstance(o.ce, (tuple, list)) and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
            for w in o.ce
        )
        if not numbers or len(o.ce) != num_exits(config) or any(w < 0 for w in o.ce):
            raise ConfigError(
                f"objective.ce={o.ce!r} must have {num_exits(config)} weights >= 0, one per exit"
            )


def _validate_mtl(config) -> None:
    _one_of("mtl.method", config.mtl.method, STRATEGIES)
    _one_of("mtl.space", config.mtl.space, SPACES)
    _one_of("mtl.backward", config.mtl.backward, BACKWARDS)
    if config.mtl.method in GRADIENT_METHODS and len(config.data.tasks) < 2:
        raise ConfigError(
            f"mtl.method={config.mtl.method!r} needs at least 2 tasks in data.tasks; "
            "use a loss weighting (e.g. ew) for one task"
        )
    check_metrics_field(config.mtl.get("metrics") or {}, tuple(config.data.tasks))


def _validate_optimizer(config) -> None:
    opt = config.optimizer
    _one_of("optimizer.name", opt.name, OPTIMIZERS)
    _one_of("optimizer.schedule", opt.schedule, SCHEDULES)
    _positive("optimizer.lr", opt.lr)
    _positive("optimizer.weight_decay", opt.weight_decay, allow_zero=True)
    _positive("optimizer.grad_clip", opt.grad_clip, allow_zero=True)
    _integer("optimizer.warmup_steps", opt.warmup_steps, 0)
    fractions = opt.step_fractions
    if not (
        isinstance(fractions, (tuple, list))
        and all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in fractions)
        and all(0 < f < 1 for f in fractions)
        and all(a < b for a, b in zip(fractions, fractions[1:]))
    ):
        raise ConfigError(
            f"optimizer.step_fractions={fractions!r} must be increasing fractions of training "
            "in (0, 1), e.g. (1/3, 2/3)"
        )
    if opt.schedule == "step" and not fractions:
        raise ConfigError(
            "optimizer.step_fractions=() is empty: optimizer.schedule='step' needs at least one "
            "point to multiply the lr by optimizer.step_factor"
        )
    factor = opt.step_factor
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and 0 < factor <= 1):
        raise ConfigError(f"optimizer.step_factor={factor!r} must lie in (0, 1]")
    momentum = opt.momentum
    if not (isinstance(momentum, (int, float)) and math.isfinite(momentum) and 0 <= momentum < 1):
        raise ConfigError(f"optimizer.momentum={momentum!r} must lie in [0, 1)")


def _validate_train(config, devices: int) -> None:
    t = config.train
    for field in (
        "steps",
        "batch_size",
        "eval_batch_size",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
    ):
        _integer(f"train.{field}", t[field], 1)
    _integer("train.eval_every", t.eval_every, 0)
    warmup = config.optimizer.warmup_steps
    if warmup >= t.steps:
        raise ConfigError(f"optimizer.warmup_steps={warmup} must be < train.steps={t.steps}")
    for field in ("batch_size", "eval_batch_size"):
        if t[field] % devices:
            raise ConfigError(
                f"train.{field}={t[field]} must be divisible by the device count ({devices})"
            )


def fill_defaults(stored: dict, defaults: dict) -> dict:
    """`stored` (a config as nested dicts) with the fields it lacks taken from `defaults`:
    a workdir written before a field was added to `base_config` ran with its default."""
    out = dict(stored)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = fill_defaults(out[key], value)
    return out


def diff(a: dict, b: dict, prefix="") -> list[str]:
    """Dotted names of the fields whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, name + ".")
        elif va != vb:
            out.append(name)
    return out
