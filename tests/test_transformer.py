"""The multi-exit Transformer encoder, the retrieval losses and metric, and the code-search
corpus, against float64 numpy references and hand-computed cases."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hisd_jax.data import pycode
from hisd_jax.models.transformer import TransformerExitNet
from hisd_jax.objectives import retrieval


def tiny(**kw):
    args = dict(vocab_size=40, max_len=12, width=16, num_heads=2, mlp_dim=24, exit_after=(1, 3),
                tasks=(("pkg", 3), ("search", 0)), retrieval_tasks=("search",),
                embed_dim=8)  # fmt: skip
    return TransformerExitNet(**{**args, **kw})


TOKENS = np.array([[2, 5, 6, 7, 9, 0, 0, 0], [2, 11, 3, 0, 0, 0, 0, 0], [2, 4, 4, 4, 4, 4, 4, 8]])


@pytest.fixture(scope="module")
def model_and_vars():
    model = tiny()
    variables = model.init(jax.random.key(0), jnp.asarray(TOKENS))
    # Non-trivial LayerNorm parameters, so the reference must apply them right.
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return model, jax.tree.unflatten(tree, leaves)


# --------------------------------------------------------------------------- numpy reference
def np_layer_norm(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):  # flax's nn.gelu: the tanh approximation
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_layer(h, mask, p, num_heads):
    f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)  # noqa: E731
    p = f64(p)
    x = np_layer_norm(h, p["ln_attn"])
    qkv = np.einsum("blw,wtnh->bltnh", x, p["qkv"]["kernel"]) + p["qkv"]["bias"]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum("blnh,bsnh->bnls", q, k) / math.sqrt(q.shape[-1])
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    attn = np.einsum("bnls,bsnh->blnh", w, v)
    h = h + np.einsum("blnh,nhw->blw", attn, p["out"]["kernel"]) + p["out"]["bias"]
    x = np_layer_norm(h, p["ln_mlp"])
    x = np_gelu(x @ p["mlp_in"]["kernel"] + p["mlp_in"]["bias"])
    return h + x @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"]


def np_forward(params, tokens, exit_after, num_heads):
    """Every exit's (pooled features, retrieval embedding) in float64."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    seg0 = p["segments_0"]
    mask = tokens != 0
    h = seg0["tokens"]["embedding"][tokens] + seg0["positions"]["embedding"][: tokens.shape[1]]
    outs, start = [], 0
    for e, end in enumerate(exit_after):
        seg = p[f"segments_{e}"]
        for i in range(end - start):
            h = np_layer(h, mask, seg[f"layer{i}"], num_heads)
        start = end
        head = p[f"heads_{e}"]
        x = np_layer_norm(h, head["ln"])
        m = mask[..., None].astype(np.float64)
        pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1)
        emb = pooled @ head["out_search"]["kernel"] + head["out_search"]["bias"]
        emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-6)
        outs.append((pooled, emb))
    return outs


