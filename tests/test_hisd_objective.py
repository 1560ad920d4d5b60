"""HiSD objective and distillation losses against independent float64 numpy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hisd_jax.objectives import distill
from hisd_jax.objectives.hisd import (
    PRESETS,
    HiSDWeights,
    ce_weights,
    hisd_loss,
    resolve_weights,
)

RTOL, ATOL = 1e-5, 1e-6
# (num_exits E, real batch B, classes C, temperature T)
CASES = [(1, 3, 2, 1.0), (2, 5, 10, 3.0), (4, 8, 7, 0.5), (6, 4, 100, 4.0)]
PAD = 3  # padding rows appended to every batch; they must not change any result
FEAT_DIM = 6


# ---------------------------------------------------------------- float64 numpy references
def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_ce(z, y):
    return -np_log_softmax(z)[np.arange(len(y)), y]


def np_soft_ce(z, targets):
    return -(targets * np_log_softmax(z)).sum(-1)


def np_kd(student, teacher, t):
    p = np_softmax(teacher / t)
    return t * t * (p * (np.log(p) - np_log_softmax(student / t))).sum(-1)


def np_feat(student, teacher, eps=1e-6):
    def norm(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)

    return ((norm(student) - norm(teacher)) ** 2).sum(-1)


def make_batch(seed, num_exits, batch, classes):
    """Random float64 inputs with PAD garbage rows appended, and the matching mask."""
    rng = np.random.default_rng(seed)
    n = batch + PAD

    def rows(*shape):
        x = rng.normal(size=(n, *shape)) * 3.0
        x[batch:] *= 10.0  # padding rows are large garbage
        return x

    return dict(
        logits=[rows(classes) for _ in range(num_exits)],
        labels=rng.integers(0, classes, size=n),
        targets=np_softmax(rows(classes)),
        features=[rows(FEAT_DIM) for _ in range(num_exits - 1)],
        final_features=rows(FEAT_DIM),
        mask=np.concatenate([np.ones(batch), np.zeros(PAD)]),
    )


def real(x, batch):
    return x[:batch]


def to_f32(tree):
    return jax.tree.map(
        lambda x: jnp.asarray(x, jnp.float32 if np.issubdtype(x.dtype, np.floating) else None),
        tree,
    )


# ---------------------------------------------------------------- distill.py
@pytest.mark.parametrize("num_exits,batch,classes,t", CASES)
def test_distill_terms_match_numpy_with_padding_mask(num_exits, batch, classes, t):
    d = make_batch(0, max(num_exits, 2), batch, classes)
    b = batch
    z, zt, y, q = d["logits"][0], d["logits"][1], d["labels"], d["targets"]
    s, h = d["features"][0], d["final_features"]

    @jax.jit
    def terms(z, zt, y, q, s, h, mask):
        return dict(
            ce=distill.cross_entropy(z, y, mask),
            soft_ce=distill.soft_cross_entropy(z, q, mask),
            kd=distill.kd_kl(z, zt, t, mask),
            feat=distill.feature_l2(s, h, mask),
        )

    expected = dict(
        ce=np_ce(z[:b], y[:b]).mean(),
        soft_ce=np_soft_ce(z[:b], q[:b]).mean(),
        kd=np_kd(z[:b], zt[:b], t).mean(),
        feat=np_feat(s[:b], h[:b]).mean(),
    )
    args = (z, zt, y, q, s, h)
    masked = terms(*to_f32(args), jnp.asarray(d["mask"], jnp.float32))
    unpadded = terms(*to_f32([real(a, b) for a in args]), None)
    chex.assert_trees_all_close(masked, expected, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(unpadded, expected, rtol=RTOL, atol=ATOL)


def test_masked_mean_weights_and_empty_mask():
    x = jnp.asarray([1.0, 2.0, 4.0, 100.0])
    np.testing.assert_allclose(
        distill.masked_mean(x, jnp.asarray([0.5, 1.0, 0.5, 0.0])), (0.5 + 2 + 2) / 2.0
    )
    assert float(distill.masked_mean(x, jnp.zeros(4))) == 0.0


def test_feature_l2_zero_rows_are_finite():
    student = jnp.zeros((2, 4))
    teacher = jnp.asarray([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    value, grad = jax.value_and_grad(distill.feature_l2)(student, teacher)
    np.testing.assert_allclose(value, 0.5, rtol=RTOL)  # rows: ‖0 − t̂‖² = 1 and 0
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("t,top_k", [(1.0, None), (2.0, None), (1.0, 1), (0.5, 3), (2.0, 7)])
def test_soft_labels_match_numpy(t, top_k):
    logits = np.random.default_rng(1).normal(size=(5, 7)) * 3.0
    expected = np_softmax(logits / t)
    if top_k is not None:
        drop = np.argsort(-expected, axis=-1)[:, top_k:]
        np.put_along_axis(expected, drop, 0.0, axis=-1)
        expected /= expected.sum(-1, keepdims=True)
    soft_labels = jax.jit(distill.soft_labels, static_argnums=(1, 2))
    got = soft_labels(jnp.asarray(logits, jnp.float32), t, top_k)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    if top_k is not None:
        assert np.all((np.asarray(got) > 0).sum(-1) == top_k)


@pytest.mark.parametrize("top_k", [0, 8])
def test_soft_labels_rejects_bad_top_k(top_k):
    with pytest.raises(ValueError, match=r"top_k=.* must be in \[1, 7\]"):
        distill.soft_labels(jnp.zeros((2, 7)), top_k=top_k)


# ---------------------------------------------------------------- hisd_loss
def np_hisd(d, batch, cs, ce_end, progress, kd_w, hier_w, feat_w, t, use_targets):
    b = batch
    z = [x[:b] for x in d["logits"]]
    e_final = len(z) - 1
    w = cs + (ce_end - cs) * np.clip(progress, 0.0, 1.0)
    if use_targets:
        ce = [np_soft_ce(x, d["targets"][:b]).mean() for x in z]
    else:
        ce = [np_ce(x, d["labels"][:b]).mean() for x in z]
    kd = sum(np_kd(z[e], z[e_final], t).mean() for e in range(e_final))
    hier = sum(np_kd(z[e], z[e + 1], t).mean() for e in range(e_final))
    feat = sum(np_feat(p[:b], d["final_features"][:b]).mean() for p in d["features"])
    total = float(np.dot(w, ce)) + kd_w * kd + hier_w * hier + feat_w * feat
    metrics = {f"ce/exit{e}": c for e, c in enumerate(ce)}
    metrics.update(kd=kd, hier=hier, feat=feat, loss=total)
    return metrics


@pytest.mark.parametrize("use_targets", [False, True])
@pytest.mark.parametrize("num_exits,batch,classes,t", CASES)
def test_hisd_loss_matches_numpy(num_exits, batch, classes, t, use_targets):
    d = make_batch(2, num_exits, batch, classes)
    rng = np.random.default_rng(3)
    cs, ce_end = rng.uniform(size=num_exits), rng.uniform(size=num_exits)
    kd_w, hier_w, feat_w = rng.uniform(size=3)
    progress = 0.37
    weights = resolve_weights(
        "hisd",
        num_exits,
        ce_start=cs,
        ce_end=ce_end,
        kd=kd_w,
        hier=hier_w,
        feat=feat_w,
        temperature=t,
    )

    @jax.jit
    def loss_fn(inputs, weights, progress):
        return hisd_loss(
            inputs["logits"],
            inputs["labels"],
            weights,
            features=inputs["features"],
            final_features=inputs["final_features"],
            progress=progress,
            mask=inputs["mask"],
            targets=inputs["targets"] if use_targets else None,
        )

    loss, metrics = loss_fn(to_f32(d), weights, progress)
    expected = np_hisd(d, batch, cs, ce_end, progress, kd_w, hier_w, feat_w, t, use_targets)
    assert set(metrics) == set(expected)
    chex.assert_trees_all_close(metrics, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(loss, expected["loss"], rtol=RTOL, atol=ATOL)


def test_single_exit_is_plain_cross_entropy_for_every_preset():
    d = make_batch(4, 1, 6, 5)
    inputs = to_f32(d)
    expected = np_ce(d["logits"][0][:6], d["labels"][:6]).mean()
    for preset in PRESETS:
        loss, metrics = hisd_loss(
            inputs["logits"], inputs["labels"], resolve_weights(preset, 1), mask=inputs["mask"]
        )
        np.testing.assert_allclose(loss, expected, rtol=RTOL, err_msg=preset)
        assert float(metrics["kd"]) == float(metrics["hier"]) == float(metrics["feat"]) == 0.0


def test_feature_term_skipped_when_weight_zero():
    d = to_f32(make_batch(5, 3, 4, 5))
    loss, metrics = hisd_loss(d["logits"], d["labels"], resolve_weights("hisd", 3, feat=0.0))
    assert float(metrics["feat"]) == 0.0
    ce = sum(metrics[f"ce/exit{e}"] for e in range(3))
    np.testing.assert_allclose(loss, ce + 0.5 * metrics["kd"] + 0.5 * metrics["hier"], rtol=RTOL)


# ---------------------------------------------------------------- presets
def assert_weights(w, ce_start, ce_end, kd, hier, feat, t):
    chex.assert_trees_all_close(
        (w.ce_start, w.ce_end), (np.asarray(ce_start), np.asarray(ce_end)), rtol=1e-6
    )
    assert (w.kd, w.hier, w.feat, w.temperature) == pytest.approx((kd, hier, feat, t))


def test_presets_hand_computed():
    assert_weights(resolve_weights("final_only", 4), [0, 0, 0, 1], [0, 0, 0, 1], 0, 0, 0, 3)
    assert_weights(resolve_weights("sdn", 4), [0.01, 0.01, 0.01, 1], [0.3, 0.6, 0.9, 1], 0, 0, 0, 3)
    assert_weights(resolve_weights("byot", 4), [0.9] * 3 + [1], [0.9] * 3 + [1], 0.1, 0, 1e-6, 3)
    mose = [0.25, 0.5, 0.75, 1]
    assert_weights(resolve_weights("mose", 4), mose, mose, 0, 0, 0, 3)
    mose = [4 / 36, 9 / 36, 0.5, 1]
    assert_weights(resolve_weights("mose", 4, depths=(4, 9, 18, 36)), mose, mose, 0, 0, 0, 3)
    assert_weights(resolve_weights("hisd", 3), [1, 1, 1], [1, 1, 1], 0.5, 0.5, 0.1, 3)
    for preset in PRESETS:  # one exit: CE weight 1 (the KD terms are empty sums)
        w = resolve_weights(preset, 1)
        chex.assert_trees_all_close((w.ce_start, w.ce_end), (np.ones(1), np.ones(1)))


def test_sdn_ramp_seven_exits():
    w = resolve_weights("sdn", 7)
    c = np.asarray([0.15, 0.30, 0.45, 0.60, 0.75, 0.90])
    ramp = jax.jit(ce_weights)
    for progress, internal in [
        (0.0, np.full(6, 0.01)),
        (0.5, (0.01 + c) / 2),
        (1.0, c),
        (-0.5, np.full(6, 0.01)),
        (2.0, c),
    ]:
        np.testing.assert_allclose(ramp(w, progress), np.append(internal, 1.0), rtol=1e-6)


def test_overrides_replace_preset_values():
    w = resolve_weights("sdn", 3, kd=0.2, hier=0.3, feat=0.4, temperature=2.0, ce_end=[1, 2, 3])
    assert_weights(w, [0.01, 0.01, 1], [1, 2, 3], 0.2, 0.3, 0.4, 2.0)
    w = resolve_weights("byot", 3, ce=[0.5, 0.25, 1.0])
    assert_weights(w, [0.5, 0.25, 1.0], [0.5, 0.25, 1.0], 0.1, 0, 1e-6, 3)
    assert len(jax.tree.leaves(w)) == 2  # only the CE vectors are traced leaves


# ---------------------------------------------------------------- stop-gradients
def _grads(weights, d, argnames):
    def loss_fn(logits, features, final_features):
        return hisd_loss(
            logits,
            d["labels"],
            weights,
            features=features,
            final_features=final_features,
            mask=d["mask"],
        )[0]

    argnums = tuple(("logits", "features", "final_features").index(a) for a in argnames)
    return jax.jit(jax.grad(loss_fn, argnums=argnums))(
        d["logits"], d["features"], d["final_features"]
    )


def assert_nonzero(tree):
    for leaf in jax.tree.leaves(tree):
        assert np.abs(np.asarray(leaf)).max() > 1e-6


@pytest.mark.parametrize("num_exits", [2, 4])
def test_kd_term_does_not_train_the_final_exit(num_exits):
    d = to_f32(make_batch(6, num_exits, 5, 7))
    w = resolve_weights("hisd", num_exits, ce=[0.0] * num_exits, kd=1.0, hier=0.0, feat=0.0)
    (g,) = _grads(w, d, ["logits"])
    chex.assert_trees_all_equal(g[-1], jnp.zeros_like(g[-1]))
    assert_nonzero(g[:-1])


@pytest.mark.parametrize("num_exits", [2, 4])
def test_hier_term_does_not_train_the_teacher(num_exits):
    d = to_f32(make_batch(7, num_exits, 5, 7))
    t = 2.0
    w = resolve_weights(
        "hisd", num_exits, ce=[0.0] * num_exits, kd=0.0, hier=1.0, feat=0.0, temperature=t
    )
    (g,) = _grads(w, d, ["logits"])
    chex.assert_trees_all_equal(g[-1], jnp.zeros_like(g[-1]))
    assert_nonzero(g[:-1])
    # Each z_{e+1} is also a student of z_{e+2}; its total gradient must equal its student
    # gradient alone, i.e. its role as teacher of z_e contributes nothing.
    for e in range(num_exits - 1):
        teacher = d["logits"][e + 1]  # a constant, not differentiated
        student_only = jax.grad(lambda z: distill.kd_kl(z, teacher, t, d["mask"]))(d["logits"][e])
        chex.assert_trees_all_close(g[e], student_only, rtol=1e-5, atol=1e-7)


def test_feature_term_does_not_train_the_final_features():
    d = to_f32(make_batch(8, 3, 5, 7))
    w = resolve_weights("hisd", 3, ce=[0.0] * 3, kd=0.0, hier=0.0, feat=1.0)
    g_features, g_final = _grads(w, d, ["features", "final_features"])
    chex.assert_trees_all_equal(g_final, jnp.zeros_like(g_final))
    assert_nonzero(g_features)


def test_kd_kl_itself_does_not_stop_gradients():
    d = to_f32(make_batch(9, 2, 4, 5))
    g_teacher = jax.grad(distill.kd_kl, argnums=1)(d["logits"][0], d["logits"][1], 2.0)
    assert_nonzero(g_teacher)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (("foo", 3), {}, "hisd.preset='foo' is not one of final_only, sdn, byot, mose, hisd"),
        (("hisd", 0), {}, r"hisd.num_exits=0 must be an integer >= 1"),
        (
            ("hisd", 3),
            {"lambda_kd": 1.0},
            "hisd.lambda_kd is not a HiSD weight; allowed overrides: ce, ce_start, ce_end, kd, hier, "
            "feat, temperature",
        ),
        (("hisd", 3), {"ce": [1, 1]}, "hisd.ce has 2 values but num_exits=3 needs 3"),
        (("hisd", 3), {"ce_end": [1, 1, 1, 1]}, "hisd.ce_end has 4 values"),
        (("hisd", 3), {"ce": [1, -1, 1]}, r"hisd.ce=.* must contain finite values >= 0"),
        (("hisd", 3), {"ce": [1, 1], "ce_start": [1, 1, 1]}, "either hisd.ce or hisd.ce_start"),
        (("hisd", 3), {"kd": -0.1}, r"hisd.kd=-0.1 must be a finite value >= 0"),
        (("hisd", 3), {"feat": float("nan")}, r"hisd.feat=nan must be a finite value >= 0"),
        (("hisd", 3), {"temperature": 0.0}, r"hisd.temperature=0.0 must be finite and > 0"),
        (("hisd", 3), {"temperature": -1.0}, r"hisd.temperature=-1.0 must be finite and > 0"),
        (("mose", 3), {"depths": (1, 2)}, "hisd.depths has 2 values but num_exits=3"),
    ],
)
def test_resolve_weights_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_weights(*args, **kwargs)


def test_hisd_loss_errors():
    d = to_f32(make_batch(10, 3, 4, 5))
    w = resolve_weights("hisd", 3)
    with pytest.raises(ValueError, match=r"hisd.feat=0.1 != 0 needs features"):
        hisd_loss(d["logits"], d["labels"], w)
    with pytest.raises(ValueError, match="got 1 features but needs 2"):
        hisd_loss(
            d["logits"],
            d["labels"],
            w,
            features=d["features"][:1],
            final_features=d["final_features"],
        )
    with pytest.raises(ValueError, match="got 2 exit logits but weights for 3 exits"):
        hisd_loss(d["logits"][:2], d["labels"], w)
    assert isinstance(w, HiSDWeights)
