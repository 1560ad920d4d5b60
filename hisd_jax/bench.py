"""Benchmarks a config's train step: compile time, examples/s, peak memory.

`python -m hisd_jax.bench --config configs/hisd_multidigits.py [--steps 50] [--warmup 5]`

Prints a table and one machine-readable line starting with `BENCH ` followed by JSON.
The step is the standard program's jitted, donating step (`steps.make_train_step`; other
training programs are not benchmarked here) on device-resident batches (the
input pipeline is measured separately as `data_ms_per_batch`). Peak memory is the
device's `peak_bytes_in_use` where the backend reports it (GPU/TPU), else XLA's
compiled memory analysis (arguments + outputs + temporaries) plus the process's peak
resident set size.

Every MTL strategy on one multi-task config, as train-step time and ratio to EW:

`python -m hisd_jax.bench --config configs/mtl_multidigits.py --strategies all`

`all` is every loss weighting, every per-task-gradient method in parameter space and
every one in representation space (or give a list: `--strategies ew,pcgrad,pcgrad@rep`).
A `:unroll` or `:vmap` suffix picks how a gradient method's per-task backward passes run
(`mtl.backward`, default the config's): `--strategies mgda@param:unroll,mgda@param:vmap`.
All steps are compiled first; then `--rounds` rounds each time `--steps` steps of every
strategy, visiting them in a rotated order, so load from other processes spreads over all
of them. Reported: the median step time over rounds and the median over rounds of the
per-round ratio to EW. One `BENCH ` JSON line per strategy follows the table.

Memory per device of the compiled train step, replicated against FSDP (the state sharded over
every device: `mesh.fsdp` = the device count) and without and with `model.remat`:

`XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m hisd_jax.bench \
    --config configs/resnet50_imagenet.py:data=synthetic --memory`

Compiles only (nothing runs, so a model far bigger than the machine's compute is fine). Per
layout: parameter and optimizer-state bytes one device holds (from the state's shardings:
exact), how many of those bytes are replicated leaves (below `mesh.min_shard_size`), and XLA's
memory analysis of the compiled step per device (arguments, outputs, temporaries).

αVIL's epoch against a plain multitask (EW) epoch on one config:

`python -m hisd_jax.bench --config configs/alphavil_multidigits.py --alphavil`

Per round (rotated, `--rounds`): a plain epoch (steps_per_epoch EW steps), αVIL's joint pass
(steps_per_epoch steps on Σ w_t L_t) and its update (T inner runs of K steps, the α fit, the
merge; `programs/alphavil.py`). Reported: medians over rounds and the median ratio of αVIL's
epoch to the plain one, next to the ratio the examples predict,
1 + T·K / steps_per_epoch + alpha_steps·alpha_batch_size / (steps_per_epoch·batch_size)
(K = round(ρ·steps_per_epoch), so about 1 + ρ·T + the α fit's share).
"""

import copy
import json
import resource
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from hisd_jax import cli
from hisd_jax import config as config_lib
from hisd_jax import data as data_lib
from hisd_jax import parallel

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so the module imports
    cleanly next to other entry points)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_integer("steps", 50, "Timed steps.")
    flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.")
    flags.DEFINE_string(
        "strategies",
        "",
        "'all' or comma-separated name[@space][:backward]: time every MTL strategy vs EW.",
    )
    flags.DEFINE_integer("rounds", 5, "With --strategies: timed rounds of --steps steps each.")
    flags.DEFINE_bool("alphavil", False, "Time an αVIL epoch against a plain EW epoch.")
    flags.DEFINE_bool(
        "memory", False, "Per-device memory of the compiled step: replicated vs FSDP, remat."
    )
    flags.mark_flags_as_required(["config"])


def device_batches(exp, n: int):
    """The first `n` training batches as sharded device arrays, and host ms per batch."""
    config = exp.config
    iterator = data_lib.BatchIterator(
        exp.dataset.splits["train"],
        config.train.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        augment=exp.augment,
    )
    keys = exp.batch_keys(train=True)
    sharding = parallel.batch_sharded(exp.mesh)
    t0 = time.perf_counter()
    host = [next(iterator) for _ in range(n)]
    data_ms = 1e3 * (time.perf_counter() - t0) / n
    iterator.close()
    return [parallel.global_batch({k: b[k] for k in keys}, sharding) for b in host], data_ms