def test_each_exit_embedding_equals_a_float64_numpy_reference(model_and_vars):
    model, variables = model_and_vars
    out = jax.jit(model.apply)(variables, jnp.asarray(TOKENS))
    want = np_forward(variables["params"], TOKENS, model.exit_after, model.num_heads)
    for e, (pooled, emb) in enumerate(want):
        np.testing.assert_allclose(out["features"][e], pooled, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(out["logits"]["search"][e], emb, rtol=2e-5, atol=2e-5)
        norms = np.linalg.norm(out["logits"]["search"][e], axis=-1)
        np.testing.assert_allclose(norms, 1.0, rtol=1e-6)


def test_attention_and_pooling_ignore_padding(model_and_vars):
    """Real tokens followed by padding give the outputs of the same tokens without it; and
    after segment 0, changing the hidden states at padded positions changes nothing."""
    model, variables = model_and_vars
    full = model.apply(variables, jnp.asarray(TOKENS[:1]))
    short = model.apply(variables, jnp.asarray(TOKENS[:1, :5]))
    for e in range(model.num_exits):
        np.testing.assert_allclose(
            full["logits"]["search"][e], short["logits"]["search"][e], atol=1e-6
        )

    cls = type(model)
    x = model.apply(variables, 0, jnp.asarray(TOKENS), method=cls.run_segment)
    noise = jax.random.normal(jax.random.key(3), x["h"].shape) * 100
    dirty = {"h": jnp.where(x["mask"][..., None], x["h"], noise), "mask": x["mask"]}
    a = model.apply(variables, 1, model.apply(variables, 1, x, method=cls.run_segment),
                    method=cls.run_head)  # fmt: skip
    b = model.apply(variables, 1, model.apply(variables, 1, dirty, method=cls.run_segment),
                    method=cls.run_head)  # fmt: skip
    np.testing.assert_allclose(a["logits"]["search"], b["logits"]["search"], atol=1e-6)
    np.testing.assert_allclose(a["logits"]["pkg"], b["logits"]["pkg"], atol=1e-5)


def test_segments_and_heads_compose_to_the_full_model_and_cut_at_keeps_a_prefix(model_and_vars):
    model, variables = model_and_vars
    cls = type(model)
    full = model.apply(variables, jnp.asarray(TOKENS))
    x = jnp.asarray(TOKENS)
    for e in range(model.num_exits):
        x = model.apply(variables, e, x, method=cls.run_segment)
        head = model.apply(variables, e, x, method=cls.run_head)
        np.testing.assert_allclose(head["logits"]["search"], full["logits"]["search"][e], atol=1e-6)
    cut = tiny(cut_at=0)
    params0 = {k: v for k, v in variables["params"].items() if k.endswith("_0")}
    out = cut.apply({"params": params0}, jnp.asarray(TOKENS))
    np.testing.assert_allclose(out["logits"]["search"][0], full["logits"]["search"][0], atol=1e-6)
    labels = jax.tree.leaves(model.param_labels(variables["params"]))
    assert len(labels) == len(jax.tree.leaves(variables["params"]))
    assert {"trunk:0", "trunk:1", "exit:0", "task:1:pkg", "task:0:search", "proj:0"} <= set(labels)


def test_pairs_encode_each_side_alone_and_classify_the_document(model_and_vars):
    """Input [B, 2, L] (query, document): each side's embedding is the one it gets alone, and
    the classifier and features read the document (row 1)."""
    model, variables = model_and_vars
    queries, docs = jnp.asarray(TOKENS), jnp.asarray(TOKENS[::-1])
    pairs = model.apply(variables, jnp.stack([queries, docs], axis=1))
    alone = {side: model.apply(variables, x) for side, x in (("q", queries), ("d", docs))}
    for e in range(model.num_exits):
        got = pairs["logits"]["search"][e]
        assert got.shape == (3, 2, 8)
        np.testing.assert_allclose(got[:, 0], alone["q"]["logits"]["search"][e], atol=1e-6)
        np.testing.assert_allclose(got[:, 1], alone["d"]["logits"]["search"][e], atol=1e-6)
        np.testing.assert_allclose(pairs["logits"]["pkg"][e], alone["d"]["logits"]["pkg"][e],
                                   atol=1e-6)  # fmt: skip
        np.testing.assert_allclose(pairs["features"][e], alone["d"]["features"][e], atol=1e-6)


# --------------------------------------------------------------------------- losses
def np_log_softmax(x):
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_info_nce(q, d, tau, mask):
    keep = mask > 0
    q, d = q[keep], d[keep]
    s = q @ d.T / tau
    idx = np.arange(len(q))
    return float(-(np_log_softmax(s)[idx, idx] + np_log_softmax(s.T)[idx, idx]).mean() / 2)


def np_similarity_kd(q, d, tq, td, tau, kd_t, mask):
    keep = mask > 0
    s, t = (a[keep] @ b[keep].T / tau for a, b in ((q, d), (tq, td)))

    def kl(student, teacher):
        lp, lq = np_log_softmax(teacher / kd_t), np_log_softmax(student / kd_t)
        return (np.exp(lp) * (lp - lq)).sum(-1).mean() * kd_t**2

    return float((kl(s, t) + kl(s.T, t.T)) / 2)


@pytest.mark.parametrize("mask", [None, np.array([1, 1, 0, 1, 1, 0], np.float32)])
def test_info_nce_and_similarity_kd_equal_float64_references(mask):
    rng = np.random.default_rng(0)
    q, d, tq, td = (unit_rows(rng, 6, 5) for _ in range(4))
    m = np.ones(6, np.float32) if mask is None else mask
    jm = None if mask is None else jnp.asarray(mask)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    got = retrieval.info_nce(f32(q), f32(d), 0.07, jm)
    assert float(got) == pytest.approx(np_info_nce(q, d, 0.07, m), rel=1e-5)
    got = retrieval.similarity_kd(f32(q), f32(d), f32(tq), f32(td), 0.1, 2.0, jm)
    assert float(got) == pytest.approx(np_similarity_kd(q, d, tq, td, 0.1, 2.0, m), rel=1e-5)
    # Gradients are finite with padding, and padding rows get none.
    g = jax.grad(lambda a: retrieval.info_nce(a, f32(d), 0.07, jm))(f32(q))
    assert np.isfinite(np.asarray(g)).all()
    if mask is not None:
        assert not np.asarray(g)[mask == 0].any()


def test_info_nce_of_perfect_and_of_uniform_similarities():
    eye = jnp.eye(4)
    # Orthogonal unit pairs: S = I / tau; loss = -log(e^{1/t} / (e^{1/t} + 3)) in closed form.
    t = 0.5
    want = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 3))
    assert float(retrieval.info_nce(eye, eye, t)) == pytest.approx(want, rel=1e-6)
    same = jnp.ones((4, 3)) / math.sqrt(3)  # every pair alike: log(4)
    assert float(retrieval.info_nce(same, same, 0.1)) == pytest.approx(math.log(4), rel=1e-6)


