"""Training programs through the shared loop, the active-task mask, and parameter labels.

* A program defined here (a unit of work = two updates on two batches, each training a
  different task) runs through `train_and_evaluate`; preempted and resumed, it ends bitwise
  equal to an uninterrupted run, its own state included.
* Under every MTL strategy an inactive task gets exactly zero gradient and weight, and the
  other tasks' update equals the update of the same step on the model without that task.
* The model's label tree classifies every parameter of every shipped config exactly as the
  former name matching did (shared vs a task's own leaves, trunk vs heads), and a parameter
  the labels do not know is an error, not a silent change of role.
"""

import importlib.util
import os
import signal
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import override, tiny_config

from hisd_jax import loop as loop_lib
from hisd_jax import programs, steps, train
from hisd_jax import data as data_lib
from hisd_jax import experiment as experiment_lib
from hisd_jax import parallel
from hisd_jax.models import labels as labels_lib
from hisd_jax.mtl import strategy as strategy_lib
from hisd_jax.programs.base import Program

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("left", "right", "sum")


def small_config(tasks=TASKS, **overrides):
    """A 2-stage CNN on a small MultiDigits (final-exit CE only: cheap to compile)."""
    c = tiny_config()
    c.name = "programs"
    c.data.name = "multidigits"
    c.data.tasks = tasks
    c.data.kwargs = {"num_train": 128, "num_val": 64, "num_test": 64}
    c.model.stage_sizes = (1, 1)
    c.model.width = 4
    c.objective.preset = "final_only"
    c.train.steps = 12
    c.train.log_every = 4
    c.train.eval_every = 4
    c.train.checkpoint_every = 4
    return override(c, **overrides)


# ----------------------------------------------------------------------- a program of our own
class AlternatingProgram(Program):
    """One unit = two updates on two batches: the first trains task 0 only, the second task 1
    only (any further task never trains). Its state counts updates per task and validations."""

    name = "alternating"
    batches_per_unit = 2
    updates_per_unit = 2

    def init_state(self, variables):
        del variables
        return {
            "updates": jnp.zeros(len(self.exp.tasks), jnp.int32),
            "evals": jnp.zeros((), jnp.int32),
        }

    def make_unit_fn(self):
        exp, num_tasks = self.exp, len(self.exp.tasks)

        def alternating_fn(state, sums, first, second):
            for i, batch in enumerate((first, second)):
                active = jnp.zeros(num_tasks, jnp.float32).at[i].set(1.0)
                ctx = steps.LossContext.hard(steps.progress(exp, state.step), num_tasks, active)
                state, metrics = steps.train_step(exp, state, batch, ctx)
                program = dict(state.program, updates=state.program["updates"] + (active > 0))
                state = state.replace(program=program)
                sums = steps.accumulate(sums, metrics)
            return state, sums

        return alternating_fn

    def after_eval(self, state, step, val_metrics):
        assert set(val_metrics) == set(self.exp.task_names)
        return state.replace(program=dict(state.program, evals=state.program["evals"] + 1))

    def results(self, state):
        return {"updates": [int(u) for u in jax.device_get(state.program["updates"])]}


@pytest.fixture(scope="module")
def alternating():
    programs.register("alternating", AlternatingProgram)
    return small_config(program__name="alternating")


def final_state(exp, workdir):
    state, data_state = loop_lib.restore_latest(exp, str(workdir))
    return jax.device_get(state), data_state


