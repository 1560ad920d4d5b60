"""MTL strategies inside the trainer, the experiment layer (tasks, configs) and the sweep.

Gradients are checked against independent computations: per-task `jax.grad` of each task's
loss through the whole model (no trunk/heads split, no vjp+vmap), and for representation
space an explicit vjp of the trunk with the combined representation gradient.
"""

import copy
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, override, tiny_config

from hisd_jax import loop as loop_lib
from hisd_jax import sweep, train
from hisd_jax import experiment as experiment_lib
from hisd_jax import steps as steps_lib
from hisd_jax import config as config_lib
from hisd_jax import data as data_lib
from hisd_jax.mtl import gradients as grad_lib
from hisd_jax.mtl import strategy as strategy_lib
from hisd_jax.mtl import tasks as tasks_lib
from hisd_jax.programs.standard import StandardProgram

TASKS = ("left", "same_parity", "ink")


def mtl_config(**overrides):
    """Three tasks (10-class, binary, regression) of a small MultiDigits on a 2-stage CNN."""
    c = tiny_config()
    c.name = "tiny_mtl"
    c.data.name = "multidigits"
    c.data.tasks = TASKS
    c.data.kwargs = {"num_train": 192, "num_val": 64, "num_test": 64}
    c.model.stage_sizes = (1, 1)
    c.model.width = 4
    # Heads at different exits: 'left' at both, 'same_parity' and 'ink' at the last one.
    c.model.task_exits = {"left": (0, 1), "same_parity": (1,), "ink": (1,)}
    c.train.steps = 16
    c.train.eval_every = 0
    c.train.log_every = 4
    c.train.checkpoint_every = 100
    return override(c, **overrides)


def small_config(**overrides):
    """mtl_config with the final_only objective (cheaper to compile)."""
    c = mtl_config(**overrides)
    c.objective.preset = "final_only"
    return c


def load_config_file(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# --------------------------------------------------------------------- gradient plumbing
@pytest.fixture(scope="module")
def setup():
    exp = experiment_lib.build_experiment(mtl_config())
    state = experiment_lib.init_state(exp)
    it = data_lib.BatchIterator(exp.dataset.splits["train"], 32, seed=0)
    batch = {k: jnp.asarray(v) for k, v in next(it).items() if k in exp.batch_keys(True)}
    it.close()
    return exp, state, batch


# A GradientMethod whose weights are whatever the strategy state holds (set per call).
FIXED = grad_lib.GradientMethod(lambda n: {}, lambda gram, losses, state, **_: (state["w"], state))


def pieces(exp, state, batch):
    """The trunk/heads/losses closures, as the trainer's step builds them."""
    model, objective = exp.model, exp.objective

    def trunk(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        reps, updates = model.apply(
            variables, batch["image"], train=True, method=model.trunk, mutable=["batch_stats"]
        )
        return reps, updates["batch_stats"]

    def heads(params, reps):
        return model.apply(
            {"params": params}, reps, project=objective.needs_projection, method=model.apply_heads
        )

    return (
        trunk,
        heads,
        lambda outputs: objective.task_losses(
            outputs, batch, steps_lib.LossContext.hard(0.0, len(TASKS))
        ),
    )


_UPDATES = {}


def strategy_update(exp, state, batch, weights, space="param", backward="auto"):
    """(combined loss, param update) of strategy.value_and_grad with fixed task weights."""
    key = (space, backward)
    if key not in _UPDATES:  # compiled once per (space, backward); the weights are an argument
        strategy = strategy_lib.Strategy("fixed", space, TASKS, method=FIXED, backward=backward)
        trunk, heads, task_losses = pieces(exp, state, batch)

        @jax.jit
        def run(params, w):
            loss, (grads, _), _, _, _ = strategy_lib.value_and_grad(
                strategy,
                trunk=trunk,
                heads=heads,
                task_losses=task_losses,
                params=params,
                param_labels=exp.param_labels,
                strategy_params={},
                strategy_state={"w": w},
                step=jnp.zeros((), jnp.int32),
                rng=jax.random.key(0),
            )
            return loss, grads

        _UPDATES[key] = run
    return _UPDATES[key](state.params, jnp.asarray(weights, jnp.float32))


_REFERENCE = {}


def reference_grads(exp, state, batch):
    """{task: d L_task / d params}, each by its own jax.grad through the whole model."""
    if "grads" not in _REFERENCE:

        def losses(params):
            outputs, _ = exp.model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                batch["image"],
                train=True,
                project=exp.objective.needs_projection,
                mutable=["batch_stats"],
            )
            return exp.objective.task_losses(
                outputs, batch, steps_lib.LossContext.hard(0.0, len(TASKS))
            )[0]

        @jax.jit
        def all_grads(params):
            return {t: jax.grad(lambda p, t=t: losses(p)[t])(params) for t in TASKS}, losses(params)

        _REFERENCE["grads"] = all_grads(state.params)
    return _REFERENCE["grads"]


def owner(path):
    """The task whose head `out_<task>` holds this leaf (independent of the model's label tree)."""
    names = [getattr(k, "key", "") for k in path]
    owners = [t for t in TASKS if f"out_{t}" in names]
    return owners[0] if owners else None


def shared_max(tree):
    """max |leaf| over the trunk's leaves (top-level keys `segments_*`)."""
    return max(
        float(jnp.abs(leaf).max())
        for k, v in tree.items()
        if k.startswith("segments_")
        for leaf in jax.tree.leaves(v)
    )


def expected(per_task, w, *, shared=None):
    """Shared leaves: sum_t w_t g_t (or `shared`); a task's own head leaves: its gradient."""

    def leaf(path, *gs):
        t = owner(path)
        if t is not None:
            return gs[TASKS.index(t)]
        if shared is not None:
            return shared(path)
        return sum(wi * g for wi, g in zip(w, gs))

    return jax.tree_util.tree_map_with_path(leaf, *[per_task[t] for t in TASKS])


@pytest.mark.parametrize("backward", ["unroll", "vmap"])
def test_per_task_gradients_equal_independent_grads(setup, backward):
    """(1) Per-task gradients of one forward pass (weights e_t) equal per-task jax.grad, with
    the backward passes unrolled or vmapped; heads own theirs."""
    exp, state, batch = setup
    ref, losses = reference_grads(exp, state, batch)
    heads_seen = {owner(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert heads_seen == {None, *TASKS}
    for i, t in enumerate(TASKS):
        onehot = np.eye(len(TASKS))[i]
        loss, grads = strategy_update(exp, state, batch, onehot, backward=backward)
        np.testing.assert_allclose(loss, losses[t], rtol=1e-6)
        chex.assert_trees_all_close(grads, expected(ref, onehot), atol=2e-6, rtol=2e-4)
        # The shared part is task t's gradient alone, and is not zero.
        assert shared_max(grads) > 0


def test_mean_weights_give_gradient_of_mean_loss(setup):
    """(2) Fixed weights 1/T: shared update = grad of the mean loss; heads keep their own."""
    exp, state, batch = setup
    ref, _ = reference_grads(exp, state, batch)
    num = len(TASKS)
    mean_weights, _ = grad_lib.get_gradient_method("mean", num).weights(
        jnp.eye(num), jnp.ones(num), {}, step=0, rng=None
    )
    _, grads = strategy_update(exp, state, batch, mean_weights)
    chex.assert_trees_all_close(grads, expected(ref, [1 / num] * num), atol=2e-6, rtol=2e-4)
    # With w = 1 the whole update is the gradient of the summed loss, as the EW loss
    # weighting computes it in one backward pass.
    _, ones = strategy_update(exp, state, batch, np.ones(num))
    total = jax.tree.map(lambda *g: sum(g), *ref.values())
    chex.assert_trees_all_close(ones, total, atol=2e-6, rtol=2e-4)


@pytest.mark.parametrize("backward", ["unroll", "vmap"])
def test_rep_space_trunk_gradient_is_vjp_of_combined_rep_gradient(setup, backward):
    """(3) Rep space: trunk grads = vjp_trunk(sum_t w_t dL_t/dz); head leaves as in (1)."""
    exp, state, batch = setup
    w = np.array([0.2, 0.5, 0.3], np.float32)
    _, grads = strategy_update(exp, state, batch, w, space="rep", backward=backward)

    trunk, heads, task_losses = pieces(exp, state, batch)

    @jax.jit
    def reference(params):
        reps, trunk_vjp = jax.vjp(lambda p: trunk(p)[0], params)
        rep_grads = [
            jax.grad(lambda z, t=t: task_losses(heads(params, z))[0][t])(reps) for t in TASKS
        ]
        cotangent = jax.tree.map(lambda *g: sum(wi * gi for wi, gi in zip(w, g)), *rep_grads)
        (trunk_grads,) = trunk_vjp(cotangent)
        fixed_reps = jax.lax.stop_gradient(reps)
        head_grads = {
            t: jax.grad(lambda p, t=t: task_losses(heads(p, fixed_reps))[0][t])(params)
            for t in TASKS
        }
        return trunk_grads, head_grads

    trunk_grads, head_grads = reference(state.params)
    want = expected(head_grads, w)
    for key in grads:  # trunk keys from the vjp, head keys from the weighted head gradients
        if not key.startswith("heads_"):
            want[key] = trunk_grads[key]
    chex.assert_trees_all_close(grads, want, atol=2e-6, rtol=2e-4)
    assert shared_max(trunk_grads) > 0


def with_strategy(exp, state, strategy, tx=None):
    """The setup experiment and state with another strategy (and optimizer), no re-init."""
    exp = dataclasses.replace(exp, strategy=strategy, tx=tx or exp.tx)
    strategy_params, strategy_state = strategy.init()
    state = state.replace(
        opt_state=exp.tx.init({"model": state.params, "strategy": strategy_params}),
        strategy_params=strategy_params,
        strategy_state=strategy_state,
    )
    return exp, jax.tree.map(jnp.copy, state)  # the step donates its input


def run_steps(exp, state, batch, n):
    step = steps_lib.make_train_step(exp)
    sums = steps_lib.zero_metric_sums(exp, step, state, batch)
    for _ in range(n):
        state, sums = step(state, sums, batch)
    return state


def test_train_step_with_mean_method_is_sgd_on_mean_loss(setup):
    """(2) The trainer's jitted step: SGD(lr=1) with 'mean' weights moves shared params by the
    gradient of the mean loss (a task's own head by its own gradient)."""
    exp, state, batch = setup
    n = len(TASKS)
    mean = strategy_lib.Strategy(
        "mean", "param", TASKS, method=grad_lib.get_gradient_method("mean", n)
    )
    exp, state = with_strategy(exp, state, mean, tx=optax.sgd(1.0))
    ref, _ = reference_grads(*setup)
    before = jax.device_get(state.params)
    new = run_steps(exp, state, batch, 1)
    delta = jax.tree.map(lambda a, b: a - b, before, jax.device_get(new.params))
    chex.assert_trees_all_close(delta, expected(ref, [1 / n] * n), atol=1e-5, rtol=1e-3)


# ------------------------------------------------------------------- state in the trainer
def _final_state(exp, workdir):
    return jax.device_get(loop_lib.restore_latest(exp, str(workdir))[0])


@pytest.mark.parametrize("method", ["dwa", "gradvac"])
def test_strategy_state_resumes_exactly(method, tmp_path, monkeypatch):
    """(4) N steps in one go == N/2 steps, preemption (SIGTERM), resume: same state, bitwise."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("the trainer handles SIGTERM only in the main thread")
    # DWA: 128 examples / batch 32 = 4 steps per epoch, so 12 steps see 2 finished epochs.
    config = small_config(mtl__method=method, train__steps=12)
    config.data.kwargs.num_train = 128
    steps = config.train.steps
    train.train_and_evaluate(config, str(tmp_path / "straight"))

    real = StandardProgram.run_unit
    calls = [0]

    def preempting(self, state, sums, batches):
        calls[0] += 1
        if calls[0] == steps // 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer saves, then exits 143
        return real(self, state, sums, batches)

    monkeypatch.setattr(StandardProgram, "run_unit", preempting)
    with pytest.raises(SystemExit) as info:
        train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert info.value.code == 143
    monkeypatch.setattr(StandardProgram, "run_unit", real)
    results = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert results["train"]["resumed_from"] == steps // 2

    exp = experiment_lib.build_experiment(config)
    a, b = _final_state(exp, tmp_path / "straight"), _final_state(exp, tmp_path / "resumed")
    assert int(a.step) == int(b.step) == steps
    chex.assert_trees_all_equal(a.strategy_state, b.strategy_state)
    chex.assert_trees_all_equal(a.params, b.params)
    chex.assert_trees_all_equal(a.opt_state, b.opt_state)
    leaves = jax.tree.leaves(a.strategy_state)
    if method == "dwa":
        assert int(a.strategy_state["epochs_done"]) == 2
        assert not np.allclose(a.strategy_state["history"], 1.0)
    else:
        assert np.abs(a.strategy_state["targets"]).max() > 0
    assert leaves


# ------------------------------------------------------------------ tasks and configs
def test_task_specs_metrics_and_validation():
    config = mtl_config()
    dataset_tasks = data_lib.get_dataset("multidigits", **config.data.kwargs).tasks
    specs = {s.name: s for s in tasks_lib.task_specs(config, dataset_tasks)}
    assert specs["left"].metrics == {"accuracy": True}
    assert specs["ink"].metrics == {"mae": False}
    assert specs["left"].exits == (0, 1) and specs["left"].eval_exit == "exit1"
    assert specs["same_parity"].exits == (1,)
    assert specs["left"].num_classes == 10 and specs["ink"].kind == "regression"

    config.mtl.metrics = {"ink": {"mse": "lower", "mae": "lower"}}
    config_lib.validate(config)
    assert tasks_lib.task_specs(config, dataset_tasks)[2].metrics == {"mse": False, "mae": False}
    for bad, field in [
        ({"ink": {"mae": "down"}}, "mtl.metrics.ink.mae"),
        ({"ink": {"f1": "higher"}}, "mtl.metrics.ink.f1"),
        ({"sum": {"accuracy": "higher"}}, "mtl.metrics"),
    ]:
        config.mtl.metrics = bad
        with pytest.raises(config_lib.ConfigError, match=field):
            config_lib.validate(config)
    config.mtl.metrics = {"ink": {"accuracy": "higher"}}  # valid name, wrong kind
    with pytest.raises(config_lib.ConfigError, match="regression"):
        tasks_lib.task_specs(config, dataset_tasks)


def test_mtl_config_files_validate():
    config = load_config_file("mtl_multidigits.py")
    config_lib.validate(config)
    assert config.data.tasks == ("left", "right", "sum", "same_parity", "ink")
    assert config.objective.preset == "final_only" and config.mtl.method == "ew"
    assert all(tuple(v) == (3,) for v in config.model.task_exits.values())
    variant = load_config_file("mtl_multidigits.py", "method=nashmtl,space=rep,seed=2,steps=300")
    config_lib.validate(variant)
    assert (variant.mtl.method, variant.mtl.space, variant.seed) == ("nashmtl", "rep", 2)
    assert variant.train.steps == 300
    single = load_config_file("mtl_multidigits.py", "single=same_parity")
    config_lib.validate(single)
    assert single.data.tasks == ("same_parity",) and single.mtl.method == "ew"
    assert set(single.model.task_exits) == {"same_parity"}
    same = ("train", "optimizer", "objective")
    assert all(single[k].to_dict() == config[k].to_dict() for k in same)
    assert {k: v for k, v in single.model.items() if k != "task_exits"} == {
        k: v for k, v in config.model.items() if k != "task_exits"
    }

    mnist = load_config_file("mtl_multimnist.py")  # validated only: needs TFDS data
    config_lib.validate(mnist)
    assert mnist.data.name == "multimnist" and mnist.data.tasks == ("left", "right")
    config_lib.validate(load_config_file("mtl_multimnist.py", "method=pcgrad,single=left"))


# ------------------------------------------------------------------------------ the sweep
SWEEP_METHODS = ["uw", "pcgrad@rep"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """(5) 2 methods x 2 seeds (and 2 tasks x 2 seeds of baselines) on a one-stage CNN."""
    config = small_config()
    config.data.tasks = ("left", "ink")
    config.model.stage_sizes = (1,)  # one stage, one exit
    config.model.width = 4
    config.model.task_exits = {}
    config.train.steps = 8
    workdir = str(tmp_path_factory.mktemp("sweep"))
    return config, workdir, sweep.sweep(config, workdir, SWEEP_METHODS, [0, 1])


def test_sweep_writes_table_and_delta_m(tiny_sweep):
    config, workdir, out = tiny_sweep
    md = open(os.path.join(workdir, "sweep.md")).read()
    assert out["table"] in md and "Δm%" in md
    for row in ("single-task", "uw", "pcgrad@rep"):
        assert f"| {row} |" in out["table"]
    summary = json.load(open(os.path.join(workdir, "sweep.json")))
    rows = summary["rows"]
    assert set(rows) == {"single-task", "uw", "pcgrad@rep"}
    assert summary["seeds"] == [0, 1] and rows["uw"]["delta_m"]["n"] == 2
    assert abs(rows["single-task"]["delta_m"]["mean"]) < 1e-9  # baselines vs their own mean
    # Delta_m of one run, recomputed by hand from the raw results.json files.
    test = {}
    for task in ("left", "ink"):
        for seed in (0, 1):
            path = os.path.join(workdir, "single", task, f"seed{seed}", "results.json")
            test[task, seed] = json.load(open(path))["test"][task]["exit0"]
    base_acc = (test["left", 0]["accuracy"] + test["left", 1]["accuracy"]) / 2
    base_mae = (test["ink", 0]["mae"] + test["ink", 1]["mae"]) / 2
    run = json.load(open(os.path.join(workdir, "pcgrad_rep", "seed1", "results.json")))
    assert run["name"].endswith(":pcgrad@rep:seed1")
    acc, mae = run["test"]["left"]["exit0"]["accuracy"], run["test"]["ink"]["exit0"]["mae"]
    by_hand = 50 * ((acc - base_acc) / base_acc - (mae - base_mae) / base_mae)
    assert rows["pcgrad@rep"]["seeds"]["1"]["delta_m"] == pytest.approx(by_hand, rel=1e-9)
    # 'vs best': the other row's mean metrics relative to the best standard row's (by Delta_m).
    best = max(("uw", "pcgrad@rep"), key=lambda r: rows[r]["delta_m"]["mean"])
    other = "uw" if best == "pcgrad@rep" else "pcgrad@rep"
    assert summary["best_standard"] == best and rows[best]["vs_best"] == 0.0
    mean = {
        r: {t: {m: v["mean"] for m, v in rows[r]["metrics"][t].items()} for t in ("left", "ink")}
        for r in (best, other)
    }
    want = 50 * (
        (mean[other]["left"]["accuracy"] - mean[best]["left"]["accuracy"])
        / mean[best]["left"]["accuracy"]
        - (mean[other]["ink"]["mae"] - mean[best]["ink"]["mae"]) / mean[best]["ink"]["mae"]
    )
    assert rows[other]["vs_best"] == pytest.approx(want, rel=1e-9)
    assert f"vs {best} % ↑" in out["table"]


def test_sweep_does_not_retrain_finished_runs(tiny_sweep, capsys):
    config, workdir, out = tiny_sweep
    paths = [
        os.path.join(d, "results.json")
        for d, _, files in os.walk(workdir)
        if "results.json" in files
    ]
    assert len(paths) == 8  # 2 tasks x 2 seeds + 2 methods x 2 seeds
    mtimes = {p: os.stat(p).st_mtime_ns for p in paths}
    capsys.readouterr()
    again = sweep.sweep(config, workdir, SWEEP_METHODS, [0, 1])
    assert "training" not in capsys.readouterr().err
    assert {p: os.stat(p).st_mtime_ns for p in paths} == mtimes
    assert again["summary"] == out["summary"]


def test_sweep_errors(tiny_sweep, tmp_path):
    config, workdir, _ = tiny_sweep
    clone = str(tmp_path / "clone")
    shutil.copytree(workdir, clone)
    # A missing baseline is an error, not a silent fallback.
    os.remove(os.path.join(clone, "single", "ink", "seed1", "results.json"))
    with pytest.raises(sweep.SweepError, match=r"baseline of task 'ink' with seed 1"):
        sweep.sweep(config, clone, SWEEP_METHODS, [0, 1], train=False)
    # A method missing its hyper-parameters fails before anything trains.
    with pytest.raises(config_lib.ConfigError, match="static"):
        sweep.sweep(config, str(tmp_path / "other"), ["static"], [0])
    assert not os.path.exists(tmp_path / "other")
    # A finished run is not reused under another config.
    other = copy.deepcopy(config)
    other.train.steps = 9
    with pytest.raises(config_lib.ConfigError, match="train.steps"):
        sweep.sweep(other, clone, ["uw"], [0], train=False)


def test_sweep_shards_train_disjoint_runs(tiny_sweep, tmp_path, capsys):
    config, workdir, out = tiny_sweep
    clone = str(tmp_path / "clone")
    shutil.copytree(workdir, clone)
    runs = sweep.plan(config, SWEEP_METHODS, [0, 1])
    for run in (runs[1], runs[4]):  # one run of each shard is missing
        shutil.rmtree(os.path.join(clone, run.subdir))
    for i, missing in ((0, runs[4]), (1, runs[1])):
        capsys.readouterr()
        got = sweep.sweep(config, clone, SWEEP_METHODS, [0, 1], shard=(i, 2))
        assert got["table"] is None
        assert got["trained"] == [r.subdir for r in runs[i::2]]
        trained = [line for line in capsys.readouterr().err.splitlines() if "training" in line]
        assert len(trained) == 1 and missing.subdir in trained[0]
    again = sweep.sweep(config, clone, SWEEP_METHODS, [0, 1], train=False)
    for row, stats in out["summary"]["rows"].items():  # retrained runs are the same runs
        assert again["summary"]["rows"][row]["delta_m"] == stats["delta_m"]
    for text in ("2/2", "0/0", "-1/2", "a/b", "1"):
        with pytest.raises(sweep.SweepError, match="must be i/n"):
            sweep.parse_shard(text)
    assert sweep.parse_shard("1/3") == (1, 3) and sweep.parse_shard(None) is None


def test_sweep_judged_by_one_task(tiny_sweep, tmp_path):
    """`judge=("left",)`: only left's baselines are needed, the table has only left's column,
    and Δm is the relative change of left's accuracy over its single-task mean (by hand)."""
    config, workdir, _ = tiny_sweep
    clone = str(tmp_path / "clone")
    shutil.copytree(workdir, clone)
    shutil.rmtree(os.path.join(clone, "single", "ink"))  # not needed when judged by left
    out = sweep.sweep(config, clone, SWEEP_METHODS, [0, 1], train=False, judge=("left",))
    assert "left accuracy" in out["table"] and "ink" not in out["table"]
    rows = out["summary"]["rows"]
    base = [
        json.load(open(os.path.join(clone, "single", "left", f"seed{s}", "results.json")))
        for s in (0, 1)
    ]
    base_acc = sum(r["test"]["left"]["exit0"]["accuracy"] for r in base) / 2
    run = json.load(open(os.path.join(clone, "uw", "seed0", "results.json")))
    acc = run["test"]["left"]["exit0"]["accuracy"]
    assert rows["uw"]["seeds"][0]["delta_m"] == pytest.approx(
        100 * (acc - base_acc) / base_acc, rel=1e-9
    )
    assert not os.path.exists(os.path.join(clone, "single", "ink"))
    with pytest.raises(sweep.SweepError, match="--judge=up must name distinct tasks"):
        sweep.sweep(config, clone, SWEEP_METHODS, [0, 1], train=False, judge=("up",))


def test_uw_log_variances_are_trained(tiny_sweep):
    """(4) UW's log-variances get gradients through the optimizer and move (sweep's uw runs)."""
    config, workdir, _ = tiny_sweep
    for run in sweep.plan(config, ["uw"], [0, 1]):
        if run.label != "uw":
            continue
        state = _final_state(
            experiment_lib.build_experiment(run.config), os.path.join(workdir, run.subdir)
        )
        log_var = np.asarray(state.strategy_params["log_var"])
        assert log_var.shape == (2,) and np.all(np.isfinite(log_var)), log_var
        assert np.all(np.abs(log_var) > 1e-4), log_var
        # Adam moved them every step (the combined loss pulls s_t towards log L_t).
        assert int(state.step) == config.train.steps


def test_strategy_benchmark_times_each_variant():
    """The step benchmark times EW (the reference) and each name@space:backward it is given."""
    from hisd_jax import bench  # noqa: PLC0415

    config = small_config()
    config.model.stage_sizes = (1,)
    config.model.task_exits = {}
    out = bench.benchmark_strategies(config, ["mgda@param:vmap", "mgda@rep"], steps=2, rounds=2)
    labels = [r["strategy"] for r in out]
    assert labels == ["ew", "mgda:vmap", "mgda@rep"]
    assert [r["backward"] for r in out] == [None, "vmap", "auto"]
    assert all(r["step_ms"] > 0 and r["ratio_to_ew"] > 0 for r in out)
    assert out[0]["ratio_to_ew"] == 1.0
    table = bench.strategies_table(out)
    assert all(f"| {label} |" in table for label in labels)
    with pytest.raises(config_lib.ConfigError, match="mtl.backward"):
        bench.benchmark_strategies(config, ["mgda@param:jacrev"], steps=1, rounds=1)
    # 'all' expands in place: every loss weighting, every gradient method in both spaces.
    every = bench.strategy_tokens("all")
    num = len(strategy_lib.LOSS_WEIGHTINGS) + 2 * len(strategy_lib.GRADIENT_METHODS)
    assert len(set(every)) == len(every) == num and "nashmtl@rep" in every
    assert bench.strategy_tokens("all,mgda@param:vmap") == [*every, "mgda@param:vmap"]


def test_live_inputs_finds_what_a_function_reads():
    def f(params, reps):
        unused = jnp.mean(reps[0]) + jnp.sum(params["b"])  # traced, but not in the output
        del unused
        return jnp.stack([jnp.sum(reps[1] * params["a"]), jnp.sum(reps[2] ** 2)])

    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    reps = [jnp.ones(4), jnp.ones(3), jnp.ones(5)]
    assert strategy_lib.live_inputs(f, params, reps) == [True, False, False, True, True]


def test_rep_space_differentiates_only_the_representations_the_losses_read(monkeypatch):
    """Rep space on a toy trunk with three outputs, the heads reading two: the Gram matrix
    is that of the two read outputs' task gradients, and every update equals jax.grad of
    sum_t w_t L_t with the weights held fixed."""
    tasks = ("a", "b")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    params = {
        "segments_0": {"w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)},
        "segments_1": {"w": jnp.asarray(rng.normal(size=(5, 5)), jnp.float32)},
        "heads_1": {
            "out_a": {"k": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
            "out_b": {"k": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
        },
    }

    def trunk(p):
        h0 = jnp.tanh(x @ p["segments_0"]["w"])
        h1 = jnp.tanh(h0 @ p["segments_1"]["w"])
        return [jnp.concatenate([h0, h0], -1), h1, h1 * 2.0], {}

    def heads(p, reps):  # reps[0] feeds only a "features" output, like a task-less exit
        h = p["heads_1"]
        a = jnp.mean((reps[1] @ h["out_a"]["k"]) ** 2)
        b = jnp.mean(jnp.sin(reps[2] @ h["out_b"]["k"]))
        return {"a": a, "b": b, "features": jnp.mean(reps[0])}

    def task_losses(out):
        return {"a": out["a"], "b": out["b"]}, {"features": out["features"]}

    gram_shapes = []
    gram_matrix = grad_lib.gram_matrix

    def spy(per_task):
        gram_shapes.extend(leaf.shape for leaf in jax.tree.leaves(per_task))
        return gram_matrix(per_task)

    monkeypatch.setattr(grad_lib, "gram_matrix", spy)
    w = jnp.array([0.3, 0.8], jnp.float32)
    recorder = grad_lib.GradientMethod(lambda n: {}, lambda gram, losses, state, **_: (w, gram))
    strategy = strategy_lib.Strategy("fixed", "rep", tasks, method=recorder)
    _, (grads, _), gram, metrics, _ = jax.jit(
        lambda p: strategy_lib.value_and_grad(
            strategy,
            trunk=trunk,
            heads=heads,
            task_losses=task_losses,
            params=p,
            param_labels={
                "segments_0": {"w": "trunk:0"},
                "segments_1": {"w": "trunk:1"},
                "heads_1": {"out_a": {"k": "task:1:a"}, "out_b": {"k": "task:1:b"}},
            },
            strategy_params={},
            strategy_state={},
            step=0,
            rng=jax.random.key(0),
        )
    )(params)

    assert gram_shapes == [(2, 6, 5), (2, 6, 5)]  # not the unread (6, 10) output
    reps, _ = trunk(params)
    per_task = [
        jax.grad(lambda r, t=t: task_losses(heads(params, [reps[0], *r]))[0][t])(reps[1:])
        for t in tasks
    ]
    flat = np.stack([np.concatenate([np.ravel(g) for g in gs]) for gs in per_task])
    np.testing.assert_allclose(gram, flat @ flat.T, rtol=1e-5)

    def weighted(p):
        losses, _ = task_losses(heads(p, trunk(p)[0]))
        return w[0] * losses["a"] + w[1] * losses["b"]

    want = jax.grad(weighted)(params)
    # A task's own head leaf gets its gradient unweighted (strategy._weighted_update).
    for t, wt in zip(tasks, w):
        want["heads_1"][f"out_{t}"]["k"] = want["heads_1"][f"out_{t}"]["k"] / wt
    chex.assert_trees_all_close(grads, want, atol=1e-6, rtol=1e-5)
    assert float(metrics["features"]) == pytest.approx(float(jnp.mean(reps[0])))
