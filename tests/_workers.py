"""Subprocess drivers for the resume, multi-device and multi-host tests.

Run as `python tests/_workers.py COMMAND ...` in a fresh process (so XLA_FLAGS and the
jax.distributed variables take effect before JAX starts):

  train WORKDIR ARG            train_and_evaluate(get_config(ARG), WORKDIR), then dump the
                               final state to WORKDIR/final_state.npz
  dump WORKDIR ARG OUT         restore the latest checkpoint of WORKDIR into OUT (.npz)
  spmd ARG STEPS DEVICES OUT   STEPS train steps by hand with the trainer's pieces, checking
                               shardings on the way; losses and eval metrics in OUT.json,
                               the final state in OUT.npz

It is also an ml_collections config file: `--config tests/_workers.py:ARG` where ARG is
`section__field=value,...` (values read with ast.literal_eval, bare words as strings; commas
inside brackets belong to the value) gives
`conftest.tiny_config(**overrides)`.
"""

import ast
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # for `conftest` when loaded as a config file by absl/ml_collections
    sys.path.insert(0, HERE)


def split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets: "a=1,b=(2,3)" -> ["a=1", "b=(2,3)"]."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def parse_arg(arg: str | None) -> dict:
    out = {}
    for item in split_top_level(arg or ""):
        if not item:
            continue
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def get_config(arg=None):
    from conftest import tiny_config  # pylint: disable=g-import-not-at-top

    return tiny_config(**parse_arg(arg))


def cache_env(pytestconfig=None, tmp_path_factory=None) -> dict:
    """The environment of the session's persistent XLA compilation cache (set by
    conftest.pytest_configure), for the processes a test starts with an environment of its
    own."""
    del pytestconfig, tmp_path_factory
    from conftest import CACHE_ENV  # pylint: disable=g-import-not-at-top

    return {k: os.environ[k] for k in CACHE_ENV}


