"""Multi-exit models: output structure, cut models, segment/head pieces, cost accounting.

Shapes are checked with `jax.eval_shape` (nothing compiles); numerical checks run
under `jit`, as the trainer runs the model. Expected widths, spatial sizes and
parameter counts are written out by hand from the architecture, not derived from
the code under test.
"""

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hisd_jax.data import TaskInfo
from hisd_jax.inference import cost as cost_lib
from hisd_jax.models import build_model
from hisd_jax.models.exits import adaptive_avg_pool

TASKS = (
    TaskInfo("digit", "classification", 10, "digit"),
    TaskInfo("parity", "classification", 3, "parity"),
    TaskInfo("ink", "regression", 0, "ink"),
)
OUTPUTS = {"digit": 10, "parity": 3, "ink": 1}  # regression tasks predict one number
BATCH = 2


def model_cfg(name, width, stage_sizes=(), stem="cifar", norm="batch", **kw):
    cfg = dict(
        name=name,
        width=width,
        stage_sizes=tuple(stage_sizes),
        strides=(),
        exits=(),
        cut_at=None,
        stem=stem,
        stem_features=0,
        norm=norm,
        head_pool=1,
        head_hidden=(),
        dtype="float32",
    )
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def abstract_init(model, image_shape):
    x = jax.ShapeDtypeStruct((BATCH, *image_shape), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)


def path_shapes(tree):
    """{'a/b/c': shape} for every leaf of a nested dict."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


# --------------------------------------------------------------------------- structure
# (config, image shape, channels after each exit's segment, spatial side after each segment)
STRUCTURE_CASES = {
    # plain CNN, strides 1,2,2: 8x8 -> 8, 4, 2
    "cnn": (model_cfg("cnn", 8, (1, 1, 1)), (8, 8, 1), [8, 16, 32], [8, 4, 2]),
    # ResNet with one basic block per stage
    "resnet-1111": (
        model_cfg("resnet", 4, (1, 1, 1, 1)),
        (16, 16, 3),
        [4, 8, 16, 32],
        [16, 8, 4, 2],
    ),
    # ResNet-18 layout (2,2,2,2), tiny width, ImageNet stem: 32 -(conv s2)-> 16 -(pool)-> 8
    "resnet18-imagenet": (
        model_cfg("resnet18", 2, stem="imagenet", norm="group"),
        (32, 32, 3),
        [2, 4, 8, 16],
        [8, 4, 2, 1],
    ),
    # ResNet-50 bottleneck blocks expand 4x; a custom (1,1,1,1) keeps it small
    "resnet50-bottleneck": (
        model_cfg("resnet50", 2, (1, 1, 1, 1), norm="layer"),
        (8, 8, 3),
        [8, 16, 32, 64],
        [8, 4, 2, 1],
    ),
    "resnet50-default-none": (
        model_cfg("resnet50", 1, norm="none", stem="imagenet"),
        (16, 16, 3),
        [4, 8, 16, 32],
        [4, 2, 1, 1],
    ),
    "cnn-no-stem-pool2": (
        model_cfg("cnn", 4, (2, 1), stem="none", head_pool=2, head_hidden=(5,)),
        (9, 9, 2),
        [4, 8],
        [9, 5],
    ),
}


@pytest.mark.parametrize("case", list(STRUCTURE_CASES))
def test_output_structure(case):
    cfg, image_shape, channels, sides = STRUCTURE_CASES[case]
    model = build_model(cfg, TASKS)
    num_exits = len(channels)
    assert model.num_exits == num_exits
    assert model.exit_names == tuple(f"exit{e}" for e in range(num_exits))

    variables = abstract_init(model, image_shape)
    assert ("batch_stats" in variables) == (cfg.norm == "batch")
    x = jax.ShapeDtypeStruct((BATCH, *image_shape), jnp.float32)
    pool = cfg.head_pool
    widths = [c * pool * pool for c in channels]

    for project in (False, True):
        out = jax.eval_shape(lambda v, x: model.apply(v, x, project=project), variables, x)
        assert set(out) == (
            {"logits", "features", "projected"} if project else {"logits", "features"}
        )
        assert set(out["logits"]) == set(OUTPUTS)
        for name, n in OUTPUTS.items():
            assert [z.shape for z in out["logits"][name]] == [(BATCH, n)] * num_exits
            assert all(z.dtype == jnp.float32 for z in out["logits"][name])
        assert [f.shape for f in out["features"]] == [(BATCH, w) for w in widths]
        if project:  # every non-final exit projects to the final exit's width
            assert [p.shape for p in out["projected"]] == [(BATCH, widths[-1])] * (num_exits - 1)

    # Training mode returns updated BatchNorm statistics (and only then).
    if cfg.norm == "batch":
        out, updates = jax.eval_shape(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
        )
        chex.assert_trees_all_equal_shapes(updates["batch_stats"], variables["batch_stats"])

    # Each segment's output has the expected channels and spatial side.
    h = x
    for i in range(num_exits):
        h = jax.eval_shape(
            lambda v, h, i=i: model.apply(v, i, h, method=model.run_segment), variables, h
        )
        assert h.shape == (BATCH, sides[i], sides[i], channels[i]), (i, h.shape)


def test_projection_params_only_on_non_final_heads():
    cfg, image_shape, channels, _ = STRUCTURE_CASES["resnet-1111"]
    params = abstract_init(build_model(cfg, TASKS), image_shape)["params"]
    for e in range(len(channels)):
        head = params[f"heads_{e}"]
        if e < len(channels) - 1:
            assert head["proj"]["kernel"].shape == (channels[e], channels[-1])
        else:
            assert "proj" not in head
        assert head["out_digit"]["kernel"].shape == (channels[e], 10)
        assert head["out_ink"]["kernel"].shape == (channels[e], 1)


def test_resnet18_full_width_parameter_count():
    """ResNet-18 at width 64 on CIFAR has the well-known ~11.17M backbone parameters."""
    cfg = model_cfg("resnet18", 64)
    tasks = (TaskInfo("y", "classification", 10, "y"),)
    params = abstract_init(build_model(cfg, tasks), (32, 32, 3))["params"]
    # torchvision's CIFAR-style resnet18 (3x3 stem, no max-pool, 10 classes) has
    # 11,173,962 parameters; ours adds exit heads (and projections) at exits 0..2.
    heads_and_proj = sum(
        math.prod(s)
        for p, s in path_shapes(params).items()
        if p.startswith(("heads_0", "heads_1", "heads_2"))
    )
    total = sum(math.prod(s) for s in path_shapes(params).values())
    assert total - heads_and_proj == 11_173_962


# --------------------------------------------------------------------------- numerics
CUT_CASES = {
    "cnn-batchnorm": (model_cfg("cnn", 4, (1, 1, 1)), (8, 8, 1)),
    "resnet-pool2-hidden": (
        model_cfg("resnet", 3, (1, 1, 1, 1), norm="group", head_pool=2, head_hidden=(6,)),
        (9, 9, 2),
    ),
}


def random_variables(model, image_shape, seed=0):
    """Initialised variables with every leaf replaced by noise.

    Zero-initialised norm scales and fresh BatchNorm statistics would make some
    comparisons trivially true; noise makes every parameter matter.
    """
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
    rng = np.random.default_rng(seed)

    def noise(path, x):
        value = 0.5 * rng.normal(size=x.shape)
        if path[-1].key == "var":  # BatchNorm variances must stay positive
            value = np.abs(value) + 0.5
        return jnp.asarray(value, x.dtype)

    return jax.tree_util.tree_map_with_path(noise, abstract)


def images(image_shape, n=5, seed=3):
    return np.random.default_rng(seed).normal(size=(n, *image_shape)).astype(np.float32)


def subset(tree, like):
    """The part of `tree` with the keys of `like` (recursively), dropping 'proj' mismatches."""
    if not isinstance(like, dict):
        return tree
    return {k: subset(tree[k], v) for k, v in like.items() if k in tree}


@pytest.mark.parametrize("case", list(CUT_CASES))
def test_cut_model_params_are_a_subset_and_logits_match(case):
    cfg, image_shape = CUT_CASES[case]
    full = build_model(cfg, TASKS)
    variables = random_variables(full, image_shape)
    x = images(image_shape)
    full_out = jax.jit(full.apply)(variables, x)
    full_shapes = path_shapes(variables)
    num_exits = full.num_exits

    for e in range(num_exits):
        cut = build_model(cfg, TASKS, cut_at=e)
        assert cut.num_exits == e + 1 and cut.exit_names == full.exit_names[: e + 1]
        cut_shapes = path_shapes(abstract_init(cut, image_shape))
        # Projections of the cut model's earlier heads map to *its* final width.
        for path, shape in cut_shapes.items():
            assert path in full_shapes, path
            if "/proj/" not in path:
                assert shape == full_shapes[path], path
        assert not any(p.startswith(f"params/heads_{e}/proj/") for p in cut_shapes)
        # What the full model has beyond the cut: deeper segments and heads, and exit e's proj.
        extra = {p.split("/")[1] for p in full_shapes.keys() - cut_shapes.keys()}
        expected_extra = {f"segments_{i}" for i in range(e + 1, num_exits)}
        expected_extra |= {f"heads_{i}" for i in range(e, num_exits) if i < num_exits - 1 or i > e}
        assert extra == expected_extra

        cut_abstract = abstract_init(cut, image_shape)
        cut_vars = subset(variables, cut_abstract)
        for i in range(e):  # drop the earlier heads' (differently shaped) projections
            cut_vars["params"][f"heads_{i}"].pop("proj", None)
        cut_out = jax.jit(cut.apply)(cut_vars, x)
        for name in OUTPUTS:
            assert len(cut_out["logits"][name]) == e + 1
            chex.assert_trees_all_close(
                cut_out["logits"][name], full_out["logits"][name][: e + 1], rtol=1e-6, atol=1e-6
            )
        chex.assert_trees_all_close(
            cut_out["features"], full_out["features"][: e + 1], rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize("case", list(CUT_CASES))
def test_segments_and_heads_compose_to_call(case):
    cfg, image_shape = CUT_CASES[case]
    model = build_model(cfg, TASKS)
    variables = random_variables(model, image_shape)
    x = images(image_shape)

    @jax.jit
    def pieces(v, x):
        outs = []
        for i in range(model.num_exits):
            x = model.apply(v, i, x, method=model.run_segment)
            outs.append(model.apply(v, i, x, method=model.run_head))
        return outs

    whole = jax.jit(model.apply)(variables, x)
    outs = pieces(variables, x)
    for e, o in enumerate(outs):
        for name in OUTPUTS:
            np.testing.assert_allclose(
                o["logits"][name], whole["logits"][name][e], rtol=1e-6, atol=1e-6
            )
        np.testing.assert_allclose(o["features"], whole["features"][e], rtol=1e-6, atol=1e-6)
        assert "projected" not in o  # run_head never projects


def test_inference_ignores_batch_composition_and_training_uses_batch_stats():
    cfg, image_shape = CUT_CASES["cnn-batchnorm"]
    model = build_model(cfg, TASKS)
    variables = random_variables(model, image_shape)
    x = images(image_shape, n=6)
    apply = jax.jit(model.apply, static_argnames="train")
    alone = apply(variables, x[:1])["logits"]["digit"]
    together = apply(variables, x)["logits"]["digit"]
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
    # In training mode BatchNorm uses batch statistics, so the first row depends on the rest.
    train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
    t_alone = train_apply(variables, x[:2])["logits"]["digit"][-1]
    t_together = train_apply(variables, x)["logits"]["digit"][-1]
    assert not np.allclose(t_alone[0], t_together[0], atol=1e-4)


# --------------------------------------------------------------------------- cost accounting
COST_CFG = model_cfg("cnn", 8, (1, 1, 1))
COST_TASKS = (TaskInfo("label", "classification", 10, "label"),)
COST_IMAGE = (8, 8, 1)
# Hand count for the tiny CNN (1 input channel, widths 8/16/32, no conv bias, BatchNorm
# scale+bias, Dense heads with bias, 10 classes):
#   segment0 = stem conv 3*3*1*8 + BN 16 + conv 3*3*8*8 + BN 16 = 680; head0 = 8*10+10 = 90
#   segment1 = conv 3*3*8*16 + BN 32 = 1184;                       head1 = 16*10+10 = 170
#   segment2 = conv 3*3*16*32 + BN 64 = 4672;                      head2 = 32*10+10 = 330
TINY_CNN_PARAMS = [680 + 90, 680 + 1184 + 170, 680 + 1184 + 4672 + 330]


@pytest.fixture(scope="module")
def cost_setup():
    model = build_model(COST_CFG, COST_TASKS)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *COST_IMAGE)))
    pieces = cost_lib.piece_flops(model, variables, COST_IMAGE)
    return model, variables, pieces


def xla_flops(fn, *args):
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis["flops"])


def test_standalone_cost_matches_xla_cost_of_the_cut_model(cost_setup):
    model, variables, pieces = cost_setup
    costs = cost_lib.exit_costs(pieces)
    standalone = np.asarray(costs["standalone"])
    assert len(standalone) == model.num_exits
    assert np.all(np.diff(standalone) > 0)
    assert costs["fraction"][-1] == 1.0 and np.all(np.diff(costs["fraction"]) > 0)
    np.testing.assert_allclose(costs["fraction"], standalone / standalone[-1])
    cascade = np.asarray(costs["cascade"])
    assert cascade[0] == standalone[0] and np.all(cascade[1:] > standalone[1:])

    x = jax.ShapeDtypeStruct((1, *COST_IMAGE), jnp.float32)
    for e in range(model.num_exits):
        cut = build_model(COST_CFG, COST_TASKS, cut_at=e)
        cut_vars = subset(variables, abstract_init(cut, COST_IMAGE))
        for i in range(e):
            cut_vars["params"][f"heads_{i}"].pop("proj", None)
        # Only the deepest exit's logits are returned: XLA drops the earlier heads.
        flops = xla_flops(lambda v, x, cut=cut: cut.apply(v, x)["logits"]["label"][-1], cut_vars, x)
        assert flops > 0
        np.testing.assert_allclose(standalone[e], flops, rtol=0.01, err_msg=f"exit {e}")


def test_exit_param_counts_hand_count_and_cut_model(cost_setup):
    model, variables, _ = cost_setup
    counts = cost_lib.exit_param_counts(
        variables["params"], model.param_labels(variables["params"])
    )
    assert counts == TINY_CNN_PARAMS
    for e in range(model.num_exits):  # the cut model without its earlier heads and projections
        shapes = path_shapes(abstract_init(build_model(COST_CFG, COST_TASKS, cut_at=e), COST_IMAGE))
        needed = [
            s
            for p, s in shapes.items()
            if p.startswith("params/")
            and (p.startswith("params/segments_") or p.startswith(f"params/heads_{e}/"))
        ]
        assert sum(math.prod(s) for s in needed) == counts[e]


def test_exit_param_counts_are_the_parameters_exit_logits_depend_on():
    """A parameter leaf is needed by exit e iff exit e's logits have a gradient w.r.t. it."""
    cfg, image_shape = CUT_CASES["resnet-pool2-hidden"]  # (the CNN is counted by hand above)
    model = build_model(cfg, TASKS)
    variables = random_variables(model, image_shape)
    x = images(image_shape)
    counts = cost_lib.exit_param_counts(
        variables["params"], model.param_labels(variables["params"])
    )

    def exit_output(params, e):
        out = model.apply({**variables, "params": params}, x)
        z = jnp.concatenate([out["logits"][name][e] for name in OUTPUTS], axis=-1)
        return jnp.sum(z * jnp.sin(jnp.arange(z.size).reshape(z.shape) + 1.0))

    all_grads = jax.jit(lambda p: [jax.grad(exit_output)(p, e) for e in range(model.num_exits)])(
        variables["params"]
    )
    for e, grads in enumerate(all_grads):
        used = sum(g.size for g in jax.tree.leaves(grads) if np.any(np.asarray(g) != 0))
        assert used == counts[e], (e, used, counts[e])


# --------------------------------------------------------------------------- pooling
def np_adaptive_pool(x, size):
    """PyTorch's adaptive average pooling in float64: bin i spans [floor(iH/s), ceil((i+1)H/s))."""
    x = np.asarray(x, np.float64)
    _, h, w, _ = x.shape
    out = np.zeros((x.shape[0], size, size, x.shape[-1]))
    for i in range(size):
        r0, r1 = math.floor(i * h / size), math.ceil((i + 1) * h / size)
        for j in range(size):
            c0, c1 = math.floor(j * w / size), math.ceil((j + 1) * w / size)
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("hw", [(7, 5), (5, 9), (3, 3), (1, 1)])
def test_adaptive_avg_pool_matches_numpy(size, hw):
    x = np.random.default_rng(size).normal(size=(2, *hw, 3)).astype(np.float32)
    got = jax.jit(adaptive_avg_pool, static_argnums=1)(x, size)
    assert got.shape == (2, size, size, 3)
    np.testing.assert_allclose(got, np_adaptive_pool(x, size), rtol=1e-5, atol=1e-6)


def test_adaptive_avg_pool_hand_case():
    x = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)
    # size 2 on 3x3: overlapping bins rows/cols {0,1} and {1,2}
    np.testing.assert_allclose(adaptive_avg_pool(x, 2)[0, :, :, 0], [[2.0, 3.0], [5.0, 6.0]])
    np.testing.assert_allclose(adaptive_avg_pool(x, 1)[0, 0, 0, 0], 4.0)
    np.testing.assert_allclose(adaptive_avg_pool(x, 3), x)  # own size: identity


