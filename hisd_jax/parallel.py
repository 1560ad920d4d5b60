"""Devices, mesh and shardings: SPMD with jit over a (`data`, `fsdp`) mesh.

The mesh's shape comes from the config (`mesh.data`, `mesh.fsdp`, one of them -1: inferred
from the device count). Batches are sharded over both axes (each device holds
global_batch / devices rows). The train state is sharded by `state_shardings`: a leaf is split
along `fsdp` (fully sharded data parallel: ZeRO-3 style, XLA gathers a parameter where a step
needs it) on its largest axis divisible by the `fsdp` size, when it has at least
`mesh.min_shard_size` elements; smaller leaves and scalars are replicated; `mesh.rules`
((regex, "fsdp" | "replicated"), first match wins, searched in the leaf's path such as
"params/segments_0/block0/conv1/kernel" or "opt_state/0/mu/model/segments_0/...") override
that. Optimizer state, KD's soft labels and best parameters follow from the same rule, so a
parameter's Adam moments are sharded as it is. With `mesh.fsdp = 1` everything is replicated
(plain data parallelism), the default.

Each process reads only its rows of every global batch and the global array is assembled with
`jax.make_array_from_process_local_data`, so the same code runs on one CPU, 8 fake CPU
devices, a GPU box or a TPU pod slice. (The style of big_vision's `sharding.py` and MaxText's
logical-axis rules; JAX's SPMD partitioner does the rest: no hand-written collectives.)
"""

import math
import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH = ("data", "fsdp")  # the batch dimension is split over both
SHARDING_RULES = ("fsdp", "replicated")


def maybe_initialize_distributed() -> None:
    """Starts jax.distributed when launched as one of several processes.

    Triggered by HISD_DISTRIBUTED=1 (set by the launch scripts), or by the explicit
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables. On Cloud
    TPU pods `jax.distributed.initialize()` finds its peers by itself.
    """
    if os.environ.get("HISD_DISTRIBUTED") != "1" and "JAX_COORDINATOR_ADDRESS" not in os.environ:
        return
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)


def mesh_shape(mesh_cfg=None, num_devices: int | None = None) -> tuple[int, int]:
    """(data, fsdp) sizes from the config's `mesh` section (None: all devices on `data`); one
    size may be -1 (the device count divided by the other). ValueError naming the fields when
    the product is not the device count."""
    n = jax.device_count() if num_devices is None else num_devices
    data, fsdp = (-1, 1) if mesh_cfg is None else (mesh_cfg.data, mesh_cfg.fsdp)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp are both -1: give one of them")
    if data == -1:
        data = n // fsdp if n % fsdp == 0 else 0
    elif fsdp == -1:
        fsdp = n // data if n % data == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(
            f"mesh.data={mesh_cfg.data if mesh_cfg else -1} x mesh.fsdp="
            f"{mesh_cfg.fsdp if mesh_cfg else 1} must multiply to the device count, {n}"
        )
    return data, fsdp


def make_mesh(mesh_cfg=None) -> Mesh:
    """The (`data`, `fsdp`) mesh over every device (`mesh_shape`); devices in `jax.devices()`
    order, so each process's devices are one contiguous block of the batch."""
    return Mesh(np.asarray(jax.devices()).reshape(mesh_shape(mesh_cfg)), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH))


def path_name(path) -> str:
    """A pytree key path as "a/b/0/c" (dict keys, attribute names, sequence indices)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def fsdp_spec(shape, fsdp: int, min_size: int) -> P:
    """P() for a leaf too small (fewer than `min_size` elements), a scalar or one with no axis
    divisible by `fsdp`; else `fsdp` on its largest divisible axis (the last such on ties)."""
    if fsdp == 1 or not shape or math.prod(shape) < min_size:
        return P()
    axes = [i for i, n in enumerate(shape) if n % fsdp == 0]
    if not axes:
        return P()
    axis = max(axes, key=lambda i: (shape[i], i))
    return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def check_rules(rules) -> list[tuple[str, str]]:
    """`mesh.rules` as (compiled regex, rule) pairs; ValueError naming the bad entry."""
    out = []
    for i, entry in enumerate(rules or ()):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ValueError(f"mesh.rules[{i}]={entry!r} must be a (regex, rule) pair")
        pattern, rule = entry
        if rule not in SHARDING_RULES:
            raise ValueError(
                f"mesh.rules[{i}]: rule {rule!r} is not one of {', '.join(SHARDING_RULES)}"
            )
        try:
            out.append((re.compile(pattern), rule))
        except (re.error, TypeError) as e:
            raise ValueError(f"mesh.rules[{i}]: {pattern!r} is not a regex ({e})") from None
    return out


def state_shardings(mesh: Mesh, tree, rules=(), min_size: int = 2**14):
    """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs): the first of `rules`
    whose regex is found in the leaf's `path_name` decides ("replicated", or "fsdp" on the
    largest divisible axis whatever its size), else `fsdp_spec` with `min_size`. See the module
    docstring."""
    compiled = check_rules(rules)
    fsdp = mesh.shape["fsdp"]

    def one(path, leaf):
        name = path_name(path)
        rule = next((r for regex, r in compiled if regex.search(name)), None)
        if rule == "replicated":
            return NamedSharding(mesh, P())
        # a rule naming fsdp shards whatever the size; the default only from min_size up
        size = 1 if rule == "fsdp" else min_size
        return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp, size))

    return jax.tree_util.tree_map_with_path(one, tree)


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` placed with `shardings` (per-leaf shard shapes)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        shape = sharding.shard_shape(tuple(leaf.shape))
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """Assembles this process's rows of a batch into global arrays sharded on `data`."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }
