"""αVIL's target-focused baselines: discriminative importance weighting (programs/diw.py) and
per-example loss weights in the objective, against sklearn's probabilities and a float64
weighted cross-entropy written out."""

import types

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression
from test_alphavil import program_config

from hisd_jax import data as data_lib
from hisd_jax import experiment as experiment_lib
from hisd_jax import steps, train
from hisd_jax.data.embedded import ArraySource
from hisd_jax.programs import diw


def test_importance_weights_are_the_density_ratio_of_a_dev_vs_train_classifier():
    rng = np.random.default_rng(0)
    like_dev = rng.normal(1.0, 1.0, size=(200, 2, 2, 1))
    unlike = rng.normal(-1.0, 1.0, size=(200, 2, 2, 1))
    train_x = np.concatenate([like_dev, unlike]).astype(np.float32)
    dev_x = rng.normal(1.0, 1.0, size=(100, 2, 2, 1)).astype(np.float32)
    exp = types.SimpleNamespace(
        dataset=types.SimpleNamespace(
            splits={
                "train": ArraySource({"image": train_x, "index": np.arange(400)}),
                "val": ArraySource({"image": dev_x, "index": np.arange(100)}),
            },
            input_key="image",
        )
    )
    w = diw.importance_weights(exp, c=1.0)
    # Independently: sklearn's own probabilities, p / (1 - p) times N_train / N_dev.
    x = np.concatenate([train_x, dev_x]).reshape(500, -1).astype(np.float64)
    y = np.r_[np.zeros(400), np.ones(100)]
    p = LogisticRegression(C=1.0, max_iter=1000).fit(x, y).predict_proba(x[:400])[:, 1]
    np.testing.assert_allclose(w, p / (1 - p) * 4.0, rtol=1e-4)
    assert w[:200].mean() > 3 * w[200:].mean()  # rows drawn like the dev set weigh more


def test_example_weights_make_a_weighted_mean_of_the_task_loss():
    config = program_config(program__name="standard")
    exp = experiment_lib.build_experiment(config)
    state = experiment_lib.init_state(exp)
    it = data_lib.BatchIterator(exp.dataset.splits["train"], 32, seed=0, prefetch=0)
    batch = {k: v for k, v in next(it).items() if k in exp.batch_keys(True)}
    w = np.random.default_rng(1).uniform(0.1, 3.0, size=32).astype(np.float32)
    ctx = steps.LossContext.hard(0.0, 3).replace(example_weights={"right": jnp.asarray(w)})
    losses, _ = jax.jit(lambda s, b, c: steps.loss_fn(exp, s.params, s.batch_stats, b, c))(
        state, batch, ctx
    )
    out, _ = exp.model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
    )
    for i, (task, weights) in enumerate((("left", None), ("right", w), ("sum", None))):
        z = np.asarray(out["logits"][task][-1], np.float64)
        logp = z - z.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        ce = -logp[np.arange(32), batch[task]]
        want = ce.mean() if weights is None else (weights * ce).sum() / weights.sum()
        np.testing.assert_allclose(losses[i], want, rtol=2e-5)


def test_diw_trains_with_weights_near_one_on_embedded_data(tmp_path):
    results = train.train_and_evaluate(program_config(program__name="diw"), str(tmp_path))
    stats = results["diw"]["weights"]
    assert results["diw"]["target"] == "left"
    # Training and validation images are drawn alike: the density ratio stays near 1.
    assert 0.5 < stats["mean"] < 2.0 and stats["min"] > 0


def test_gcosine_takes_the_programs_target_unless_its_own_is_given():
    from conftest import override, tiny_config  # noqa: PLC0415

    from hisd_jax import experiment as experiment_lib  # noqa: PLC0415

    def config(**overrides):
        c = tiny_config()
        c.data.name, c.data.tasks = "multidigits", ("left", "right", "sum")
        c.mtl.method = "gcosine"
        return override(c, **overrides)

    # with target right (1): left and right are orthogonal (weight 0), sum positive (weight 1)
    c = config(program__target="right")
    s = experiment_lib.build_experiment(c).strategy
    g = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    w, _ = s.method.weights(
        jnp.asarray(g @ g.T, jnp.float32), jnp.ones(3), s.method.init(3), step=0, rng=None
    )
    np.testing.assert_array_equal(w, [0.0, 1.0, 1.0])
    c = config(program__target="right")
    with c.unlocked():
        c.mtl.hparams = {"target": "left"}
    s = experiment_lib.build_experiment(c).strategy
    w, _ = s.method.weights(
        jnp.asarray(g @ g.T, jnp.float32), jnp.ones(3), s.method.init(3), step=0, rng=None
    )
    np.testing.assert_array_equal(w, [1.0, 0.0, 1.0])
