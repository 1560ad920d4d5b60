"""Config validation, `:variant` parsing and the CLI's handling of bad configs."""

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, tiny_config

from hisd_jax import config as config_lib
from hisd_jax.config import ConfigError, parse_arg, validate


def set_field(config, dotted, value):
    *section, field = dotted.split(".")
    (config[section[0]] if section else config)[field] = value
    return config


def assert_config_error(config, field, allowed=(), num_devices=None):
    with pytest.raises(ConfigError) as info:
        validate(config, num_devices=num_devices)
    message = str(info.value)
    assert "\n" not in message, message
    assert field in message, message
    for value in allowed:
        assert str(value) in message, (value, message)
    return message


def test_tiny_config_is_valid():
    validate(tiny_config())
    validate(tiny_config(), num_devices=4)  # batch 32 and eval batch 128 split over 4 devices


# (field, bad value, words the message must contain: the allowed values)
ONE_OF_CASES = [
    ("objective.preset", "bogus", ("final_only", "sdn", "byot", "mose", "hisd")),
    ("model.name", "vgg", ("cnn", "resnet", "resnet18", "resnet50")),
    ("data.name", "imagenet21k", ("digits", "multidigits", "mnist", "cifar10")),
    ("optimizer.name", "lion", ("adam", "adamw", "sgd", "momentum", "nesterov")),
    ("optimizer.schedule", "exponential", ("constant", "cosine", "linear", "step")),
    ("model.norm", "instance", ("batch", "group", "layer", "none")),
    ("model.stem", "vit", ("cifar", "imagenet", "none")),
    ("model.dtype", "float16", ("float32", "bfloat16")),
    ("mtl.space", "trunk", ("param", "rep")),
    ("mtl.backward", "jacrev", ("auto", "unroll", "vmap")),
]


@pytest.mark.parametrize("field,value,allowed", ONE_OF_CASES, ids=[c[0] for c in ONE_OF_CASES])
def test_unknown_names_are_rejected_with_allowed_values(field, value, allowed):
    message = assert_config_error(set_field(tiny_config(), field, value), field, allowed)
    assert repr(value) in message