def flat_state(state) -> dict:
    """{".params['conv']['kernel']": np.ndarray, ...}: every leaf of the train state, whole
    (a replicated leaf's local copy; a sharded one gathered from every process)."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    def whole(leaf):
        if leaf.sharding.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        if leaf.is_fully_addressable:
            return np.asarray(jax.device_get(leaf))
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): whole(leaf) for path, leaf in leaves}


def load_npz(path) -> dict:
    import numpy as np  # pylint: disable=g-import-not-at-top

    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def restore_latest(config, workdir):
    """The latest checkpointed train state of `workdir` (replicated over this job's devices)."""
    from hisd_jax import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
    from hisd_jax import loop  # pylint: disable=g-import-not-at-top

    exp = experiment_lib.build_experiment(config)
    state, data_state = loop.restore_latest(exp, workdir)
    return int(state.step), state, data_state


def dump(config, workdir, out) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    step, state, data_state = restore_latest(config, workdir)
    if jax.process_index() == 0:
        np.savez(out, **flat_state(state), __ckpt_step=step, __data_step=data_state["step"])


def cmd_train(workdir, arg) -> None:
    from hisd_jax import parallel  # pylint: disable=g-import-not-at-top

    parallel.maybe_initialize_distributed()
    from hisd_jax import train  # pylint: disable=g-import-not-at-top

    config = get_config(arg)
    train.train_and_evaluate(config, workdir)
    dump(config, workdir, os.path.join(workdir, "final_state.npz"))


def cmd_spmd(arg, steps, devices, out) -> None:
    """A few steps by hand with the trainer's jitted step, asserting how things are sharded."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

    from hisd_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from hisd_jax import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
    from hisd_jax import parallel  # pylint: disable=g-import-not-at-top
    from hisd_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top

    assert jax.device_count() == devices, (jax.device_count(), devices)
    assert jax.local_device_count() == devices and jax.process_count() == 1
    config = get_config(arg)
    exp = experiment_lib.build_experiment(config)
    fsdp = config.mesh.fsdp
    assert exp.mesh.shape == {"data": devices // fsdp, "fsdp": fsdp}, exp.mesh.shape
    all_devices = set(jax.devices())

    def check_replicated(tree):
        for leaf in jax.tree.leaves(tree):
            assert leaf.sharding.is_fully_replicated, leaf.sharding
            assert leaf.sharding.device_set == all_devices
            assert len(leaf.addressable_shards) == devices
            for shard in leaf.addressable_shards:
                assert shard.data.shape == leaf.shape

    def check_state(state):
        """Replicated, or (FSDP) each leaf placed as `state_shardings` says: big leaves split
        over the 'fsdp' axis, every device holding 1/fsdp of them."""
        if fsdp == 1:
            return check_replicated(state)
        split = 0
        for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(exp.state_shardings)):
            assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, want)
            if not want.is_fully_replicated:
                split += 1
                for shard in leaf.addressable_shards:
                    assert shard.data.size * fsdp == leaf.size
        assert split > 10, split  # parameters and both Adam moments of every big leaf
        # What one device holds of parameters + optimizer state: at most 1/fsdp of the whole
        # plus the leaves left replicated (below mesh.min_shard_size or indivisible).
        held = whole = replicated = 0
        for leaf in jax.tree.leaves((state.params, state.opt_state)):
            held += leaf.addressable_shards[0].data.nbytes
            whole += leaf.nbytes
            replicated += leaf.nbytes if leaf.sharding.is_fully_replicated else 0
        assert held <= whole / fsdp + replicated, (held, whole, replicated)
        assert held < whole / 2, (held, whole)

    def check_sharded(batch, rows):
        for k, v in batch.items():
            assert v.shape[0] == rows, (k, v.shape)
            assert v.sharding.spec == P(parallel.BATCH), (k, v.sharding)
            shards = v.addressable_shards
            assert len(shards) == devices and {s.device for s in shards} == all_devices
            starts = sorted(s.index[0].start or 0 for s in shards)
            assert starts == list(range(0, rows, rows // devices)), (k, starts)
            assert all(s.data.shape[0] == rows // devices for s in shards)

    state = experiment_lib.init_state(exp)
    check_state(state)
    step_fn = steps_lib.make_train_step(exp)
    sharding = parallel.batch_sharded(exp.mesh)
    keys = exp.batch_keys(train=True)
    iterator = data_lib.BatchIterator(
        exp.dataset.splits["train"], config.train.batch_size, seed=config.seed, prefetch=0
    )
    losses = []
    for _ in range(steps):
        local = next(iterator)
        batch = parallel.global_batch({k: local[k] for k in keys}, sharding)
        check_sharded(batch, config.train.batch_size)
        # The same global batch as a host array: the sharded array holds exactly these rows.
        np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])
        sums = steps_lib.zero_metric_sums(exp, step_fn, state, batch)
        state, sums = step_fn(state, sums, batch)
        check_state(state)
        check_replicated(sums)
        losses.append(float(sums["loss"]))

    # Evaluation, with an eval batch size that leaves the last batch padded.
    val = exp.dataset.splits["val"]
    eval_bs = config.train.eval_batch_size
    assert len(val) % eval_bs, "the test wants an eval split that needs padding"
    last = list(data_lib.eval_batches(val, eval_bs))[-1]
    assert 0 < last["mask"].sum() < eval_bs
    check_sharded(parallel.global_batch(last, sharding), eval_bs)
    metrics = {split: steps_lib.evaluate(exp, state, split) for split in ("val", "test")}
    # The same split in batches that need no padding: masking must make them agree.
    unpadded = next(
        b for b in range(eval_bs, len(val) + 1) if len(val) % b == 0 and b % devices == 0
    )
    exp.config.train.eval_batch_size = unpadded
    metrics["val_unpadded"] = steps_lib.evaluate(exp, state, "val")
    exp.config.train.eval_batch_size = eval_bs

    np.savez(out + ".npz", **flat_state(state))
    with open(out + ".json", "w") as f:
        json.dump({"losses": losses, "metrics": metrics, "device_count": jax.device_count()}, f)


def main(argv):
    command, *args = argv[1:]
    if command == "train":
        cmd_train(*args)
    elif command == "dump":
        workdir, arg, out = args
        dump(get_config(arg), workdir, out)
    elif command == "spmd":
        arg, steps, devices, out = args
        cmd_spmd(arg, int(steps), int(devices), out)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv)