def test_a_program_defined_here_runs_and_resumes_bitwise(alternating, tmp_path, monkeypatch):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("the trainer handles SIGTERM only in the main thread")
    config = alternating
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
    assert straight["updates"] == [6, 6, 0]  # 12 steps = 6 units of one update per task

    real, calls = AlternatingProgram.run_unit, [0]

    def preempting(self, state, sums, batches):
        calls[0] += 1
        if calls[0] == 3:  # during the 3rd unit (steps 5-6): save at step 6, exit 143
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, state, sums, batches)

    monkeypatch.setattr(AlternatingProgram, "run_unit", preempting)
    with pytest.raises(SystemExit) as info:
        train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert info.value.code == 143
    monkeypatch.setattr(AlternatingProgram, "run_unit", real)
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert resumed["train"]["resumed_from"] == 6
    assert resumed["updates"] == [6, 6, 0]
    assert resumed["test"] == straight["test"]

    exp = experiment_lib.build_experiment(config)
    a, data_a = final_state(exp, tmp_path / "straight")
    b, data_b = final_state(exp, tmp_path / "resumed")
    chex.assert_trees_all_equal(a, b)
    assert int(a.step) == 12 and data_a["step"] == data_b["step"] == 12  # 2 batches per unit
    # Validations at steps 4, 8 and 12 (the last step included), each seen by the program once.
    assert int(a.program["evals"]) == int(b.program["evals"]) == 3
    # The task that never trained keeps its initial head parameters exactly (zero gradient).
    init = jax.device_get(experiment_lib.init_state(exp))
    for got, want, label in zip(
        jax.tree.leaves(a.params), jax.tree.leaves(init.params), jax.tree.leaves(exp.param_labels)
    ):
        if labels_lib.task_of(label) == "sum":
            np.testing.assert_array_equal(got, want)
        elif labels_lib.role(label) == "trunk":
            assert not np.array_equal(got, want)


def test_unknown_program_is_a_config_error():
    from hisd_jax.config import ConfigError, validate  # noqa: PLC0415

    with pytest.raises(ConfigError, match=r"program\.name='nope' is not one of .*standard"):
        validate(small_config(program__name="nope"))


# ----------------------------------------------------------------------- the active mask
def _strategies():
    out = []
    for name in strategy_lib.STRATEGIES:
        spaces = ("param", "rep") if name in strategy_lib.GRADIENT_METHODS else ("param",)
        out += [(name, space) for space in spaces]
    return out


def _hparams(name, tasks):
    return {"weights": tuple(0.5 + i for i in range(len(tasks)))} if name == "static" else {}


def _exp(tasks, name, space):
    config = small_config(tasks=tasks, mtl__method=name, mtl__space=space)
    config.mtl.hparams = _hparams(name, tasks)
    return experiment_lib.build_experiment(config)


def _batch(exp):
    it = data_lib.BatchIterator(exp.dataset.splits["train"], 32, seed=0, prefetch=0)
    local = next(it)
    sharding = parallel.batch_sharded(exp.mesh)
    return parallel.global_batch({k: local[k] for k in exp.batch_keys(True)}, sharding)


def _grads_fn(exp):
    def fn(state, batch, active):
        ctx = steps.LossContext.hard(0.0, len(exp.tasks), active)
        loss, (grads, sgrads), new_sstate, metrics, _ = steps.grads(exp, state, batch, ctx)
        return loss, grads, sgrads, new_sstate, metrics

    return jax.jit(fn)


def _without(tree, labels, task):
    """`tree` (params-shaped) without the leaves of `task`'s own heads (and emptied dicts)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            sub = _without(v, labels[k], task)
            if not (isinstance(sub, dict) and not sub) or not isinstance(v, dict):
                out[k] = sub
        return out
    return None if labels_lib.task_of(labels) == task else tree


def _drop_none(tree):
    if isinstance(tree, dict):
        out = {k: _drop_none(v) for k, v in tree.items() if v is not None}
        return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
    return tree


def _toy(tasks):
    """A two-segment trunk and per-task heads as plain functions, with their label tree."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    params = {
        "segments_0": {"w": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)},
        "segments_1": {"w": jnp.asarray(rng.normal(size=(6, 6)) / 2, jnp.float32)},
        "heads_1": {"hidden0": {"k": jnp.asarray(rng.normal(size=(6, 6)) / 2, jnp.float32)}},
    }
    param_labels = {
        "segments_0": {"w": "trunk:0"},
        "segments_1": {"w": "trunk:1"},
        "heads_1": {"hidden0": {"k": "exit:1"}},
    }
    for i, t in enumerate(TASKS):  # the same values for a task whatever the task set
        k = jnp.asarray(np.random.default_rng(10 + i).normal(size=(6,)), jnp.float32)
        if t in tasks:
            params["heads_1"][f"out_{t}"] = {"k": k}
            param_labels["heads_1"][f"out_{t}"] = {"k": f"task:1:{t}"}

    def trunk(p):
        h0 = jnp.tanh(x @ p["segments_0"]["w"])
        return [h0, jnp.tanh(h0 @ p["segments_1"]["w"])], {}

    def heads(p, reps):
        h = jnp.tanh(reps[1] @ p["heads_1"]["hidden0"]["k"])
        return {t: h @ p["heads_1"][f"out_{t}"]["k"] for t in tasks}

    def task_losses(out):
        targets = {"left": 1.0, "right": -0.5, "sum": 0.25}
        return {t: jnp.mean((out[t] - targets[t]) ** 2) + 0.1 for t in tasks}, {}

    return params, param_labels, trunk, heads, task_losses


def _toy_step(tasks, name, space):
    params, param_labels, trunk, heads, task_losses = _toy(tasks)
    strategy = strategy_lib.build_strategy(
        name, tasks, space=space, steps_per_epoch=4, **_hparams(name, tasks)
    )
    sparams, sstate = strategy.init()

    @jax.jit
    def run(params, sparams, active):
        return strategy_lib.value_and_grad(
            strategy,
            trunk=trunk,
            heads=heads,
            task_losses=task_losses,
            params=params,
            param_labels=param_labels,
            strategy_params=sparams,
            strategy_state=sstate,
            step=jnp.asarray(5, jnp.int32),
            rng=jax.random.key(3),
            active=active,
        )

    return params, param_labels, sparams, run


@pytest.mark.parametrize("name,space", _strategies())
def test_an_inactive_task_gets_no_gradient_and_changes_nothing_else(name, space):
    """Task 'sum' inactive: exactly zero gradient and weight, and the same update of every
    other parameter (and the same weights) as the model that never had the task."""
    params, param_labels, sparams, run = _toy_step(TASKS, name, space)
    loss, (grads, sgrads), _, metrics, _ = run(params, sparams, jnp.array([1.0, 1.0, 0.0]))
    sub_params, _, sub_sparams, sub_run = _toy_step(TASKS[:2], name, space)
    sub_loss, (sub_grads, _), _, sub_metrics, _ = sub_run(sub_params, sub_sparams, None)

    assert float(metrics["weight/sum"]) == 0.0
    assert not np.any(np.asarray(grads["heads_1"].pop("out_sum")["k"]))  # exactly zero
    chex.assert_trees_all_close(grads, sub_grads, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(loss), float(sub_loss), rtol=1e-5)
    for t in TASKS[:2]:
        np.testing.assert_allclose(
            float(metrics[f"weight/{t}"]), float(sub_metrics[f"weight/{t}"]), rtol=1e-4, atol=1e-7
        )
    for g in jax.tree.leaves(sgrads):  # UW's log-variances: none for the inactive task
        assert g.shape[0] == 3 and float(g[2]) == 0.0
    del param_labels


@pytest.mark.parametrize("name,space", [("dwa", "param"), ("pcgrad", "rep")])
def test_an_inactive_task_in_the_trainer_step(name, space):
    """The same on the real model through `steps.grads` (labels from the model)."""
    full, sub = _exp(TASKS, name, space), _exp(TASKS[:2], name, space)
    state = experiment_lib.init_state(full)
    sub_params = _drop_none(_without(jax.device_get(state.params), full.param_labels, "sum"))
    template = experiment_lib.init_state(sub)
    chex.assert_trees_all_equal_shapes(sub_params, jax.device_get(template.params))
    sub_state = template.replace(params=jax.device_put(sub_params, parallel.replicated(sub.mesh)))
    batch = _batch(full)

    loss, grads, _, _, metrics = _grads_fn(full)(
        state, batch, jnp.array([1.0, 1.0, 0.0], jnp.float32)
    )
    sub_loss, sub_grads, _, _, sub_metrics = _grads_fn(sub)(
        sub_state, {k: v for k, v in batch.items() if k != "sum"}, jnp.ones(2, jnp.float32)
    )
    assert float(metrics["weight/sum"]) == 0.0
    for label, g in zip(jax.tree.leaves(full.param_labels), jax.tree.leaves(grads)):
        if labels_lib.task_of(label) == "sum":
            assert not np.any(np.asarray(g)), label
    got = _drop_none(_without(jax.device_get(grads), full.param_labels, "sum"))
    chex.assert_trees_all_close(got, jax.device_get(sub_grads), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(float(loss), float(sub_loss), rtol=1e-5, atol=1e-6)
    for t in TASKS[:2]:
        np.testing.assert_allclose(
            float(metrics[f"weight/{t}"]), float(sub_metrics[f"weight/{t}"]), rtol=1e-4, atol=1e-6
        )


# ----------------------------------------------------------------------- parameter labels
def _config_files():
    out = []
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if name.endswith(".py") and not name.startswith("_"):
            out.append(name)
    return out


def _load(name):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(REPO, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(None)
    return config.base if "base" in config else config


def _old_owner(path, tasks):
    """The former name matching (strategy._owner): a leaf under `out_<task>` is the task's."""
    for key in path:
        name = getattr(key, "key", None)
        if isinstance(name, str) and name.startswith("out_") and name[4:] in tasks:
            return name[4:]
    return None


@pytest.mark.parametrize("config_file", _config_files())
def test_labels_classify_like_the_former_name_matching(config_file):
    from hisd_jax.models import build_model, model_section  # noqa: PLC0415
    from hisd_jax.mtl.tasks import task_specs  # noqa: PLC0415

    config = _load(config_file)
    dataset = None
    if config.data.name in ("digits", "multidigits"):  # embedded: the real tasks
        dataset = data_lib.get_dataset(config.data.name, **config.data.kwargs)
        dataset_tasks = dataset.tasks
    elif config.data.name.startswith("pycode"):  # shape and tasks, without building the corpus
        from hisd_jax.data import pycode  # noqa: PLC0415

        dataset_tasks = {
            "search": data_lib.TaskInfo("search", "retrieval", 0, "index"),
            "package": data_lib.TaskInfo(
                "package", "classification", len(pycode.PACKAGE_CLASSES), "package"
            ),
            "returns": data_lib.TaskInfo("returns", "classification", 2, "returns"),
        }
        kw = config.data.kwargs
        shape = (2, kw["max_len"]) if config.data.name == "pycode_search" else (kw["max_len"],)
        dataset = data_lib.Dataset(config.data.name, {}, shape, dataset_tasks, "tokens",
                                   "int32", kw["vocab_size"])  # fmt: skip
    elif config.data.name == "glue":  # TFDS text (not downloaded here): its shape and task
        kw = config.data.kwargs
        dataset_tasks = {"label": data_lib.TaskInfo("label", "classification", 2, "label")}
        dataset = data_lib.Dataset("glue", {}, (kw["max_len"],), dataset_tasks, "tokens",
                                   "int32", kw["vocab_size"])  # fmt: skip
    else:  # TFDS (not downloaded here): its tasks are 10-class digits
        dataset_tasks = {
            name: data_lib.TaskInfo(name, "classification", 10, name) for name in config.data.tasks
        }
    model = build_model(model_section(config), task_specs(config, dataset_tasks), dataset=dataset)
    if dataset is not None:
        x = jnp.zeros((1, *dataset.image_shape), dataset.input_dtype)
    else:
        x = jnp.zeros((1, 32, 32, 3))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
    param_labels = model.param_labels(params)
    tasks = tuple(config.data.tasks)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    assert len(flat) == len(jax.tree.leaves(param_labels)) > 0
    for (path, _), label in zip(flat, jax.tree.leaves(param_labels)):
        assert labels_lib.task_of(label) == _old_owner(path, tasks), (path, label)
        # Representation space: the former rule took top-level keys `heads_*` as the heads.
        top = path[0].key
        assert (labels_lib.role(label) != "trunk") == top.startswith("heads_"), (path, label)


def test_a_parameter_the_labels_do_not_know_is_an_error():
    exp = experiment_lib.build_experiment(small_config())
    params = jax.eval_shape(lambda: experiment_lib.init_state(exp)).params
    renamed = dict(params)
    renamed["heads_1"] = {
        ("logits_left" if k == "out_left" else k): v for k, v in params["heads_1"].items()
    }
    with pytest.raises(ValueError, match="labelled but absent"):
        exp.model.param_labels(renamed)
    extra = dict(params, adapter={"kernel": params["heads_1"]["out_left"]["kernel"]})
    with pytest.raises(ValueError, match="unlabelled"):
        exp.model.param_labels(extra)
