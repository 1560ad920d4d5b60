"""KD from converged tasks (programs/kd_converged.py, mtl/converged_kd.py).

Convergence is tested on synthetic metric sequences against a hand count; soft labels against
an independent forward pass of the stored best parameters; the loss switch against jax.grad of
the soft-label loss written out here; exact resume after SIGKILL in fresh processes.
"""

import json
import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _workers import cache_env, load_npz
from conftest import override, tiny_config
from test_resume import assert_states_equal, run, run_until_checkpoint

from hisd_jax import checkpointing
from hisd_jax import loop as loop_lib
from hisd_jax import steps, train
from hisd_jax import data as data_lib
from hisd_jax import experiment as experiment_lib
from hisd_jax import parallel
from hisd_jax.config import ConfigError
from hisd_jax.mtl import converged_kd as kd

TASKS = ("left", "right", "ink")


def kd_config(**overrides):
    """Three tasks (10-class, 10-class, regression) of a small MultiDigits, 2-stage CNN."""
    c = tiny_config()
    c.name = "kd"
    c.data.name = "multidigits"
    c.data.tasks = TASKS
    c.data.kwargs = {"num_train": 128, "num_val": 64, "num_test": 64}
    c.model.stage_sizes = (1, 1)
    c.model.width = 4
    c.objective.preset = "final_only"
    c.program.name = "kd_joint"
    c.train.steps = 40
    c.train.eval_every = 4
    c.train.log_every = 4
    c.train.checkpoint_every = 4
    return override(c, **overrides)


# --------------------------------------------------------------------------- convergence
def run_tracker(scores, patience, min_delta, tracked=None):
    tracker = kd.init_tracker(scores.shape[1])
    history = []
    for i, row in enumerate(scores):
        mask = np.ones(scores.shape[1], bool) if tracked is None else tracked
        tracker, improved, now = kd.update_tracker(
            tracker, row, step=10 * (i + 1), patience=patience, min_delta=min_delta, tracked=mask
        )
        history.append((improved.copy(), now.copy()))
    return tracker, history


def test_convergence_exactly_when_patience_runs_out():
    # Task 0 peaks at validation 2 (0.7), then 3 validations without improvement: converged
    # at validation 5 (step 50) with patience 3, not one validation earlier.
    # Task 1 keeps improving; task 2 ties its best (not an improvement).
    scores = np.array(
        [
            [0.5, 0.1, 0.3],
            [0.7, 0.2, 0.3],
            [0.6, 0.3, 0.3],
            [0.65, 0.4, 0.3],
            [0.69, 0.5, 0.3],
            [0.9, 0.6, 0.3],
        ],
        np.float32,
    )
    tracker, history = run_tracker(scores, patience=3, min_delta=0.0)
    assert [bool(now[0]) for _, now in history] == [False, False, False, False, True, False]
    assert [bool(now[2]) for _, now in history] == [False, False, False, True, False, False]
    assert not any(now[1] for _, now in history)
    assert tracker["converged"].tolist() == [1, 0, 1]
    assert tracker["converged_step"].tolist() == [50, -1, 40]
    assert tracker["best_step"].tolist() == [20, 60, 10]
    # Once converged a task is not tracked: the 0.9 at validation 6 changes nothing.
    np.testing.assert_allclose(tracker["best"], [0.7, 0.6, 0.3])


def test_min_delta_and_untracked_tasks():
    scores = np.array([[0.5], [0.505], [0.508], [0.509], [0.52]], np.float32)
    _, history = run_tracker(scores, patience=3, min_delta=0.01)
    assert [bool(now[0]) for _, now in history] == [False, False, False, True, False]
    tracker, _ = run_tracker(scores, patience=3, min_delta=0.0)
    assert tracker["converged"].tolist() == [0]  # every step is an improvement without it
    tracker, _ = run_tracker(scores[::-1].copy(), patience=1, min_delta=0.0, tracked=[False])
    assert tracker["converged"].tolist() == [0] and tracker["best_step"].tolist() == [-1]


def test_the_metric_direction_comes_from_the_task():
    """A falling MAE improves the regression task (lower is better); rising accuracy the
    classification tasks. Misread directions would converge them."""
    exp = experiment_lib.build_experiment(kd_config())
    program = exp.program
    tracker = kd.init_tracker(3)
    for i in range(6):
        acc, mae = 0.5 + 0.05 * i, 1.0 - 0.1 * i
        val = {
            "left": {"exit1": {"accuracy": acc}},
            "right": {"exit1": {"accuracy": acc}},
            "ink": {"exit1": {"mae": mae, "mse": mae**2}},
        }
        tracker, improved, now = kd.update_tracker(
            tracker, program.scores(val), 4 * i, patience=1, min_delta=0.0, tracked=[True] * 3
        )
        assert improved.all() and not now.any()


