"""Runs several methods on one budget and compares them exit by exit.

`python -m hisd_jax.compare --config configs/compare_multidigits.py --workdir runs/compare`

The config holds a `base` experiment config and `runs`: {name: nested overrides of `base`,
e.g. {"objective": {"preset": "sdn"}}}. Each run trains in `<workdir>/<name>` (a finished run,
one with a results.json, is not repeated; an interrupted one resumes). The comparison prints
one table (per exit: FLOPs fraction and each method's test accuracy), then, for every
multi-exit run, fits early-exit thresholds on its validation split for a 1% accuracy
tolerance and for a 50% compute budget and reports them on the test split (accuracy,
average FLOPs, measured cascade speedup). Written to the workdir: `comparison.md`,
`comparison.json`, `accuracy_vs_flops.png`, and per run `early_exit_{tol,budget}.json`.
"""

import copy
import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from hisd_jax import cli
from hisd_jax import config as config_lib
from hisd_jax import jsonio, parallel

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so the module imports
    cleanly next to other entry points)."""
    config_flags.DEFINE_config_file("config", None, "Comparison config file.", lock_config=False)
    flags.DEFINE_string("workdir", None, "Directory holding one sub-directory per run.")
    flags.DEFINE_list("only", [], "Run only these runs (default: all).")
    flags.mark_flags_as_required(["config", "workdir"])


def run_config(base, overrides, name: str = ""):
    """A copy of `base` with nested `overrides` applied; unknown fields are an error."""
    config = copy.deepcopy(base)
    config.unlock()

    def apply(section, values, prefix):
        for key, value in values.items():
            if key not in section:
                raise config_lib.ConfigError(f"runs.{name}.{prefix}{key}: no such config field")
            if hasattr(value, "items"):
                apply(section[key], value, f"{prefix}{key}.")
            else:
                section[key] = value

    apply(config, overrides, "")
    config.lock()
    return config


def load_results(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def comparison_table(results: dict[str, dict], task: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per exit of the deepest model, one column per method."""
    reference = max(results.values(), key=lambda r: len(r["exits"]))
    header = ["exit", "FLOPs", "fraction", *results]
    rows = []
    for name, cost in reference["exits"].items():
        row = [name, f"{cost['flops'] / 1e6:.2f}M", f"{cost['fraction']:.3f}"]
        for r in results.values():
            acc = r["test"][task].get(name, {}).get("accuracy")
            row.append("" if acc is None else f"{100 * acc:.2f}")
        rows.append(row)
    return header, rows


EARLY_EXIT_POINTS = {"tol": {"tolerance": 0.01}, "budget": {"budget": 0.5}}


def early_exit_rows(run_dirs: dict[str, str]) -> tuple[list[str], list[list[str]], dict]:
    """Early-exit operating points of every multi-exit run (fitted on val, shown on test)."""
    from hisd_jax import evaluate  # noqa: PLC0415 - defines no flags when imported
    from hisd_jax.workdir import load_workdir  # noqa: PLC0415

    header = ["method", "goal", "test acc", "final-exit acc", "avg FLOPs", "exit rates", "speedup"]
    rows, reports = [], {}
    for name, run_dir in run_dirs.items():
        exp, variables = load_workdir(run_dir)
        if exp.model.num_exits < 2:
            continue
        for key, goal in EARLY_EXIT_POINTS.items():
            report = evaluate.early_exit_report(
                run_dir, exp=exp, variables=variables, write=False, plot=key == "tol", **goal
            )
            jsonio.write_json(os.path.join(run_dir, f"early_exit_{key}.json"), report)
            reports[f"{name}/{key}"] = report
            t = report["test"]
            label = (
                f"tolerance {goal['tolerance']:.0%}"
                if "tolerance" in goal
                else f"budget {goal['budget']:.0%}"
            )
            rows.append(
                [
                    name,
                    label,
                    f"{100 * t['accuracy']:.2f}",
                    f"{100 * t['final_exit_accuracy']:.2f}",
                    f"{t['avg_flops_fraction']:.3f}",
                    " / ".join(f"{r:.2f}" for r in t["exit_rates"]),
                    f"{report['speed']['speedup']:.2f}x",
                ]
            )
    return header, rows, reports


def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plot(results: dict[str, dict], task: str, path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, r in results.items():
        xs = [c["fraction"] for c in r["exits"].values()]
        ys = [100 * r["test"][task][e]["accuracy"] for e in r["exits"]]
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("FLOPs per example (fraction of the full model)")
    ax.set_ylabel(f"test accuracy, task '{task}' (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(config, workdir: str, only=()) -> dict:
    """Trains every run (skipping finished ones) and writes the comparison."""
    from hisd_jax import train  # noqa: PLC0415

    os.makedirs(workdir, exist_ok=True)
    results, times = {}, {}
    configs = {name: run_config(config.base, o, name) for name, o in config.runs.items()}
    for cfg in configs.values():
        config_lib.validate(cfg)  # every run's config is checked before the first one trains
    for name, cfg in configs.items():
        if only and name not in only:
            continue
        run_dir = os.path.join(workdir, name)
        done = load_results(os.path.join(run_dir, "results.json"))
        if done is None:
            print(f"== {name}: training in {run_dir}", file=sys.stderr)
            t0 = time.perf_counter()
            done = train.train_and_evaluate(cfg, run_dir)
            times[name] = time.perf_counter() - t0
        else:
            print(f"== {name}: already finished in {run_dir}", file=sys.stderr)
        results[name] = done

    task = config.base.data.tasks[0]
    header, rows = comparison_table(results, task)
    table = markdown(header, rows)
    ee_header, ee_rows, _ = early_exit_rows({name: os.path.join(workdir, name) for name in results})
    ee_table = markdown(ee_header, ee_rows)
    jsonio.write_text(
        os.path.join(workdir, "comparison.md"),
        f"Test accuracy (%) per exit, task '{task}'.\n\n{table}\n\n"
        "Early exit (max-softmax, per-exit temperatures and thresholds fitted on the "
        f"validation split; test split; measured cascade speedup on CPU):\n\n{ee_table}\n",
    )
    summary = {
        "task": task,
        "header": header,
        "rows": rows,
        "early_exit_header": ee_header,
        "early_exit_rows": ee_rows,
        "train_seconds": times,
    }
    jsonio.write_json(os.path.join(workdir, "comparison.json"), summary)
    plot(results, task, os.path.join(workdir, "accuracy_vs_flops.png"))
    return {"table": table + "\n\n" + ee_table, "results": results, "train_seconds": times}


def main(argv):
    del argv
    cli.quiet_library_info()
    parallel.maybe_initialize_distributed()
    logging.set_verbosity(logging.WARNING)
    t0 = time.perf_counter()
    try:
        out = compare(FLAGS.config, FLAGS.workdir, FLAGS.only)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    print(out["table"])
    print(f"\nwall time {time.perf_counter() - t0:.0f}s; written to {FLAGS.workdir}/comparison.md")


if __name__ == "__main__":
    define_flags()
    app.run(main)