# The tiny config is a 3-block CNN with exits after blocks 1, 2, 3.
BAD_FIELD_CASES = [
    ("model.exits", (1, 4), "model.exits"),  # beyond the last block
    ("model.exits", (0, 3), "model.exits"),  # before the first
    ("model.exits", (1, 2), "model.exits"),  # does not end at the final block
    ("model.exits", (2, 1, 3), "model.exits"),  # not increasing
    ("model.exits", (1, 1, 3), "model.exits"),  # repeated
    ("model.cut_at", 3, "model.cut_at"),  # 3 exits: 0..2
    ("model.cut_at", -2, "model.cut_at"),
    ("model.width", 0, "model.width"),
    ("model.head_pool", 0, "model.head_pool"),
    ("model.stage_sizes", (1, 0, 1), "model.stage_sizes"),
    ("model.strides", (1, 3, 2), "model.strides"),
    ("model.strides", (1, 2), "model.strides"),  # one per stage
    ("train.steps", 0, "train.steps"),
    ("train.steps", -5, "train.steps"),
    ("train.batch_size", 0, "train.batch_size"),
    ("train.eval_batch_size", -1, "train.eval_batch_size"),
    ("train.log_every", 0, "train.log_every"),
    ("train.checkpoint_every", 0, "train.checkpoint_every"),
    ("train.eval_every", -1, "train.eval_every"),
    ("optimizer.lr", 0.0, "optimizer.lr"),
    ("optimizer.lr", -1e-3, "optimizer.lr"),
    ("optimizer.lr", float("nan"), "optimizer.lr"),
    ("optimizer.lr", float("inf"), "optimizer.lr"),
    ("optimizer.weight_decay", -0.1, "optimizer.weight_decay"),
    ("optimizer.grad_clip", -1.0, "optimizer.grad_clip"),
    ("optimizer.warmup_steps", 40, "optimizer.warmup_steps"),  # == steps
    ("optimizer.warmup_steps", 41, "optimizer.warmup_steps"),
    ("objective.kd", -1.0, "objective.kd"),
    ("objective.temperature", 0.0, "objective.temperature"),
    ("objective.ce", (1.0, 1.0), "objective.ce"),  # 3 exits need 3 weights
    ("objective.ce", (1.0, 1.0, 1.0, 1.0), "objective.ce"),
    ("objective.ce", (1.0, -1.0, 1.0), "objective.ce"),
    # #14 kind 3: each of these trained, hung or died with a traceback
    ("optimizer.momentum", -1.0, "optimizer.momentum=-1.0 must lie in [0, 1)"),
    ("optimizer.momentum", float("nan"), "optimizer.momentum=nan"),
    ("optimizer.momentum", 1.0, "optimizer.momentum=1.0"),
    ("model.head_hidden", (0,), "model.head_hidden=(0,) must be integers >= 1"),
    ("model.stem_features", -3, "model.stem_features=-3 must be an integer >= 0"),
    ("model.stage_sizes", ("a", "b"), "model.stage_sizes=('a', 'b') must be integers >= 1"),
    ("model.stage_sizes", (), "model.stage_sizes=() must name at least one stage"),
    ("seed", 2**31, "seed=2147483648 must be an integer >= 0 and <= 2147483647"),
    ("seed", -1, "seed=-1"),
    ("data.seed", -1, "data.seed=-1 must be an integer >= 0"),
    ("data.tasks", ("sum", "sum"), "names 'sum' twice"),
    ("train.eval_every", True, "train.eval_every=True must be an integer"),
    ("optimizer.step_fractions", (0.6, 0.3), "optimizer.step_fractions=(0.6, 0.3) must be incr"),
    ("optimizer.step_fractions", (0.5, 1.0), "optimizer.step_fractions"),
    ("optimizer.step_fractions", ("a",), "optimizer.step_fractions"),
    ("optimizer.step_factor", 0.0, "optimizer.step_factor=0.0 must lie in (0, 1]"),
    ("optimizer.step_factor", 2.0, "optimizer.step_factor"),
    ("data.augment", "mixup", "data.augment='mixup' is not one of"),
    ("data.crop_padding", -1, "data.crop_padding=-1"),
]


@pytest.mark.parametrize(
    "field,value,named", BAD_FIELD_CASES, ids=[f"{c[0]}={c[1]}" for c in BAD_FIELD_CASES]
)
def test_bad_fields_are_named(field, value, named):
    message = assert_config_error(set_field(tiny_config(), field, value), named)
    if field == "model.exits":
        assert "1..3" in message  # the allowed block counts
    if field == "model.cut_at":
        assert "0..2" in message


def test_valid_edge_values_pass():
    validate(tiny_config(model__exits=(2, 3)))
    validate(tiny_config(model__exits=(3,)))
    validate(tiny_config(model__cut_at=2))
    validate(tiny_config(model__cut_at=0, objective__ce=(1.0,)))  # one exit left
    validate(tiny_config(optimizer__warmup_steps=39))
    validate(tiny_config(train__eval_every=0, optimizer__weight_decay=0.0))
    validate(tiny_config(objective__ce=(0.0, 0.5, 1.0)))


def test_ce_length_follows_cut_at():
    message = assert_config_error(
        tiny_config(model__cut_at=1, objective__ce=(1.0, 1.0, 1.0)), "objective.ce"
    )
    assert "2 weights" in message


def test_batch_must_divide_over_devices():
    assert_config_error(tiny_config(), "train.batch_size", ("3",), num_devices=3)
    message = assert_config_error(
        tiny_config(train__batch_size=33), "train.eval_batch_size", ("3",), num_devices=3
    )
    assert "128" in message


def test_empty_task_list():
    assert_config_error(tiny_config(data__tasks=()), "data.tasks")


def test_unknown_task_name_is_rejected_before_training(tmp_path):
    from hisd_jax import experiment as experiment_lib
    from hisd_jax import train

    config = tiny_config(data__tasks=("label", "colour"))
    workdir = tmp_path / "run"
    for build in (
        experiment_lib.build_experiment,
        lambda c: train.train_and_evaluate(c, str(workdir)),
    ):
        with pytest.raises(ConfigError) as info:
            build(config)
        message = str(info.value)
        assert "\n" not in message
        assert "data.tasks" in message and "'colour'" in message and "label" in message
    assert not workdir.exists()


def test_config_diff_names_changed_fields():
    a = tiny_config().to_dict()
    b = tiny_config(optimizer__lr=1.0, train__steps=7).to_dict()
    assert config_lib.diff(a, a) == []
    assert config_lib.diff(a, b) == ["optimizer.lr", "train.steps"]
    assert config_lib.diff({"x": {"y": 1}}, {"x": {"y": 1, "z": 2}}) == ["x.z"]


# --------------------------------------------------------------------------- parse_arg
def test_parse_arg_defaults_and_types():
    defaults = dict(preset="hisd", seed=0, steps=2000, lr=1e-3, flag=False)
    arg = parse_arg(None, **defaults)
    assert arg.to_dict() == defaults
    assert parse_arg("", **defaults).to_dict() == defaults

    arg = parse_arg("preset=sdn,seed=3,lr=0.5,flag=True", **defaults)
    assert arg.preset == "sdn" and isinstance(arg.preset, str)
    assert arg.seed == 3 and type(arg.seed) is int
    assert arg.lr == 0.5 and type(arg.lr) is float
    assert arg.flag is True
    assert arg.steps == 2000  # untouched
    assert parse_arg("lr=1", **defaults).lr == 1.0  # an int literal for a float field
    assert parse_arg("steps=1e4", **defaults).steps == 10000  # an integral float for an int
    assert parse_arg("preset=123", **defaults).preset == "123"  # strings are taken verbatim
    assert parse_arg("seed=1,", **defaults).seed == 1  # trailing comma is harmless


@pytest.mark.parametrize(
    "arg,words",
    [
        ("bogus=1", ("bogus", "preset, seed")),
        ("seed", ("seed", "key=value")),  # no '='
        ("seed=abc", ("seed", "int")),
        ("seed=1.5", ("seed", "int")),  # not silently truncated to 1
        ("flag=2", ("flag", "bool")),
        ("lr=[1", ("lr", "float")),
    ],
)
def test_parse_arg_bad_input(arg, words):
    with pytest.raises(ConfigError) as info:
        parse_arg(arg, preset="hisd", seed=0, lr=1e-3, flag=False)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_experiment_config_variants():
    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        import hisd_multidigits
    finally:
        sys.path.pop(0)
    c = hisd_multidigits.get_config("preset=sdn,seed=2,steps=500,cut_at=1")
    assert (c.objective.preset, c.seed, c.train.steps, c.model.cut_at) == ("sdn", 2, 500, 1)
    assert "sdn" in c.name and "cut1" in c.name
    validate(c)
    validate(hisd_multidigits.get_config())
    with pytest.raises(ConfigError, match="bogus"):
        hisd_multidigits.get_config("bogus=1")


# --------------------------------------------------------------------------- CLI
CONFIG = "configs/hisd_multidigits.py"
CLI_CASES = {
    # an invalid value for a known field: caught by validate()
    "bad-value": (
        [f"--config={CONFIG}", "--config.objective.preset=bogus"],
        ("objective.preset", "'bogus'", "final_only, sdn"),
    ),
    # a field the config does not have: caught by flag parsing
    "unknown-field": ([f"--config={CONFIG}", "--config.model.nope=1"], ("model.nope",)),
    # a bad `:variant` key: caught while the config file runs
    "bad-variant": ([f"--config={CONFIG}:bogus=1"], ("'bogus=1'", "preset, seed, steps")),
    # a config file that does not exist (ml_collections defers this error to first use)
    "missing-file": (["--config=configs/does_not_exist.py"], ("--config", "does_not_exist.py")),
    # a config file with a syntax or a name error: one line naming the file
    "syntax-error": (["--config={tmp}/bad_syntax.py"], ("bad_syntax.py, line 1", "SyntaxError")),
    "name-error": (["--config={tmp}/bad_name.py"], ("raised NameError", "undefined_name")),
    # a head pool larger than the feature map it pools (hung in compilation for minutes)
    "head-pool": (
        [f"--config={CONFIG}", "--config.model.head_pool=50"],
        ("model.head_pool=50", "12x12"),
    ),
    # a variant value a config file checks itself
    "bad-variant-value": (
        ["--config=configs/kd_multidigits.py:noise=-1"],
        ("noise=-1", "[0, 3.33]"),
    ),
}