@pytest.mark.parametrize(
    "field,value",
    [
        ("patience", 0),
        ("min_delta", -0.1),
        ("temperature", 0.0),
        ("hard_weight", 1.5),
        ("top_k", -1),
        ("label_dtype", "int8"),
        ("order", ("left",)),
    ],
)
def test_bad_program_fields_are_config_errors(field, value):
    config = kd_config(program__name="kd_sequential")
    config.program[field] = value
    with pytest.raises(ConfigError, match=f"program.{field}"):
        experiment_lib.build_experiment(config)


def test_kd_needs_periodic_validation():
    with pytest.raises(ConfigError, match="train.eval_every"):
        experiment_lib.build_experiment(kd_config(train__eval_every=0))


# --------------------------------------------------------------------------- soft labels
def test_top_k_round_trip_within_its_stated_error():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(19, 0.3), size=64).astype(np.float32)
    full = kd.soft_targets(kd.compress(probs), jnp.arange(64), 19)
    np.testing.assert_array_equal(np.asarray(full), probs)
    for dtype, tol in (("float32", 1e-6), ("float16", 1e-3), ("bfloat16", 8e-3)):
        table = kd.compress(probs, top_k=3, dtype=dtype)
        dense = np.asarray(kd.soft_targets(table, jnp.arange(64), 19), np.float64)
        top = np.sort(probs, axis=1)[:, -3:]
        mass = top.sum(1)
        # Total-variation distance to the full distribution = 1 - mass of the top 3.
        tv = 0.5 * np.abs(dense - probs).sum(1)
        np.testing.assert_allclose(tv, 1.0 - mass, atol=tol * 3)
        np.testing.assert_allclose(np.sort(dense, 1)[:, -3:], top / mass[:, None], atol=tol)
        assert (dense > 0).sum(1).max() <= 3
        assert kd.table_bytes_per_example(table) == 3 * (4 if dtype == "float32" else 2) + 3 * 4
    assert kd.table_bytes_per_example(kd.compress(probs)) == 19 * 4


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    """kd_joint where every task converges at step 8: min_delta 1 makes every validation after
    the first a non-improvement, patience 1 converges at the next one."""
    config = kd_config(
        program__patience=1, program__min_delta=1.0, program__temperature=2.0, program__top_k=0
    )
    workdir = str(tmp_path_factory.mktemp("kd") / "joint")
    results = train.train_and_evaluate(config, workdir)
    exp = experiment_lib.build_experiment(config)
    state, _ = loop_lib.restore_latest(exp, workdir)
    return exp, results, jax.device_get(state), workdir


def test_training_stops_when_every_task_has_converged(joint_run):
    exp, results, state, workdir = joint_run
    assert results["kd"]["converged_step"] == {t: 8 for t in TASKS}
    assert results["kd"]["best_step"] == {t: 4 for t in TASKS}
    assert int(state.step) == 8  # not the 40-step budget
    assert results["kd"]["reported_parameters"] == "final"
    per_task = results["kd"]["selected_on_validation"]
    assert set(per_task) == set(TASKS) and set(per_task["ink"]["test"]) == {"mse", "mae"}
    assert np.asarray(state.program["soft_weight"]).tolist() == [1.0, 1.0, 1.0]


def test_the_last_steps_validation_reaches_the_tracker(tmp_path):
    """Validations at 4 and 8 = train.steps: the one at the last step converges every task."""
    config = kd_config(
        program__patience=1, program__min_delta=1.0, train__steps=8, train__checkpoint_every=8
    )
    results = train.train_and_evaluate(config, str(tmp_path))
    assert results["kd"]["converged_step"] == {t: 8 for t in TASKS}
    with open(tmp_path / "metrics.jsonl") as f:
        events = [json.loads(line) for line in f]
    assert [e["step"] for e in events if e["split"] == "val"] == [4, 8]  # logged once
    assert [e["step"] for e in events if e["split"] == "test"] == [8]


def test_soft_labels_equal_an_independent_forward_pass_of_the_best_parameters(joint_run):
    exp, _, state, _ = joint_run
    train_split = exp.dataset.splits["train"]
    images = train_split.get_batch(np.arange(len(train_split)))["image"]
    for task in exp.tasks:
        best = state.program["best_params"][task.name]
        outputs = exp.model.apply(best, jnp.asarray(images))
        z = np.asarray(outputs["logits"][task.name][-1], np.float64)  # the deepest exit
        table = state.program["soft"][task.name]
        if task.kind == "classification":
            z = z / 2.0  # program.temperature
            want = np.exp(z - z.max(1, keepdims=True))
            want /= want.sum(1, keepdims=True)
            np.testing.assert_allclose(table["probs"], want, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(table["pred"], z[:, 0], rtol=1e-5, atol=1e-6)
    # The best parameters are those of step 4, not the final ones (training went on to 8).
    best, final = state.program["best_params"]["left"]["params"], state.params
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, best, final)))


def test_soft_labels_and_best_parameters_are_items_of_their_own(joint_run):
    exp, _, state, workdir = joint_run
    for task in TASKS:  # converged at step 8, best at step 4: one version each
        for item, step in (("soft_labels", 8), ("best_params", 4)):
            with checkpointing.ItemStore(os.path.join(workdir, "kd", item, task)) as store:
                assert store.steps() == (step,)
    # The rolling checkpoints hold neither.
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",)) as m:
        raw = m.restore(8, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    assert sorted(raw["program"]) == ["active", "soft_weight", "tracker"]


def test_item_versions_outlive_the_rolling_retention_and_restore_exactly(tmp_path):
    """keep_checkpoints=1: best-parameter versions keep 2 (every retained checkpoint's one),
    soft labels are never deleted; a restore takes exactly the versions the tracker names."""
    exp = experiment_lib.build_experiment(kd_config(train__keep_checkpoints=1))
    program, fresh = exp.program, experiment_lib.init_state(exp)
    workdir = str(tmp_path)

    def with_tracker(best, converged, scale):
        tracker = dict(fresh.program["tracker"])
        tracker["best_step"] = jnp.array([best, -1, -1], jnp.int32)
        tracker["converged_step"] = jnp.array([converged, -1, -1], jnp.int32)
        prog = dict(fresh.program, tracker=tracker)
        prog["best_params"] = dict(prog["best_params"])
        prog["best_params"]["left"] = jax.tree.map(lambda x: x + scale, prog["best_params"]["left"])
        prog["soft"] = dict(prog["soft"])
        prog["soft"]["left"] = jax.tree.map(lambda x: x + scale, prog["soft"]["left"])
        return fresh.replace(program=prog)

    states = [
        with_tracker(*args) for args in ((4, -1, 1.0), (8, -1, 2.0), (12, 16, 3.0), (12, 16, 4.0))
    ]
    for state in states:
        program.save_artifacts(workdir, state)
    kd_dir = os.path.join(workdir, "kd")
    with checkpointing.ItemStore(os.path.join(kd_dir, "best_params", "left")) as store:
        assert store.steps() == (8, 12)  # keep_checkpoints + 1
    with checkpointing.ItemStore(os.path.join(kd_dir, "soft_labels", "left")) as store:
        assert store.steps() == (16,)  # written once: the scale-4 state changed nothing
    assert not os.path.exists(os.path.join(kd_dir, "best_params", "right"))

    # The last state's versions were on disk already (the same steps): the scale-3 data stays.
    restored = program.restore_artifacts(workdir, program.checkpointed(states[-1]), fresh)
    got = jax.device_get(restored.program)
    chex.assert_trees_all_equal(
        got["best_params"], jax.device_get(states[2].program)["best_params"]
    )
    chex.assert_trees_all_equal(got["soft"], jax.device_get(states[2].program)["soft"])

    with pytest.raises(FileNotFoundError, match="best_params/left has no version 4"):
        program.restore_artifacts(workdir, program.checkpointed(states[0]), fresh)


# --------------------------------------------------------------------------- the loss switch
def test_a_converged_task_trains_on_its_soft_labels_only():
    exp = experiment_lib.build_experiment(kd_config())
    state = experiment_lib.init_state(exp)
    it = data_lib.BatchIterator(exp.dataset.splits["train"], 32, seed=0, prefetch=0)
    local = {k: v for k, v in next(it).items() if k in exp.batch_keys(True)}
    q = np.random.default_rng(1).dirichlet(np.ones(10), size=32).astype(np.float32)

    @jax.jit
    def grads(state, batch, q):
        ctx = steps.LossContext(
            progress=jnp.float32(0.0),
            active=jnp.ones(3, jnp.float32),
            soft_weight=jnp.array([1.0, 0.0, 0.0], jnp.float32),
            soft_targets={"left": q, "right": q, "ink": batch["ink"] * 0},
        )
        return steps.grads(exp, state, batch, ctx)[1][0]

    sharding = parallel.batch_sharded(exp.mesh)
    got = grads(state, parallel.global_batch(local, sharding), q)

    def reference_loss(params):  # final_only, EW: soft CE for left, labels for the others
        out, _ = exp.model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            local["image"],
            train=True,
            mutable=["batch_stats"],
        )
        logp = jax.nn.log_softmax(out["logits"]["left"][-1])
        left = -jnp.mean(jnp.sum(q * logp, axis=1))
        logp_r = jax.nn.log_softmax(out["logits"]["right"][-1])
        right = -jnp.mean(jnp.take_along_axis(logp_r, local["right"][:, None], 1))
        ink = jnp.mean((out["logits"]["ink"][-1][:, 0] - local["ink"]) ** 2)
        return left + right + ink

    want = jax.jit(jax.grad(reference_loss))(state.params)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)

    permuted = dict(local, left=np.random.default_rng(2).permutation(local["left"]))
    again = grads(state, parallel.global_batch(permuted, sharding), q)
    chex.assert_trees_all_equal(got, again)  # the hard labels of 'left' no longer matter


def test_sequential_tasks_enter_in_the_configured_order(tmp_path):
    config = kd_config(
        program__name="kd_sequential",
        program__order=("ink", "left", "right"),
        program__patience=1,
        program__min_delta=1.0,
        train__log_every=1,
    )
    results = train.train_and_evaluate(config, str(tmp_path / "seq"))
    # ink enters first (converges at 8), left at 8 (converges at 16), right at 16 (at 24).
    assert results["kd"]["converged_step"] == {"ink": 8, "left": 16, "right": 24}
    with open(tmp_path / "seq" / "metrics.jsonl") as f:
        events = [json.loads(line) for line in f if '"train"' in line]
    order = {e["step"]: tuple(t for t in TASKS if e[f"kd/active/{t}"] == 1.0) for e in events}
    assert order[1] == order[8] == ("ink",)
    assert order[9] == order[16] == ("left", "ink")
    assert order[17] == order[24] == TASKS
    assert max(order) == 24


# --------------------------------------------------------------------------- exact resume
KD_ARG = (
    "data__name=multidigits,data__tasks=('left','right','ink'),"
    "data__kwargs={'num_train':128,'num_val':64,'num_test':64},model__stage_sizes=(1,1),"
    "model__width=4,objective__preset=final_only,program__name=kd_sequential,"
    "program__patience=1,program__min_delta=1.0,train__steps=40,train__eval_every=4,"
    "train__log_every=4,train__checkpoint_every=4"
)


def test_sigkill_after_a_task_converged_resumes_bitwise(pytestconfig, tmp_path_factory):
    env = cache_env(pytestconfig, tmp_path_factory)
    root = tmp_path_factory.mktemp("kd_resume")
    straight, killed = root / "straight", root / "killed"
    run(straight, KD_ARG, env)
    # 'left' converges at step 8; kill once the checkpoint of step 12 exists.
    code, log = run_until_checkpoint(killed, KD_ARG, env, 12, signal.SIGKILL)
    assert code == -signal.SIGKILL, log[-3000:]
    run(killed, KD_ARG, env)
    assert_states_equal(killed / "final_state.npz", straight / "final_state.npz")
    state = load_npz(straight / "final_state.npz")
    assert int(state[".step"]) == 24
    converged = [k for k in state if "converged_step" in k]
    assert state[converged[0]].tolist() == [8, 16, 24]
    with open(killed / "results.json") as f:
        assert json.load(f)["train"]["resumed_from"] >= 12


# --------------------------------------------------------------------------- sweep and figure
def test_sweep_tokens_name_a_program_and_its_method():
    from hisd_jax import sweep  # noqa: PLC0415
    from hisd_jax.mtl import tasks as tasks_lib  # noqa: PLC0415

    assert tasks_lib.parse_run("pcgrad@rep") == ("standard", "pcgrad", "rep")
    assert tasks_lib.parse_run("kd_joint") == ("kd_joint", "ew", "param")
    assert tasks_lib.parse_run("kd_sequential+cagrad@rep") == ("kd_sequential", "cagrad", "rep")
    assert tasks_lib.method_label("cagrad", "rep", "kd_joint") == "kd_joint+cagrad@rep"
    assert tasks_lib.method_label("ew", "param", "kd_joint") == "kd_joint"
    with pytest.raises(ConfigError, match="nope"):
        tasks_lib.parse_run("nope+ew")
    runs = sweep.plan(kd_config(), ["ew", "kd_joint", "kd_sequential+pcgrad"], [0])
    by_label = {r.label: r for r in runs}
    assert by_label["kd_joint"].config.program.name == "kd_joint"
    assert by_label["kd_joint"].config.mtl.method == "ew"
    assert by_label["kd_sequential+pcgrad"].config.mtl.method == "pcgrad"
    assert by_label["ew"].config.program.name == "standard"
    assert all(r.config.program.name == "standard" for r in runs if r.task)  # baselines


def test_kd_curves_figure(joint_run, tmp_path):
    from hisd_jax import plots  # noqa: PLC0415

    *_, workdir = joint_run
    curves = plots.validation_curves(workdir)
    assert set(curves) == set(TASKS) and [s for s, _ in curves["left"]] == [4, 8]
    out = str(tmp_path / "curves.png")
    plots.kd_curves([workdir], out)
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
