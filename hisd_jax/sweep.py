"""MTL sweep: every method x seed and the single-task baselines on one budget, with Delta_m%.

  python -m hisd_jax.sweep --config configs/mtl_multidigits.py --seeds 0,1,2 \\
      --methods ew,uw,dwa,rlw,gls,mgda,pcgrad,gradvac,cagrad,imtlg,gradnorm,nashmtl \\
      --workdir runs/mtl_sweep

A method is `name` or `name@space` (`pcgrad@rep`: per-task gradients with respect to the
shared representation); `--space rep` sets the default space of the gradient methods;
`--methods=` (empty) trains only the single-task baselines. Methods run with their default
hyper-parameters, except the config's own method, which keeps `mtl.hparams` (so `static`
needs a config with `mtl.method='static'` and its weights).
Every run is the experiment config with only the method (`mtl.method/space/hparams`) or,
for a single-task baseline, the task set changed (`mtl.tasks.single_task_config`: only
that task, EW; same model, objective, optimizer, steps and batch size), and its seed set
(`config.seed`: initialisation and batch order; the data set stays `data.seed`). Runs live
in their own sub-workdirs:

  <workdir>/single/<task>/seed<s>/    single-task baseline of <task>, seed s
  <workdir>/<method>[_<space>]/seed<s>/

`--shard i/n` trains only every n-th run from the i-th (0 <= i < n) and stops without a summary:
start n processes (on one machine or several sharing the workdir) with i = 0..n-1, then once
more without --shard (with --notrain) to summarise. Each run is trained by one shard only.
A run whose sub-workdir has results.json is not repeated (its stored config must match);
an interrupted one resumes from its last checkpoint. Then the sweep writes

  sweep.md    per task and metric: mean +- std over seeds, Delta_m% mean +- std, wall time
  sweep.json  every run's metrics, Delta_m and wall time, and the aggregates

and prints the markdown table. A run that stops on a non-finite loss is reported as failed
and left out of the table (rerunning retries it from its last good checkpoint).

Delta_m% (Maninis et al. 2019, as Nash-MTL reports it; `mtl.delta_m`'s "pairs" average,
which LibMTL's per-task average equals when every task has one judging metric, the default
here): for a method's seed s,
  Delta_m = 100 / N * sum_t sum_{m in M_t} (-1)^{l_m} (M_{t,m,s} - B_{t,m}) / B_{t,m},
with M_t the metrics judging task t (`mtl.metrics`, default accuracy for classification and
MAE for regression; see mtl/tasks.py), N = sum_t |M_t|, l_m = 1 if lower is better else 0,
M_{t,m,s} the test metric of task t at its deepest exit in the method's run with seed s, and
B_{t,m} the mean over the sweep's seeds of the same metric in task t's single-task baseline
runs. Positive is better than the baselines. The table gives the mean and the sample standard
deviation (ddof = 1) of Delta_m over the method's seeds. Every baseline must exist: a missing
one is an error, never a fallback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from hisd_jax import config as config_lib
from hisd_jax import cli, jsonio, parallel, storage
from hisd_jax.mtl import delta_m as delta_m_lib
from hisd_jax.mtl import tasks as tasks_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so the module imports
    cleanly next to other entry points)."""
    config_flags.DEFINE_config_file("config", None, "MTL experiment config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory holding one sub-directory per run.")
    flags.DEFINE_list(
        "methods",
        None,
        "MTL methods, name or name@space, or a training program with its method (kd_joint, "
        "kd_sequential+cagrad@rep); e.g. ew,uw,pcgrad@rep,kd_joint; '' = baselines only.",
    )
    flags.DEFINE_list("seeds", ["0"], "Seeds (config.seed) for every method and baseline.")
    flags.DEFINE_string("space", None, "Default space of gradient methods (default: the config's).")
    flags.DEFINE_list(
        "judge",
        None,
        "Tasks that judge the methods (their single-task baselines, table columns and Δm); "
        "default every task. A target-task comparison (αVIL): --judge left.",
    )
    flags.DEFINE_bool("train", True, "Train missing runs; --notrain only summarises finished ones.")
    flags.DEFINE_string(
        "shard", None, "i/n: train only runs i, i+n, i+2n, ... of the plan, no summary."
    )
    flags.DEFINE_string(
        "compilation_cache",
        "<workdir>/.jax_cache",
        "Persistent XLA compilation cache shared by the runs (seeds reuse it); '' disables.",
    )
    flags.mark_flags_as_required(["config", "workdir", "methods"])


SINGLE = "single-task"


class SweepError(ValueError):
    """A sweep that cannot be summarised (missing baseline, failed run, ...)."""


@dataclasses.dataclass(frozen=True)
class Run:
    label: str  # the row of the table: a method label, or SINGLE
    task: str | None  # single-task baselines: their task
    seed: int
    subdir: str
    config: object


def plan(config, methods, seeds, space=None, judge=None) -> list[Run]:
    """The single-task baselines (task x seed; only the tasks in `judge` if given), then every
    method x seed, validated."""
    space = space or config.mtl.space
    judge = check_judge(config, judge)
    runs = []
    for task in judge:
        for seed in seeds:
            cfg = tasks_lib.single_task_config(
                config, task, seed=seed, name=f"{config.name}:single_{task}:seed{seed}"
            )
            runs.append(Run(SINGLE, task, seed, os.path.join("single", task, f"seed{seed}"), cfg))
    labels = []
    for token in methods:
        program, name, sp = tasks_lib.parse_run(token, space)
        label = tasks_lib.method_label(name, sp, program)
        if label in labels:
            raise SweepError(f"--methods names {label!r} twice")
        labels.append(label)
        for seed in seeds:
            cfg = tasks_lib.method_config(
                config,
                name,
                sp,
                seed=seed,
                name=f"{config.name}:{label}:seed{seed}",
                program=program,
            )
            subdir = os.path.join(label.replace("@", "_").replace("+", "_"), f"seed{seed}")
            runs.append(Run(label, None, seed, subdir, cfg))
    for run in runs:  # every run is checked before the first one trains
        try:
            config_lib.validate(run.config)
            _check_strategy(run.config)
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f"run {run.subdir}: {e}") from e
    return runs


def check_judge(config, judge) -> tuple[str, ...]:
    """The judged tasks: `judge` (names in data.tasks, SweepError otherwise) or every task."""
    if not judge:
        return tuple(config.data.tasks)
    unknown = [t for t in judge if t not in config.data.tasks]
    if unknown or len(set(judge)) != len(judge):
        raise SweepError(
            f"--judge={','.join(judge)} must name distinct tasks of data.tasks "
            f"({', '.join(config.data.tasks)})"
        )
    return tuple(judge)


def _check_strategy(config) -> None:
    """Builds the run's MTL strategy, so missing or wrong hyper-parameters fail up front."""
    from hisd_jax.mtl import strategy as strategy_lib  # noqa: PLC0415

    hparams = config.mtl.hparams.to_dict()
    if config.mtl.method == "dwa":
        hparams.setdefault("steps_per_epoch", 1)  # the trainer sets it from the data
    try:
        strategy_lib.build_strategy(
            config.mtl.method,
            config.data.tasks,
            space=config.mtl.space,
            backward=config.mtl.backward,
            **hparams,
        )
    except (TypeError, ValueError) as e:
        raise config_lib.ConfigError(
            f"mtl.method={config.mtl.method!r} with hparams {hparams}: {e}"
        ) from e


def _load(path):
    if not storage.exists(path):
        return None
    return jsonio.read_json(path)


def execute(runs, workdir: str, train: bool = True) -> dict:
    """Trains every unfinished run (if `train`); returns {subdir: outcome}.

    An outcome is {"results", "wall_time_s"} for a finished run, {"failed": message} for a
    run stopped by a non-finite loss, and {"missing": True} for one not trained.
    """
    from hisd_jax import loop as loop_lib  # noqa: PLC0415
    from hisd_jax import train as train_lib  # noqa: PLC0415

    outcomes = {}
    for i, run in enumerate(runs):
        run_dir = os.path.join(workdir, run.subdir)
        results_path = os.path.join(run_dir, "results.json")
        if storage.exists(results_path):
            loop_lib.check_workdir_config(run_dir, run.config)
        results = _load(results_path)
        if results is None and train:
            print(f"== [{i + 1}/{len(runs)}] {run.subdir}: training", file=sys.stderr)
            t0 = time.perf_counter()
            try:
                results = train_lib.train_and_evaluate(run.config, run_dir)
            except FloatingPointError as e:
                print(f"== {run.subdir}: FAILED: {e}", file=sys.stderr)
                outcomes[run.subdir] = {"failed": str(e)}
                continue
            wall_time_s = time.perf_counter() - t0
            jsonio.write_json(
                os.path.join(run_dir, "sweep_time.json"), {"wall_time_s": wall_time_s}
            )
        elif results is not None:
            print(f"== [{i + 1}/{len(runs)}] {run.subdir}: already finished", file=sys.stderr)
        if results is None:
            outcomes[run.subdir] = {"missing": True}
            continue
        timing = _load(os.path.join(run_dir, "sweep_time.json")) or {}
        wall = timing.get("wall_time_s", results["train"]["wall_time_s"])
        outcomes[run.subdir] = {"results": results, "wall_time_s": wall}
    return outcomes


def mean_std(values) -> dict:
    """{"mean", "std" (sample, ddof 1; None for one value), "n"} of `values`."""
    v = np.asarray(values, np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else None,
        "n": len(v),
    }


def summarise(config, runs, outcomes, specs, workdir: str) -> dict:
    """Per-row (baselines, then each method) metrics, Delta_m and wall time over seeds."""
    directions = tasks_lib.directions(specs)
    seeds = sorted({r.seed for r in runs})

    # B_{t,m}: the mean over seeds of task t's single-task runs. All must exist.
    per_seed_single = {}
    for run in runs:
        if run.label != SINGLE:
            continue
        out = outcomes.get(run.subdir, {"missing": True})
        if "results" not in out:
            why = out.get("failed") or "it has no results.json"
            raise SweepError(
                f"Delta_m needs the single-task baseline of task {run.task!r} with seed "
                f"{run.seed}, but {os.path.join(workdir, run.subdir)}: {why}. Train it: rerun "
                "the sweep without --notrain."
            )
        metrics = tasks_lib.task_metrics(out["results"], specs)[run.task]
        per_seed_single.setdefault(run.seed, {})[run.task] = metrics
    baseline = {
        s.name: {
            m: float(np.mean([per_seed_single[seed][s.name][m] for seed in seeds]))
            for m in s.metrics
        }
        for s in specs
    }

    rows = {}
    for run in runs:
        row = rows.setdefault(run.label, {"seeds": {}, "failed": {}})
        out = outcomes.get(run.subdir, {"missing": True})
        if "failed" in out:
            row["failed"][run.seed] = out["failed"]
            continue
        if "missing" in out:
            row["failed"][run.seed] = "not trained"
            continue
        entry = row["seeds"].setdefault(run.seed, {"wall_time_s": [], "workdir": []})
        entry["wall_time_s"].append(out["wall_time_s"])
        entry["workdir"].append(os.path.join(workdir, run.subdir))
        if run.label == SINGLE:
            entry.setdefault("metrics", {})[run.task] = per_seed_single[run.seed][run.task]
        else:
            entry["metrics"] = tasks_lib.task_metrics(out["results"], specs)
    for row in rows.values():
        for entry in row["seeds"].values():
            entry["delta_m"] = delta_m_lib.delta_m(entry["metrics"], baseline, directions)
        done = list(row["seeds"].values())
        if not done:
            continue
        row["metrics"] = {
            s.name: {m: mean_std([e["metrics"][s.name][m] for e in done]) for m in s.metrics}
            for s in specs
        }
        row["delta_m"] = mean_std([e["delta_m"] for e in done])
        row["wall_time_s"] = mean_std([t for e in done for t in e["wall_time_s"]])
    best = best_standard_row(rows)
    for row in rows.values():
        if best is not None and "metrics" in row:
            means = {t: {m: v["mean"] for m, v in ms.items()} for t, ms in row["metrics"].items()}
            ref = {
                t: {m: v["mean"] for m, v in ms.items()} for t, ms in rows[best]["metrics"].items()
            }
            row["vs_best"] = delta_m_lib.delta_m(means, ref, directions)
    return {
        "best_standard": best,
        "config": config.name,
        "data": config.data.name,
        "tasks": [dataclasses.asdict(s) for s in specs],
        "steps": config.train.steps,
        "batch_size": config.train.batch_size,
        "seeds": seeds,
        "baseline": baseline,
        "rows": rows,
    }


def best_standard_row(rows: dict) -> str | None:
    """The label of the best method trained by the standard program (highest mean Δm): the
    baseline a training program (KD from converged tasks) is measured against."""
    standard = [
        label
        for label, row in rows.items()
        if label != SINGLE and "delta_m" in row and tasks_lib.parse_run(label)[0] == "standard"
    ]
    return max(standard, key=lambda label: rows[label]["delta_m"]["mean"], default=None)


def format_mean_std(stats, scale=1.0, digits=2) -> str:
    """`mean_std`'s result as "mean ± std" (just "mean" for one value), scaled."""
    text = f"{scale * stats['mean']:.{digits}f}"
    return text if stats["std"] is None else f"{text} ± {scale * stats['std']:.{digits}f}"


def markdown(summary: dict) -> str:
    specs = summary["tasks"]
    header = ["method"]
    for s in specs:
        for m, higher in s["metrics"].items():
            unit = " (%)" if m == "accuracy" else ""
            header.append(f"{s['name']} {m}{unit} {'↑' if higher else '↓'}")
    best = summary.get("best_standard")
    header += ["Δm% ↑"] + ([f"vs {best} % ↑"] if best else []) + ["wall s/run", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for label, row in summary["rows"].items():
        if "metrics" not in row:
            cells = [label] + ["–"] * (len(header) - 2) + [f"0/{len(summary['seeds'])}"]
        else:
            cells = [label]
            for s in specs:
                for m in s["metrics"]:
                    pct = m == "accuracy"
                    cells.append(
                        format_mean_std(
                            row["metrics"][s["name"]][m], 100 if pct else 1, 2 if pct else 4
                        )
                    )
            cells += [format_mean_std(row["delta_m"])] + ([f"{row['vs_best']:.2f}"] if best else [])
            cells += [
                f"{row['wall_time_s']['mean']:.0f}",
                f"{len(row['seeds'])}/{len(summary['seeds'])}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def document(summary: dict, table: str) -> str:
    exits = ", ".join(f"{s['name']}: exit{s['exits'][-1]}" for s in summary["tasks"])
    failed = [
        f"- {label}, seed {seed}: {why}"
        for label, row in summary["rows"].items()
        for seed, why in sorted(row["failed"].items())
    ]
    text = [
        f"# MTL sweep: {summary['config']}",
        "",
        f"Data set {summary['data']}; {summary['steps']} steps at batch {summary['batch_size']} "
        f"for every run; seeds {', '.join(map(str, summary['seeds']))}. Test metrics at each "
        f"task's deepest exit ({exits}), mean ± sample std (ddof 1) over seeds; "
        "'single-task' is each task trained alone (EW, same model and budget).",
        "",
        "Δm% = 100/N Σ_t Σ_{m∈M_t} (−1)^{l_m} (M_{t,m} − B_{t,m}) / B_{t,m}, per seed, with "
        "l_m = 1 if lower is better, N the number of (task, metric) pairs and B_{t,m} the "
        "single-task baselines' mean over the seeds above; then mean ± std over seeds. "
        "'vs <method> %': the same average relative change, of the row's mean metrics over "
        "those of the best method of the standard program (by Δm), the measure Lu et al. (NAACL "
        "2022) report for KD from converged tasks. "
        "Wall time: one run's train_and_evaluate (compile, train, evaluate), mean over runs.",
        "",
        table,
    ]
    if failed:
        text += ["", "Failed or missing runs (left out above):", *failed]
    return "\n".join(text) + "\n"


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """ "i/n" -> (i, n) with 0 <= i < n; None -> None; SweepError otherwise."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i = n = -1
    if not 0 <= i < n:
        raise SweepError(f"--shard={text!r} must be i/n with 0 <= i < n, e.g. 0/2")
    return i, n


def sweep(
    config, workdir: str, methods, seeds, space=None, train: bool = True, shard=None, judge=None
) -> dict:
    """Trains (if `train`) and summarises the sweep; writes sweep.md and sweep.json.

    `judge` (task names) restricts the single-task baselines, the table's columns and Δm to
    those tasks (a target-task comparison: `--judge left`); default every task.

    With `shard=(i, n)` it trains only runs i, i + n, ... of the plan and returns
    {"table": None, "trained": [subdir, ...]} without summarising.
    """
    from hisd_jax import experiment  # noqa: PLC0415

    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds={seeds} must be distinct and not empty")
    runs = plan(config, methods, seeds, space, judge)
    judged = check_judge(config, judge)
    specs = [s for s in experiment.build_experiment(config).tasks if s.name in judged]
    storage.makedirs(workdir)
    if shard is not None:
        mine = runs[shard[0] :: shard[1]]
        outcomes = execute(mine, workdir, train)
        return {
            "table": None,
            "trained": [r.subdir for r in mine if "results" in outcomes[r.subdir]],
        }
    outcomes = execute(runs, workdir, train)
    summary = summarise(config, runs, outcomes, specs, workdir)
    table = markdown(summary)
    jsonio.write_text(os.path.join(workdir, "sweep.md"), document(summary, table))
    jsonio.write_json(os.path.join(workdir, "sweep.json"), summary)
    return {"table": table, "summary": summary}


def main(argv):
    del argv
    cli.quiet_library_info()
    parallel.maybe_initialize_distributed()
    logging.set_verbosity(logging.WARNING)
    if FLAGS.compilation_cache:
        import jax  # noqa: PLC0415

        cache = FLAGS.compilation_cache.replace("<workdir>", FLAGS.workdir)
        jax.config.update("jax_compilation_cache_dir", storage.absolute(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    t0 = time.perf_counter()
    try:
        storage.check_url(FLAGS.workdir)
        out = sweep(
            FLAGS.config,
            FLAGS.workdir,
            FLAGS.methods,
            FLAGS.seeds,
            FLAGS.space,
            FLAGS.train,
            parse_shard(FLAGS.shard),
            FLAGS.judge,
        )
    except (config_lib.ConfigError, SweepError) as e:
        print(f"sweep error: {e}", file=sys.stderr)
        sys.exit(2)
    if out["table"] is None:
        print(
            f"shard {FLAGS.shard}: {len(out['trained'])} runs finished; summarise with the same "
            "command without --shard (add --notrain)"
        )
        return
    print(out["table"])
    print(f"\nwall time {time.perf_counter() - t0:.0f}s; written to {FLAGS.workdir}/sweep.md")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_config_flags)