@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_remat_keeps_parameters_outputs_and_gradients(name):
    """model.remat recomputes each block's activations in the backward pass: the same parameter
    tree, the same outputs and the same gradients (float tolerance)."""
    from hisd_jax.data import Dataset  # noqa: PLC0415

    if name == "resnet":
        cfg = dict(name="resnet", width=4, stage_sizes=(1, 1))
        x = jax.random.normal(jax.random.key(1), (BATCH, 8, 8, 3))
        dataset = None
    else:
        cfg = dict(name="transformer", width=8, stage_sizes=(1, 1), num_heads=2, mlp_ratio=2,
                   pool="mean", embed_dim=0)  # fmt: skip
        x = jnp.array([[2, 5, 6, 0], [2, 3, 0, 0]])
        dataset = Dataset("t", {}, (4,), {}, "tokens", "int32", 10)
    tasks = TASKS[:1]
    models = {r: build_model(model_cfg(**cfg, remat=r), tasks, dataset=dataset)
              for r in (False, True)}  # fmt: skip
    variables = models[False].init(jax.random.key(0), x)
    chex.assert_trees_all_equal_shapes(variables, models[True].init(jax.random.key(0), x))

    def loss(params, model):
        out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=True)
        return sum(jnp.sum(z**2) for z in out["logits"]["digit"])

    # jitted: one compile each (eager op-by-op tracing of the remat'd backward is slow)
    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    values, grads = {}, {}
    for r, m in models.items():
        values[r], grads[r] = value_and_grad(variables["params"], m)
    chex.assert_trees_all_close(values[True], values[False], rtol=1e-6)
    chex.assert_trees_all_close(grads[True], grads[False], rtol=1e-5, atol=1e-6)