def np_retrieval_loss(embs, ce, kd, hier, feat, tau, kd_t, mask):
    """The HiSD retrieval loss in float64 (objectives/retrieval.py's docstring)."""
    q = [x[:, 0] for x in embs]
    d = [x[:, 1] for x in embs]
    last = len(embs) - 1
    loss = sum(w * np_info_nce(q[e], d[e], tau, mask) for e, w in enumerate(ce))
    for e in range(last):
        loss += kd * np_similarity_kd(q[e], d[e], q[last], d[last], tau, kd_t, mask)
        loss += hier * np_similarity_kd(q[e], d[e], q[e + 1], d[e + 1], tau, kd_t, mask)
        per_row = (((q[e] - q[last]) ** 2).sum(-1) + ((d[e] - d[last]) ** 2).sum(-1)) / 2
        loss += feat * per_row[mask > 0].mean()
    return loss


def pair_embeddings(seed, exits=3, n=6, dim=5):
    rng = np.random.default_rng(seed)
    return [np.stack([unit_rows(rng, n, dim), unit_rows(rng, n, dim)], axis=1)
            for _ in range(exits)]  # fmt: skip


def test_retrieval_loss_equals_a_float64_reference():
    from hisd_jax.objectives import hisd  # noqa: PLC0415

    embs = pair_embeddings(0)
    mask = np.array([1, 1, 0, 1, 1, 1], np.float32)
    w = hisd.resolve_weights("hisd", 3, ce=(0.5, 1.0, 2.0), kd=0.3, hier=0.7, feat=0.2,
                             temperature=2.0)  # fmt: skip
    loss, terms = retrieval.retrieval_loss(
        [jnp.asarray(x, jnp.float32) for x in embs], w, similarity_temperature=0.1,
        mask=jnp.asarray(mask),
    )  # fmt: skip
    want = np_retrieval_loss(embs, (0.5, 1.0, 2.0), 0.3, 0.7, 0.2, 0.1, 2.0, mask)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(terms["nce/exit1"]) == pytest.approx(np_info_nce(embs[1][:, 0], embs[1][:, 1],
                                                                  0.1, mask), rel=1e-5)  # fmt: skip


def test_retrieval_teachers_get_no_gradient():
    """The final exit is only a teacher of the KD, hierarchical KD and alignment terms: with its
    own InfoNCE weight at 0 its embeddings get exactly zero gradient; and exit 1, the
    hierarchical teacher of exit 0, gets only the gradient of its own student term."""
    import chex  # noqa: PLC0415

    from hisd_jax.objectives import hisd  # noqa: PLC0415

    embs = [jnp.asarray(x, jnp.float32) for x in pair_embeddings(1)]
    w = hisd.resolve_weights("hisd", 3, ce=(1.0, 1.0, 0.0), kd=0.5, hier=0.5, feat=0.3)

    def total(xs):
        return retrieval.retrieval_loss(xs, w, similarity_temperature=0.1)[0]

    grads = jax.grad(total)(embs)
    chex.assert_trees_all_close(grads[2], jnp.zeros_like(grads[2]))
    assert float(jnp.abs(grads[0]).sum()) > 0 and float(jnp.abs(grads[1]).sum()) > 0

    hier_only = hisd.resolve_weights("hisd", 3, ce=(0.0, 0.0, 0.0), kd=0.0, hier=1.0, feat=0.0)
    g = jax.grad(lambda xs: retrieval.retrieval_loss(xs, hier_only,
                                                     similarity_temperature=0.1)[0])(embs)  # fmt: skip

    def own(x1):  # exit 1 as a student of exit 2, and nothing else
        sg = jax.lax.stop_gradient
        return retrieval.similarity_kd(x1[:, 0], x1[:, 1], sg(embs[2][:, 0]), sg(embs[2][:, 1]),
                                       0.1, hier_only.temperature)  # fmt: skip

    chex.assert_trees_all_close(g[1], jax.grad(own)(embs[1]), atol=1e-6)
    chex.assert_trees_all_close(g[2], jnp.zeros_like(g[2]))