def benchmark(config, steps: int = 50, warmup: int = 5) -> dict:
    """Measures the train step of `config`; returns a flat dict of numbers."""
    from hisd_jax import experiment  # noqa: PLC0415
    from hisd_jax import steps as steps_lib  # noqa: PLC0415

    exp = experiment.build_experiment(config)
    state = experiment.init_state(exp)
    step_fn = steps_lib.make_train_step(exp)
    batches, data_ms = device_batches(exp, warmup + steps)

    sums = steps_lib.zero_metric_sums(exp, step_fn, state, batches[0])
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


def strategy_tokens(spec: str) -> list[str]:
    """Comma-separated tokens; 'all' stands for every loss weighting, then every gradient
    method in param and in rep space (`all,pcgrad@param:vmap` adds to it)."""
    from hisd_jax.mtl.strategy import GRADIENT_METHODS, LOSS_WEIGHTINGS  # noqa: PLC0415

    every = [
        *LOSS_WEIGHTINGS,
        *(f"{m}@param" for m in GRADIENT_METHODS),
        *(f"{m}@rep" for m in GRADIENT_METHODS),
    ]
    tokens = []
    for token in spec.split(","):
        tokens += every if token == "all" else [token] if token else []
    return tokens


def benchmark_strategies(
    config, strategies, steps: int = 20, rounds: int = 5, warmup: int = 3
) -> list[dict]:
    """Train-step time of each strategy (tokens name[@space]) on `config`, and ratio to EW.

    `static` gets equal weights. EW is added when missing (it is the reference).
    """
    import numpy as np  # noqa: PLC0415

    from hisd_jax import experiment  # noqa: PLC0415
    from hisd_jax import steps as steps_lib  # noqa: PLC0415
    from hisd_jax.mtl import tasks as tasks_lib  # noqa: PLC0415

    parsed = []
    for token in strategies:
        method, _, backward = token.partition(":")
        parsed.append((*tasks_lib.parse_method(method, "param"), backward or config.mtl.backward))
    reference = ("ew", "param", config.mtl.backward)
    if reference not in parsed:
        parsed.insert(0, reference)
    parsed = list(dict.fromkeys(parsed))
    num_tasks = len(config.data.tasks)
    entries = []
    for name, space, backward in parsed:
        hparams = {"weights": (1.0,) * num_tasks} if name == "static" else {}
        cfg = tasks_lib.method_config(config, name, space, hparams=hparams)
        with cfg.unlocked():
            cfg.mtl.backward = backward
        exp = experiment.build_experiment(cfg)
        label = tasks_lib.method_label(name, space)
        if exp.strategy.per_task_gradients and backward != "auto":
            label += f":{backward}"
        entries.append({"name": name, "space": space, "exp": exp, "label": label})

    exp0 = entries[0]["exp"]
    batches, _ = device_batches(exp0, steps)

    for e in entries:
        state = experiment.init_state(e["exp"])
        step_fn = steps_lib.make_train_step(e["exp"])
        sums = steps_lib.zero_metric_sums(e["exp"], step_fn, state, batches[0])
        t0 = time.perf_counter()
        e["step"] = step_fn.lower(state, sums, batches[0]).compile()
        e["compile_s"] = time.perf_counter() - t0
        for b in batches[:warmup]:
            state, sums = e["step"](state, sums, b)
        jax.block_until_ready(sums)
        e["state"], e["sums"], e["ms"] = state, sums, []
        print(f"compiled {e['label']} in {e['compile_s']:.1f}s", file=sys.stderr)

    for r in range(rounds):
        shift = r % len(entries)
        for e in entries[shift:] + entries[:shift]:
            state, sums = e["state"], e["sums"]
            t0 = time.perf_counter()
            for b in batches:
                state, sums = e["step"](state, sums, b)
            jax.block_until_ready(sums)
            e["ms"].append(1e3 * (time.perf_counter() - t0) / len(batches))
            e["state"], e["sums"] = state, sums

    reference = np.asarray(entries[0]["ms"])
    out = []
    for e in entries:
        ms = np.asarray(e["ms"])
        kind = "loss weighting" if e["exp"].strategy.weighting is not None else "gradients"
        out.append(
            {
                "strategy": e["label"],
                "method": e["name"],
                "space": e["space"] if kind == "gradients" else None,
                "backward": e["exp"].strategy.backward if kind == "gradients" else None,
                "kind": kind,
                "tasks": num_tasks,
                "batch_size": config.train.batch_size,
                "backend": jax.default_backend(),
                "devices": jax.device_count(),
                "step_ms": float(np.median(ms)),
                "step_ms_min": float(ms.min()),
                "ratio_to_ew": float(np.median(ms / reference)),
                "compile_s": e["compile_s"],
                "rounds": rounds,
                "steps_per_round": len(batches),
            }
        )
    return out


def benchmark_alphavil(config, rounds: int = 5) -> dict:
    """Wall time of an αVIL epoch and of a plain EW epoch on `config` (see the module
    docstring); returns a flat dict of milliseconds and ratios."""
    import numpy as np  # noqa: PLC0415

    from hisd_jax import experiment  # noqa: PLC0415
    from hisd_jax import steps as steps_lib  # noqa: PLC0415
    from hisd_jax.mtl import tasks as tasks_lib  # noqa: PLC0415

    plain = experiment.build_experiment(tasks_lib.method_config(config, "ew", "param"))
    exp = experiment.build_experiment(
        tasks_lib.method_config(config, "ew", "param", program="alphavil")
    )
    program, per_epoch = exp.program, exp.steps_per_epoch
    batches, _ = device_batches(plain, per_epoch)

    step = steps_lib.make_train_step(plain)
    p_state = experiment.init_state(plain)
    p_sums = steps_lib.zero_metric_sums(plain, step, p_state, batches[0])
    a_state = experiment.init_state(exp)
    a_sums = steps_lib.zero_metric_sums(exp, program.unit, a_state, batches[0])

    def plain_epoch(state, sums):
        for b in batches:
            state, sums = step(state, sums, b)
        return jax.block_until_ready((state, sums))

    def joint_pass(state, sums):
        for b in batches:
            state, sums = program.unit(state, sums, b)
        return jax.block_until_ready((state, sums))

    def update(state, epoch):
        return jax.block_until_ready(program.end_epoch(state, epoch))

    t0 = time.perf_counter()
    p_state, p_sums = plain_epoch(p_state, p_sums)  # compiles
    a_state, a_sums = joint_pass(a_state, a_sums)
    a_state = update(a_state, 0)
    compile_s = time.perf_counter() - t0
    times = {"plain": [], "joint": [], "update": []}
    for r in range(rounds):
        order = ["plain", "joint", "update"]
        for name in order[r % 3 :] + order[: r % 3]:
            t0 = time.perf_counter()
            if name == "plain":
                p_state, p_sums = plain_epoch(p_state, p_sums)
            elif name == "joint":
                a_state, a_sums = joint_pass(a_state, a_sums)
            else:
                a_state = update(a_state, r + 1)
            times[name].append(1e3 * (time.perf_counter() - t0))
    ms = {k: np.asarray(v) for k, v in times.items()}
    batch = config.train.batch_size
    tasks, k = len(exp.tasks), program.inner_steps
    alpha_rows = program.cfg.alpha_steps * program.alpha_batch_size
    return {
        "config": config.name,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "tasks": tasks,
        "steps_per_epoch": per_epoch,
        "inner_steps": k,
        "alpha_steps": program.cfg.alpha_steps,
        "alpha_batch_size": program.alpha_batch_size,
        "rounds": rounds,
        "compile_s": compile_s,
        "plain_epoch_ms": float(np.median(ms["plain"])),
        "joint_pass_ms": float(np.median(ms["joint"])),
        "update_ms": float(np.median(ms["update"])),
        "alphavil_epoch_ms": float(np.median(ms["joint"] + ms["update"])),
        "ratio": float(np.median((ms["joint"] + ms["update"]) / ms["plain"])),
        "ratio_predicted_by_examples": 1 + tasks * k / per_epoch + alpha_rows / (per_epoch * batch),
    }