def test_bad_data_kwargs_are_config_errors():
    from hisd_jax import experiment as experiment_lib  # noqa: PLC0415

    config = tiny_config(data__name="multidigits", data__tasks=("left",))
    config.data.kwargs = {"label_noise": {"up": 0.1}}
    with pytest.raises(
        ConfigError, match=r"^data.kwargs of data.name='multidigits': label_noise names task 'up'"
    ):
        experiment_lib.build_experiment(config)
    config.data.kwargs = {"num_tain": 10}
    with pytest.raises(ConfigError, match="num_tain"):
        experiment_lib.build_experiment(config)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Runs the failing CLI invocations in parallel (each imports JAX)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "bad_syntax.py").write_text("def get_config(:\n    pass\n")
    (root / "bad_name.py").write_text("def get_config():\n    return undefined_name\n")
    procs = {}
    for name, (args, _) in CLI_CASES.items():
        workdir = root / name
        args = [a.replace("{tmp}", str(root)) for a in args]
        cmd = [sys.executable, "-m", "hisd_jax.main", *args, f"--workdir={workdir}"]
        procs[name] = (
            subprocess.Popen(
                cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ),
            workdir,
        )
    results = {}
    for name, (proc, workdir) in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err, workdir)
    return results


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_config_errors_exit_2_without_touching_workdir(cli_runs, case):
    code, _, err, workdir = cli_runs[case]
    words = CLI_CASES[case][1]
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1, err[-2000:]
    assert err.strip() == lines[0], err[-2000:]  # nothing else: no INFO lines, no config dump
    for word in words:
        assert word in lines[0], (word, lines[0])
    # The message is the whole error: no traceback follows it.
    assert "Traceback" not in err, err[-2000:]
    assert re.search(r"config error: .+", lines[0])
    assert not workdir.exists()


@pytest.mark.parametrize("warmup", [0, 10])
def test_step_schedule_divides_the_lr_at_each_fraction_of_training(warmup):
    """'step': lr x factor at each fraction of the steps after warmup (closed form)."""
    from hisd_jax import optim  # noqa: PLC0415

    config = set_field(tiny_config(), "optimizer.schedule", "step")
    opt = config.optimizer
    opt.lr, opt.step_fractions, opt.step_factor, opt.warmup_steps = 0.1, (0.25, 0.5), 0.1, warmup
    validate(config)
    total = 130
    lr = optim.schedule(opt, total)
    decay = total - warmup  # 130 or 120: boundaries at 32, 65 or 30, 60 steps after warmup
    b1, b2 = int(0.25 * decay), int(0.5 * decay)
    for step, want in [
        (warmup, 0.1),
        (warmup + b1 - 1, 0.1),
        (warmup + b1, 0.01),
        (warmup + b2 - 1, 0.01),
        (warmup + b2, 0.001),
        (total - 1, 0.001),
    ]:
        assert float(lr(step)) == pytest.approx(want, rel=1e-6), step
    if warmup:
        assert float(lr(warmup // 2)) == pytest.approx(0.05, rel=1e-6)  # linear warmup
    opt.step_fractions = ()
    assert_config_error(config, "optimizer.step_fractions=() is empty")


TRAINING_CONFIGS = sorted(
    f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py") and "compare" not in f
)


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_every_training_config_file_validates(name):
    """Each config file the README and docstrings name, paper-scale ones included (their data
    is not here, so only the config is checked)."""
    config = config_lib.config_from_file(os.path.join(REPO, "configs", name))
    validate(config)
    if name == "byot_cifar100_resnet18.py":  # BYOT's recipe (Zhang et al., 2019)
        assert config.data.augment == "crop_flip" and config.data.crop_padding == 4
        assert config.optimizer.schedule == "step" and config.optimizer.step_factor == 0.1
        assert (config.optimizer.name, config.optimizer.lr, config.train.batch_size) == (
            "momentum",
            0.1,
            128,
        )