def test_cross_exit_mrr_and_split_metrics():
    """The diagonal is each exit's own MRR; the entries share the distractors; a split smaller
    than 1000 pairs ranks each query among all the other documents."""
    from hisd_jax import kinds  # noqa: PLC0415

    embs = np.stack(pair_embeddings(2, exits=2, n=40, dim=3), axis=1)  # [N, E, 2, D]
    table = retrieval.cross_exit_mrr(embs, num_candidates=40)
    for e in range(2):
        assert table[e, e] == pytest.approx(retrieval.mrr(embs[:, e, 0], embs[:, e, 1], 40))
    # queries of exit 0 against documents of exit 1, by the definition (all 39 others)
    q, d = embs[:, 0, 0], embs[:, 1, 1]
    s = q @ d.T
    ranks = 1 + (s >= np.diag(s)[:, None]).sum(1) - 1  # minus the pair itself
    assert table[0, 1] == pytest.approx(np.mean(1 / ranks))
    got = kinds.retrieval_split_metrics(embs, ["exit0", "exit3"])
    assert got["exit3"]["candidates"] == 40
    assert got["exit0"]["mrr_docs_exit3"] == pytest.approx(table[0, 1])
    assert got["exit3"]["mrr"] == pytest.approx(table[1, 1])


def test_mrr_by_hand():
    """Three pairs on a line, every other document a distractor (num_candidates = N = 3)."""
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    d = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # query 0: own 1.0; distractors d1 = 1.0 (tie, counts against), d2 = 0: rank 2.
    # query 1: own 0.0; d0 = 0, d2 = 1: rank 3.  query 2: own 0.0; d0 = 1, d1 = 1: rank 3.
    assert retrieval.mrr(q, d, num_candidates=3) == pytest.approx((1 / 2 + 1 / 3 + 1 / 3) / 3)
    with pytest.raises(ValueError, match="num_candidates=1000"):
        retrieval.mrr(q, d)


# --------------------------------------------------------------------------- corpus
SOURCE = '''
def add(a, b):
    """Add two numbers and return the sum."""
    total = a + b
    return total


def stub():
    """Do nothing at all here."""
    pass


def short(x):
    """Too short a function body."""
    return x


class K:
    def log(self, msg):
        """Write the message to the log file.

        More text that is not in the summary.
        """
        with open("log") as f:
            f.write(msg)
'''


def test_pairs_of_source_strip_docstrings_drop_trivial_and_label_returns():
    pairs = pycode.pairs_of_source(SOURCE, "pkg.mod", "stdlib")
    assert [p["name"] for p in pairs] == ["add", "log"]
    add, log = pairs
    assert add["query"] == "Add two numbers and return the sum."
    assert add["code"] == "def add(a, b):\n    total = a + b\n    return total"
    assert add["returns"] and not log["returns"]
    assert log["query"] == "Write the message to the log file."
    assert '"""' not in log["code"] and "More text" not in log["code"]


def test_corpus_split_is_by_module_and_the_manifest_names_it():
    splits, manifest = pycode.build_corpus()
    modules = {s: {p["module"] for p in pairs} for s, pairs in splits.items()}
    assert not modules["train"] & modules["val"]
    assert not modules["train"] & modules["test"]
    assert not modules["val"] & modules["test"]
    for split, pairs in splits.items():
        assert all(pycode.split_of_module(p["module"]) == split for p in pairs)
    assert manifest["pairs"] == {s: len(p) for s, p in splits.items()}
    assert manifest["pairs"]["test"] >= 1000  # the CodeSearchNet protocol's 1000 candidates
    codes = [p["code"] for ps in splits.values() for p in ps]
    assert len(codes) == len(set(codes))
    assert set(manifest["packages"]) == set(pycode.PACKAGES) and manifest["python"]
    assert len(manifest["digest"]) == 64 and len(manifest["files"]) > 500


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def pycode_data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pycode"))


