"""Benchmarks a config's train step: compile time, examples/s, peak memory.

`python -m hisd_jax.bench --config configs/hisd_multidigits.py [--steps 50] [--warmup 5]`

Prints a table and one machine-readable line starting with `BENCH ` followed by JSON.
The step is the trainer's own jitted, donating step on device-resident batches (the
input pipeline is measured separately as `data_ms_per_batch`). Peak memory is the
device's `peak_bytes_in_use` where the backend reports it (GPU/TPU), else XLA's
compiled memory analysis (arguments + outputs + temporaries) plus the process's peak
resident set size.
"""

import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from hisd_jax import config as config_lib
from hisd_jax import data as data_lib
from hisd_jax import parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_integer("steps", 50, "Timed steps.")
flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.")
flags.mark_flags_as_required(["config"])


def benchmark(config, steps: int = 50, warmup: int = 5) -> dict:
    """Measures the train step of `config`; returns a flat dict of numbers."""
    from hisd_jax import train  # noqa: PLC0415

    exp = train.build_experiment(config)
    state = train.init_state(exp)
    step_fn = train.make_train_step(exp)
    iterator = data_lib.BatchIterator(
        exp.dataset.splits["train"],
        config.train.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    keys = exp.batch_keys(train=True)
    sharding = parallel.batch_sharded(exp.mesh)
    t0 = time.perf_counter()
    host = [next(iterator) for _ in range(warmup + steps)]
    data_ms = 1e3 * (time.perf_counter() - t0) / len(host)
    iterator.close()
    batches = [parallel.global_batch({k: b[k] for k in keys}, sharding) for b in host]

    shapes = jax.eval_shape(step_fn, state, {}, batches[0])[1]
    sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, sums, batches[0]).compile()
    compile_s = time.perf_counter() - t0

    for b in batches[:warmup]:
        state, sums = compiled(state, sums, b)
    jax.block_until_ready(sums)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        state, sums = compiled(state, sums, b)
    jax.block_until_ready(sums)
    elapsed = time.perf_counter() - t0

    mem = compiled.memory_analysis()
    compiled_bytes = None
    if mem is not None:
        compiled_bytes = (
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        )
    stats = jax.local_devices()[0].memory_stats() or {}
    return {
        "config": config.name,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "batch_size": config.train.batch_size,
        "compile_s": compile_s,
        "step_ms": 1e3 * elapsed / steps,
        "examples_per_s": steps * config.train.batch_size / elapsed,
        "data_ms_per_batch": data_ms,
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "compiled_bytes": compiled_bytes,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def format_table(result: dict) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.2f}"
        if isinstance(v, int) and v > 10_000:
            return f"{v / 2**20:,.1f} MiB"
        return str(v)

    width = max(map(len, result))
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in result.items())


def main(argv):
    del argv
    parallel.maybe_initialize_distributed()
    logging.set_verbosity(logging.WARNING)
    try:
        result = benchmark(FLAGS.config, FLAGS.steps, FLAGS.warmup)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_table(result))
    print("BENCH " + json.dumps(result))


if __name__ == "__main__":
    app.run(main)