def _memory_of(config) -> dict:
    """Per-device bytes of `config`'s state (by its shardings) and of its compiled step."""
    from hisd_jax import experiment  # noqa: PLC0415
    from hisd_jax import steps as steps_lib  # noqa: PLC0415

    exp = experiment.build_experiment(config)
    sh = exp.state_shardings
    state = jax.eval_shape(experiment._init_fn(exp), config.seed)  # noqa: SLF001
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, sh)  # fmt: skip
    one = data_lib.with_positions(exp.dataset.splits["train"], np.arange(1))  # shapes only
    batch_sharding = parallel.batch_sharded(exp.mesh)
    batch = {
        k: jax.ShapeDtypeStruct(
            (config.train.batch_size, *one[k].shape[1:]), one[k].dtype, sharding=batch_sharding
        )
        for k in exp.batch_keys(train=True)
    }
    step_fn = steps_lib.make_train_step(exp)
    sums = jax.eval_shape(step_fn, state, {}, batch)[1]
    sums = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(exp.mesh)),
        sums,
    )
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, sums, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()

    def replicated_bytes(tree, shardings):
        return sum(
            x.size * np.dtype(x.dtype).itemsize
            for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
            if s.is_fully_replicated
        )

    return {
        "params_bytes": parallel.shard_bytes(state.params, sh.params),
        "opt_state_bytes": parallel.shard_bytes(state.opt_state, sh.opt_state),
        "replicated_params_opt_bytes": replicated_bytes(state.params, sh.params)
        + replicated_bytes(state.opt_state, sh.opt_state),
        "total_params_bytes": sum(
            x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state.params)
        ),
        "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
        "output_bytes": getattr(mem, "output_size_in_bytes", None),
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
        "compile_s": compile_s,
    }


def benchmark_memory(config) -> list[dict]:
    """`_memory_of` for replicated and FSDP over every device, each without and with remat."""
    n = jax.device_count()
    rows = []
    for layout, fsdp in (("replicated", 1), (f"fsdp={n}", n)):
        for remat in (False, True):
            cfg = copy.deepcopy(config)
            cfg.unlock()
            cfg.mesh.data, cfg.mesh.fsdp, cfg.model.remat = -1, fsdp, remat
            cfg.lock()
            row = {"config": config.name, "devices": n, "layout": layout, "remat": remat,
                   "batch_size": config.train.batch_size, "dtype": config.model.dtype}  # fmt: skip
            rows.append({**row, **_memory_of(cfg)})
    return rows


def memory_table(rows: list[dict]) -> str:
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.1f}"  # noqa: E731
    lines = [
        "| layout | remat | params MiB | opt state MiB | of which replicated MiB | "
        "arguments MiB | outputs MiB | temporaries MiB | compile s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {'yes' if r['remat'] else 'no'} | {mib(r['params_bytes'])} | "
            f"{mib(r['opt_state_bytes'])} | {mib(r['replicated_params_opt_bytes'])} | "
            f"{mib(r['argument_bytes'])} | {mib(r['output_bytes'])} | {mib(r['temp_bytes'])} | "
            f"{r['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def strategies_table(results: list[dict]) -> str:
    header = "| strategy | kind | space | step ms (median) | step ms (min) | x EW |"
    lines = [header, "|---|---|---|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r['strategy']} | {r['kind']} | {r['space'] or '-'} | {r['step_ms']:.1f} "
            f"| {r['step_ms_min']:.1f} | {r['ratio_to_ew']:.2f} |"
        )
    return "\n".join(lines)


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
    cli.quiet_library_info()
    parallel.maybe_initialize_distributed()
    logging.set_verbosity(logging.WARNING)
    try:
        if FLAGS.memory:
            rows = benchmark_memory(FLAGS.config)
            print(f"Per device, {rows[0]['devices']} devices, global batch "
                  f"{rows[0]['batch_size']}, {rows[0]['dtype']}:")  # fmt: skip
            print(memory_table(rows))
            for r in rows:
                print("BENCH " + json.dumps(r))
            return
        if FLAGS.alphavil:
            result = benchmark_alphavil(FLAGS.config, FLAGS.rounds)
        elif FLAGS.strategies:
            results = benchmark_strategies(
                FLAGS.config,
                strategy_tokens(FLAGS.strategies),
                FLAGS.steps,
                FLAGS.rounds,
                min(FLAGS.warmup, FLAGS.steps),
            )
        else:
            result = benchmark(FLAGS.config, FLAGS.steps, FLAGS.warmup)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.strategies:
        print(strategies_table(results))
        for r in results:
            print("BENCH " + json.dumps(r))
        return
    print(format_table(result))
    print("BENCH " + json.dumps(result))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_config_flags)
