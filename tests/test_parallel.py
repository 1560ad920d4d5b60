"""The mesh shape and the FSDP sharding rules, on hand-made shapes (an abstract 2 x 4 mesh:
no devices needed). Training under these shardings is tested in test_multidevice.py and
test_elastic.py."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from hisd_jax import parallel

MESH = AbstractMesh((2, 4), ("data", "fsdp"))


def mesh_cfg(data, fsdp):
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


def test_mesh_shape_infers_one_axis_and_names_the_fields_otherwise():
    assert parallel.mesh_shape(mesh_cfg(-1, 4), 8) == (2, 4)
    assert parallel.mesh_shape(mesh_cfg(8, -1), 8) == (8, 1)
    assert parallel.mesh_shape(None, 8) == (8, 1)
    for data, fsdp in ((3, 4), (-1, 3), (2, 2), (-1, -1)):
        with pytest.raises(ValueError, match="mesh"):
            parallel.mesh_shape(mesh_cfg(data, fsdp), 8)


@pytest.mark.parametrize(
    "shape, min_size, want",
    [
        ((64, 10), 100, P("fsdp", None)),  # the largest axis divisible by 4
        ((10, 64), 100, P(None, "fsdp")),
        ((3, 3, 16, 32), 100, P(None, None, None, "fsdp")),
        ((8, 8), 1, P(None, "fsdp")),  # a tie: the last axis
        ((6, 10), 1, P()),  # no axis divisible by 4
        ((16, 4), 100, P()),  # below min_size
        ((), 1, P()),  # a scalar
    ],
)
def test_fsdp_spec(shape, min_size, want):
    assert parallel.fsdp_spec(shape, 4, min_size) == want


def test_state_shardings_rules_override_the_size_rule_and_optimizer_state_follows():
    s = jax.ShapeDtypeStruct
    tree = {
        "params": {"emb": s((64, 8), np.float32), "bias": s((8,), np.float32),
                   "kernel": s((32, 32), np.float32)},
        "opt_state": {"mu": {"emb": s((64, 8), np.float32), "kernel": s((32, 32), np.float32)}},
        "step": s((), np.int32),
    }  # fmt: skip
    rules = (("emb$", "replicated"), ("bias", "fsdp"))
    got = parallel.state_shardings(MESH, tree, rules, min_size=1000)
    spec = jax.tree.map(lambda x: x.spec, got)
    assert spec["params"]["emb"] == spec["opt_state"]["mu"]["emb"] == P()  # rule: replicated
    assert spec["params"]["bias"] == P("fsdp")  # rule: fsdp, whatever the size
    assert spec["params"]["kernel"] == spec["opt_state"]["mu"]["kernel"] == P(None, "fsdp")
    assert spec["step"] == P()
    assert parallel.shard_bytes(tree["params"], got["params"]) == 4 * (64 * 8 + 2 + 32 * 8)


@pytest.mark.parametrize(
    "rules, words",
    [
        ((("x", "sideways"),), "rule 'sideways' is not one of fsdp, replicated"),
        ((("(", "fsdp"),), "is not a regex"),
        (("x",), "must be a (regex, rule) pair"),
    ],
)
def test_bad_rules_name_the_entry(rules, words):
    with pytest.raises(ValueError, match=r"mesh\.rules\[0\]") as e:
        parallel.check_rules(rules)
    assert words in str(e.value)