def test_pycode_dataset_tokens_labels_and_subsample(pycode_data_dir):
    from hisd_jax import data as data_lib  # noqa: PLC0415

    kw = dict(data_dir=pycode_data_dir, max_len=24, vocab_size=512, num_train=300)
    ds = data_lib.get_dataset("pycode", seed=3, **kw)
    assert ds.input_key == "tokens" and ds.input_dtype == "int32" and ds.image_shape == (24,)
    assert ds.vocab_size == 512 and ds.metadata["manifest"]["pairs"]["test"] >= 1000
    train = ds.splits["train"].get_batch(np.arange(300))
    assert train["tokens"].shape == (300, 24) and train["tokens"].dtype == np.int32
    assert (train["tokens"][:, 0] == pycode.CLS_ID).all() and train["tokens"].max() < 512
    splits, _ = pycode.build_corpus()
    for row, index in enumerate(train["index"][:20]):  # labels are the corpus's own
        pair = splits["train"][index]
        assert train["package"][row] == pycode.PACKAGE_CLASSES.index(pair["package"])
        assert train["returns"][row] == int(pair["returns"])
    again = data_lib.get_dataset("pycode", seed=3, **kw).splits["train"].get_batch(np.arange(300))
    np.testing.assert_array_equal(again["index"], train["index"])
    other = data_lib.get_dataset("pycode", seed=4, **kw).splits["train"].get_batch(np.arange(300))
    assert not np.array_equal(other["index"], train["index"])
    assert len(ds.splits["test"]) == len(splits["test"])


def test_a_tiny_encoder_learns_code_search_and_a_code_task_and_early_exit_runs(
    pycode_data_dir, tmp_path
):
    """configs/mose_pycode.py through the whole trainer on (query, code) pairs, tasks search
    (HiSD over InfoNCE) and package (HiSD over CE), then the early-exit cascade on package: it
    agrees with the mask-based policy and keeps to the budget."""
    from conftest import override  # noqa: PLC0415

    from hisd_jax import evaluate, export, train  # noqa: PLC0415
    from hisd_jax.config import config_from_file  # noqa: PLC0415

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "mose_pycode.py")
    config = config_from_file(path, "steps=200,max_len=32,num_train=3000,tasks=search+package")
    config.unlock()
    config.data.kwargs.update(data_dir=pycode_data_dir, vocab_size=512)
    override(config, model__width=32, model__embed_dim=32, model__stage_sizes=(1, 1),
             optimizer__lr=0.01, objective__similarity_temperature=0.1, train__eval_every=0,
             train__checkpoint_every=200, train__progress=False)  # fmt: skip
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    # search: chance is H_1000 / 1000 = 0.0075 with 1000 candidates, and one standard error of
    # a chance MRR over the 1224 validation queries is ~0.0011; 0.050-0.053 measured.
    mrr = [results["val"]["search"][e]["mrr"] for e in ("exit0", "exit1")]
    assert min(mrr) > 0.03, mrr
    assert results["val"]["search"]["exit0"]["candidates"] == 1000
    # package: the majority class is 0.31 of the test split (1285 rows: one standard error of
    # an accuracy is ~0.013)
    accs = [results["test"]["package"][e]["accuracy"] for e in ("exit0", "exit1")]
    assert min(accs) > 0.37, accs
    assert [results["exits"][e]["depth"] for e in ("exit0", "exit1")] == [1, 2]
    report = evaluate.early_exit_report(
        str(tmp_path / "run"), task="package", budget=0.75, batch_size=128, min_bucket=64,
        speed_repeats=1, plot=False,
    )  # fmt: skip
    assert report["speed"]["agreement_exits"] == 1.0 and report["speed"]["agreement_preds"] == 1.0
    assert report["test"]["avg_flops_fraction"] <= 0.75 + 0.05
    # The standalone model cut at each exit searches as the trained one did (test MRR).
    exported = export.exit_report(str(tmp_path / "run"), batch_size=64)
    assert exported["metric"] == "mrr"
    for row in exported["exits"]:
        want = results["test"]["search"][row["exit"]]["mrr"]
        assert row["test_mrr"] == pytest.approx(want, abs=1e-6), row
