"""Devices, mesh and shardings: SPMD with jit over a 1-D `data` mesh axis.

Parameters and optimizer state are replicated; batches are sharded along `data`.
Each process reads only its shard of every global batch and the global array is
assembled with `jax.make_array_from_process_local_data`, so the same code runs on
one CPU, 8 fake CPU devices, a GPU box or a TPU pod slice.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


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


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """Assembles this process's rows of a batch into global arrays sharded on `data`."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }
