"""Runs several methods on one budget and compares them exit by exit.

`python -m hisd_jax.compare --config configs/compare_multidigits.py --workdir runs/compare`

The config holds a `base` experiment config and `runs`: {name: nested overrides of `base`,
e.g. {"objective": {"preset": "sdn"}}}, optionally `order` (the columns' order) and `claims`
(what `verdicts` tests). Each run trains in `<workdir>/<name>` (a finished run, one with a
results.json, is not repeated; an interrupted one resumes). The comparison prints one table
(per exit: FLOPs fraction and each method's test accuracy), then, for every multi-exit run,
fits early-exit thresholds on its validation split for a 1% accuracy tolerance and for a 50%
compute budget and reports them on the test split (accuracy, average FLOPs, exit rates), and
the measured cascade speedup apart (wall-clock, so it varies run to run; the two tables do not).
Written to the workdir: `comparison.md`, `comparison.json`, `accuracy_vs_flops.png`, and per
run `early_exit_{tol,budget}.json` (reused by a rerun).

With `--seeds 0,1,2` every seed runs in `<workdir>/seed_<s>` (the base config's `seed` set to
s) and the tables give mean ± sample std (ddof 1) over the seeds; a cell is marked † where
it differs from the `claims.method` run's by more than two standard errors (Welch:
sqrt(s_a²/n + s_b²/n)), and the claims of the methods' papers get a verdict
(`verdicts`): reproduced, not reproduced or inconclusive.
"""

import copy
import math
import os
import sys
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from hisd_jax import cli
from hisd_jax import config as config_lib
from hisd_jax import jsonio, parallel, provenance, storage
from hisd_jax import sweep as sweep_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so the module imports
    cleanly next to other entry points)."""
    config_flags.DEFINE_config_file("config", None, "Comparison config file.", lock_config=False)
    flags.DEFINE_string("workdir", None, "Directory holding one sub-directory per run.")
    flags.DEFINE_list("only", [], "Run only these runs (default: all).")
    flags.DEFINE_list(
        "seeds",
        [],
        "Seeds (integers): one comparison per seed in <workdir>/seed_<s>, then "
        "mean ± std per exit and the claims' verdicts (default: the config's seed, in <workdir>).",
    )
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
    if not storage.exists(path):
        return None
    return jsonio.read_json(path)


# The metric a comparison tabulates: the first of these a run's results hold for the task.
METRICS = {"accuracy": "accuracy (%)", "mrr": "MRR (x100, 1000 candidates)"}


def judged_metric(result: dict, task: str) -> str:
    """ "accuracy" for a classification task, "mrr" for a retrieval task (from its results)."""
    held = next(iter(result["test"][task].values()))
    return next(m for m in METRICS if m in held)


def trained_accuracy(
    result: dict, run: str, task: str, exit_name: str, last_only=(), metric: str = "accuracy"
):
    """Test `metric` of `run` at `exit_name` from its results, or None where it has no such
    exit or (a run in `last_only`, a dedicated model) where that exit's head was not trained."""
    if run in last_only and exit_name != list(result["exits"])[-1]:
        return None
    return result["test"][task].get(exit_name, {}).get(metric)


def comparison_table(
    results: dict[str, dict], task: str, last_only=(), metric: str = "accuracy"
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per exit of the deepest model, one column per method; a run in
    `last_only` (a dedicated model: a network cut at an exit, trained on that exit alone) shows
    its deepest exit only (its other heads were not trained)."""
    reference = max(results.values(), key=lambda r: len(r["exits"]))
    header = ["exit", "FLOPs", "fraction", *results]
    rows = []
    for name, cost in reference["exits"].items():
        row = [name, f"{cost['flops'] / 1e6:.2f}M", f"{cost['fraction']:.3f}"]
        for run, r in results.items():
            acc = trained_accuracy(r, run, task, name, last_only, metric)
            row.append("" if acc is None else f"{100 * acc:.2f}")
        rows.append(row)
    return header, rows


def cross_exit_rows(result: dict, task: str) -> tuple[list[str], list[list[str]]] | None:
    """Test MRR (x100) of queries embedded at each exit (rows) against the code embedded at
    each exit (columns) of one run, or None for a task without cross-exit metrics."""
    per_exit = result["test"][task]
    exits = list(per_exit)
    if f"mrr_docs_{exits[0]}" not in per_exit[exits[0]]:
        return None
    header = ["query at / code at", *exits]
    rows = [[e, *(f"{100 * per_exit[e][f'mrr_docs_{f}']:.2f}" for f in exits)] for e in exits]
    return header, rows


EARLY_EXIT_POINTS = {"tol": {"tolerance": 0.01}, "budget": {"budget": 0.5}}


def early_exit_reports(run_dirs: dict[str, str]) -> dict[str, dict]:
    """{"<run>/<tol|budget>": early-exit report} of every multi-exit run in `run_dirs` (fitted
    on val, shown on test; `evaluate.early_exit_report`). A report already in the run's directory
    (`early_exit_<key>.json`, written after the run finished) is read back, not refitted."""
    from hisd_jax import evaluate  # noqa: PLC0415 - defines no flags when imported
    from hisd_jax.workdir import load_workdir  # noqa: PLC0415

    reports = {}
    for name, run_dir in run_dirs.items():
        paths = {key: os.path.join(run_dir, f"early_exit_{key}.json") for key in EARLY_EXIT_POINTS}
        if all(storage.exists(p) for p in paths.values()):
            for key, path in paths.items():
                reports[f"{name}/{key}"] = load_results(path)
            continue
        exp, variables = load_workdir(run_dir)
        if exp.model.num_exits < 2:
            continue
        for key, goal in EARLY_EXIT_POINTS.items():
            report = evaluate.early_exit_report(
                run_dir, exp=exp, variables=variables, write=False, plot=key == "tol", **goal
            )
            jsonio.write_json(paths[key], report)
            reports[f"{name}/{key}"] = report
    return reports


def goal_label(report: dict) -> str:
    return f"{report['goal']} {report['value']:.0%}"


def early_exit_rows(reports: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """The operating points as a table (deterministic: no wall-clock numbers)."""
    header = ["method", "goal", "test acc", "final-exit acc", "avg FLOPs", "exit rates"]
    rows = []
    for key, report in reports.items():
        t = report["test"]
        rows.append(
            [
                key.split("/")[0],
                goal_label(report),
                f"{100 * t['accuracy']:.2f}",
                f"{100 * t['final_exit_accuracy']:.2f}",
                f"{t['avg_flops_fraction']:.3f}",
                " / ".join(f"{r:.2f}" for r in t["exit_rates"]),
            ]
        )
    return header, rows


def speed_rows(reports: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Measured cascade throughput against the full model at each operating point."""
    header = ["method", "goal", "FLOPs speedup", "measured speedup", "cascade ex/s", "full ex/s"]
    rows = []
    for key, report in reports.items():
        sp = report.get("speed")
        if sp:
            rows.append(
                [
                    key.split("/")[0],
                    goal_label(report),
                    f"{sp['flops_speedup']:.2f}x",
                    f"{sp['speedup']:.2f}x",
                    f"{sp['cascade_examples_per_s']:.0f}",
                    f"{sp['full_examples_per_s']:.0f}",
                ]
            )
    return header, rows


def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plot(results: dict[str, dict], task: str, path: str, metric: str = "accuracy") -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, r in results.items():
        xs = [c["fraction"] for c in r["exits"].values()]
        ys = [100 * r["test"][task][e][metric] for e in r["exits"]]
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("FLOPs per example (fraction of the full model)")
    ax.set_ylabel(f"test {METRICS[metric]}, task '{task}'")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    storage.save_figure(fig, path, dpi=120)
    plt.close(fig)


def ordered_runs(config) -> list[str]:
    """The runs' names in the config's `order` (then any others, sorted)."""
    order = [n for n in config.get("order", ()) if n in config.runs]
    return order + sorted(n for n in config.runs if n not in order)


def run_configs(config) -> dict:
    """{run name: its full config}, every one validated before anything trains."""
    configs = {
        name: run_config(config.base, config.runs[name], name) for name in ordered_runs(config)
    }
    for cfg in configs.values():
        config_lib.validate(cfg)
    return configs


def dedicated_runs(configs: dict) -> set[str]:
    """The runs that are a network cut at an exit (`model.cut_at` >= 0): one trained exit."""
    return {name for name, cfg in configs.items() if cfg.model.get("cut_at", -1) >= 0}


def train_runs(configs: dict, workdir: str, only=()) -> tuple[dict, dict]:
    """Trains every run of `configs` in `<workdir>/<name>` (skipping finished ones);
    ({name: results}, {name: training seconds of the runs trained now})."""
    from hisd_jax import train  # noqa: PLC0415

    storage.makedirs(workdir)
    results, times = {}, {}
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
    return results, times


def tables(
    results: dict, reports: dict, task: str, last_only=(), metric="accuracy", cross=None
) -> str:
    """The deterministic tables of one seed (per-exit metric; early-exit operating points, or
    for retrieval the cross-exit MRR of run `cross`) as markdown: what the README shows and
    `tests/test_results.py` checks."""
    text = (
        f"Test {METRICS[metric]} per exit, task '{task}'.\n\n"
        + markdown(*comparison_table(results, task, last_only, metric))
        + "\n"
    )
    if reports:
        text += (
            "\nEarly exit (max-softmax, per-exit temperatures and thresholds fitted on the "
            "validation split; test split):\n\n" + markdown(*early_exit_rows(reports)) + "\n"
        )
    table = cross_exit_rows(results[cross], task) if cross in results else None
    if table:
        text += (
            f"\nCross-exit search ({cross}): test MRR (x100) of queries embedded at one exit "
            "against code embedded at another (the diagonal is each exit's own).\n\n"
            + markdown(*table)
            + "\n"
        )
    return text


def snapshot(
    results: dict, reports: dict, task: str, last_only=(), metric="accuracy", cross=None
) -> dict:
    """What `tables` needs, JSON-ready and small (kept in comparison.json; `hisd_jax.results`
    commits it under results/ so the README's tables can be checked against it)."""
    keep = ("accuracy", "final_exit_accuracy", "avg_flops_fraction", "exit_rates")

    def kept(m: dict) -> dict:  # the metric, and the cross-exit MRRs of a retrieval task
        return {k: v for k, v in m.items() if k == metric or k.startswith("mrr_docs_")}

    return {
        "task": task,
        "metric": metric,
        "cross": cross,
        "last_only": sorted(last_only),
        "results": {
            name: {
                "exits": r["exits"],
                "test": {task: {e: kept(m) for e, m in r["test"][task].items()}},
                # what trained it (commit, packages, devices) and how long it took
                "environment": r.get("environment"),
                "wall_time_s": r.get("train", {}).get("wall_time_s"),
            }
            for name, r in results.items()
        },
        "reports": {
            key: {"goal": r["goal"], "value": r["value"], "test": {k: r["test"][k] for k in keep}}
            for key, r in reports.items()
        },
    }


def format_snapshot(snap: dict) -> str:
    """`tables` of a `snapshot`: the same text the comparison printed."""
    return tables(snap["results"], snap["reports"], snap["task"], set(snap["last_only"]),
                  snap.get("metric", "accuracy"), snap.get("cross"))  # fmt: skip


def compare_one(config, workdir: str, only=()) -> dict:
    """One seed: trains every run (skipping finished ones) and writes the comparison."""
    configs = run_configs(config)
    results, times = train_runs(configs, workdir, only)
    task = config.base.data.tasks[0]
    last_only = dedicated_runs(configs)
    metric = judged_metric(next(iter(results.values())), task)
    cross = config.get("claims", {}).get("method")
    reports = {}
    if metric == "accuracy":  # confidence-based early exit needs class probabilities
        reports = early_exit_reports(
            {name: os.path.join(workdir, name) for name in results if name not in last_only}
        )
    text = tables(results, reports, task, last_only, metric, cross)
    speed = markdown(*speed_rows(reports)) if reports else ""
    jsonio.write_text(
        os.path.join(workdir, "comparison.md"),
        text
        + (
            f"\nMeasured cascade speed on this machine (wall-clock, varies):\n\n{speed}\n"
            if speed
            else ""
        ),
    )
    summary = {
        **snapshot(results, reports, task, last_only, metric, cross),
        "train_seconds": times,
        "environment": provenance.environment(),
    }
    jsonio.write_json(os.path.join(workdir, "comparison.json"), summary)
    plot(results, task, os.path.join(workdir, f"{metric}_vs_flops.png"), metric)
    return {"table": text, "speed": speed, "results": results, "reports": reports,
            "last_only": last_only, "train_seconds": times, "metric": metric,
            "cross": cross}  # fmt: skip


def parse_seeds(values) -> list[int]:
    """--seeds as distinct integers; ConfigError (one line) otherwise."""
    try:
        seeds = [int(v) for v in values]
    except ValueError:
        raise config_lib.ConfigError(
            f"--seeds={','.join(values)} must be integers (e.g. --seeds=0,1,2)"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise config_lib.ConfigError(f"--seeds={','.join(values)} must be distinct")
    return seeds


def mean_se(values) -> tuple[float, float, float]:
    """(mean, sample std (ddof 1; 0 for one value), standard error of the mean)."""
    stats = sweep_lib.mean_std(values)
    std = stats["std"] or 0.0
    return stats["mean"], std, std / math.sqrt(stats["n"])


def differs(a, b) -> tuple[float, float]:
    """(mean(a) - mean(b), Welch standard error of that difference)."""
    (ma, _, sa), (mb, _, sb) = mean_se(a), mean_se(b)
    return ma - mb, math.hypot(sa, sb)


def at_least(claim: str, a, b, evidence: str) -> dict:
    """Verdict on "a >= b" over seeds: reproduced when a's mean is not below b's, not
    reproduced when it is below by more than two standard errors, inconclusive in between."""
    d, se = differs(a, b)
    verdict = "reproduced" if d >= 0 else "not reproduced" if d < -2 * se else "inconclusive"
    return {"claim": claim, "verdict": verdict, "difference": d, "se": se,
            "evidence": f"{evidence}: difference {d:+.2f} (2 SE = {2 * se:.2f})"}  # fmt: skip


def _accuracies(per_seed: dict, run: str, task: str, exit_name: str) -> list[float] | None:
    """Test accuracy (%, or the seeds' metric x100) of `run` at `exit_name` in every seed, or None where it has none (or,
    for a dedicated model, where it is not its trained exit)."""
    out = []
    for r in per_seed.values():
        if run not in r["results"]:
            return None
        acc = trained_accuracy(
            r["results"][run], run, task, exit_name, r.get("last_only", ()),
            r.get("metric", "accuracy"),
        )  # fmt: skip
        if acc is None:
            return None
        out.append(100 * acc)
    return out


def _cell(values, digits: int = 2) -> str:
    return sweep_lib.format_mean_std(sweep_lib.mean_std(values), digits=digits)


def verdicts(config, per_seed: dict, task: str) -> list[dict]:
    """The papers' claims the comparison can test (`config.claims`), each with a verdict and the
    numbers behind it. HiSD: each early exit >= the dedicated model of its depth; the final exit
    not hurt by multi-exit training (>= final-only); early exit at the 1% tolerance keeps >= 99%
    of the final exit's accuracy below the full model's FLOPs. MoSE: a middle exit beats the
    final one (the best middle exit of the `middle_exit` run; reproduced only when above by
    more than two standard errors)."""
    claims = config.get("claims")
    if not claims:
        return []
    method = claims.method
    exits = list(next(iter(per_seed.values()))["results"][method]["exits"])
    final = exits[-1]
    out = []
    for exit_name, dedicated in claims.get("dedicated", {}).items():
        a = _accuracies(per_seed, method, task, exit_name)
        b = _accuracies(per_seed, dedicated, task, exit_name)
        if a and b:
            out.append(at_least(
                f"HiSD: {method}'s {exit_name} matches or beats a dedicated model of the same "
                f"depth ({dedicated})", a, b,
                f"{_cell(a)} vs {_cell(b)} %",
            ))  # fmt: skip
    if claims.get("final_only"):
        a = _accuracies(per_seed, method, task, final)
        b = _accuracies(per_seed, claims.final_only, task, final)
        out.append(at_least(
            f"HiSD: multi-exit training does not hurt the final exit ({method} vs "
            f"{claims.final_only} at {final})", a, b, f"{_cell(a)} vs {_cell(b)} %",
        ))  # fmt: skip
    tol = [r["reports"].get(f"{method}/tol") for r in per_seed.values()]
    if all(tol):
        kept = [100 * t["test"]["accuracy"] / t["test"]["final_exit_accuracy"] for t in tol]
        flops = [t["test"]["avg_flops_fraction"] for t in tol]
        mean, _, se = mean_se(kept)
        cheaper = max(flops) < 1
        verdict = (
            "reproduced" if mean >= 99 and cheaper
            else "not reproduced" if mean + 2 * se < 99 or not cheaper
            else "inconclusive"
        )  # fmt: skip
        out.append({
            "claim": f"HiSD: early exit ({method}, 1% tolerance fitted on validation) keeps >= 99% "
            "of the final exit's test accuracy at a fraction of the FLOPs",
            "verdict": verdict, "difference": mean - 99, "se": se,
            "evidence": f"accuracy kept {_cell(kept)} % (2 SE = {2 * se:.2f}) at "
            f"{_cell(flops, 3)} of the full model's FLOPs",
        })  # fmt: skip
    run = claims.get("middle_exit")
    if run:
        finals = _accuracies(per_seed, run, task, final)
        middles = {e: _accuracies(per_seed, run, task, e) for e in exits[1:-1]}
        best = max(middles, key=lambda e: mean_se(middles[e])[0])
        d, se = differs(middles[best], finals)
        verdict = (
            "reproduced" if d > 2 * se else "not reproduced" if d < -2 * se else "inconclusive"
        )
        out.append({
            "claim": f"MoSE: a middle exit beats the final one ({run}, its best middle exit "
            f"{best} vs {final})",
            "verdict": verdict, "difference": d, "se": se,
            "evidence": f"{_cell(middles[best])} vs {_cell(finals)} %: difference {d:+.2f} "
            f"(2 SE = {2 * se:.2f})",
        })  # fmt: skip
    return out


def format_seeds(stored: dict) -> str:
    """`seeds_summary`'s markdown from a seeds.json (its per-seed snapshots and claims)."""
    import ml_collections  # noqa: PLC0415

    per_seed = {int(s): snap for s, snap in stored["per_seed"].items()}
    task = next(iter(per_seed.values()))["task"]
    config = ml_collections.ConfigDict(
        {"base": {"data": {"tasks": (task,)}}, "claims": stored.get("claims") or {}}
    )
    for snap in per_seed.values():
        snap["last_only"] = set(snap["last_only"])
    return seeds_summary(config, per_seed)["markdown"]


def seeds_summary(config, per_seed: dict) -> dict:
    """Mean ± std over seeds of every (run, exit) test accuracy and of the early-exit operating
    points; cells more than two standard errors from `claims.method`'s marked †; the verdicts.
    Returns {"seeds", "per_exit", "early_exit", "verdicts", "markdown"}."""
    task = config.base.data.tasks[0]
    seeds = list(per_seed)
    first = next(iter(per_seed.values()))["results"]
    runs = list(first)
    reference = max(first.values(), key=lambda r: len(r["exits"]))
    method = config.get("claims", {}).get("method")
    header = ["exit", "FLOPs", "fraction", *runs]
    rows, per_exit = [], {}
    for exit_name, cost in reference["exits"].items():
        row = [exit_name, f"{cost['flops'] / 1e6:.2f}M", f"{cost['fraction']:.3f}"]
        ref = _accuracies(per_seed, method, task, exit_name) if method else None
        for run in runs:
            acc = _accuracies(per_seed, run, task, exit_name)
            if acc is None:
                row.append("")
                continue
            per_exit[f"{run}/{exit_name}"] = acc
            mark = ""
            if ref is not None and run != method:
                d, se = differs(acc, ref)
                mark = " †" if abs(d) > 2 * se else ""
            row.append(_cell(acc) + mark)
        rows.append(row)
    ee_header = ["method", "goal", "test acc", "final-exit acc", "kept (%)", "avg FLOPs",
                 "exit rates (mean)"]  # fmt: skip
    ee_rows, early = [], {}
    for key in next(iter(per_seed.values()))["reports"]:
        reps = [r["reports"][key]["test"] for r in per_seed.values()]
        acc = [100 * t["accuracy"] for t in reps]
        fin = [100 * t["final_exit_accuracy"] for t in reps]
        kept = [100 * t["accuracy"] / t["final_exit_accuracy"] for t in reps]
        flops = [t["avg_flops_fraction"] for t in reps]
        rates = np.mean([t["exit_rates"] for t in reps], axis=0)
        early[key] = {"accuracy": acc, "final_exit_accuracy": fin, "kept": kept,
                      "avg_flops_fraction": flops, "exit_rates": rates.tolist()}  # fmt: skip
        ee_rows.append([
            key.split("/")[0], goal_label(per_seed[seeds[0]]["reports"][key]), _cell(acc),
            _cell(fin), _cell(kept), _cell(flops, 3),
            " / ".join(f"{r:.2f}" for r in rates),
        ])  # fmt: skip
    found = verdicts(config, per_seed, task)
    text = (
        f"Test {METRICS[next(iter(per_seed.values())).get('metric', 'accuracy')]} per exit, "
        f"task '{task}', mean ± std over seeds "
        f"{', '.join(map(str, seeds))}"
        + (f"; † differs from {method} by more than two standard errors" if method else "")
        + ".\n\n"
        + markdown(header, rows)
    )
    if ee_rows:
        text += (
            "\n\nEarly exit (fitted on validation, test split), mean ± std over seeds:\n\n"
            + markdown(ee_header, ee_rows)
        )
    if found:
        text += (
            "\n\nVerdicts (a claim a >= b is reproduced when mean(a) >= mean(b), not reproduced "
            "when a is below b by more than two standard errors, inconclusive in between; a claim "
            "a > b is reproduced only when a is above b by more than two standard errors):\n\n"
        ) + markdown(
            ["claim", "verdict", "evidence"],
            [[v["claim"], f"**{v['verdict']}**", v["evidence"]] for v in found],
        )
    return {"seeds": seeds, "per_exit": per_exit, "early_exit": early, "verdicts": found,
            "markdown": text}  # fmt: skip


def seed_config(config, seed: int):
    """`config` with the base experiment's seed set to `seed`."""
    config = copy.deepcopy(config)
    config.unlock()
    config.base.seed = seed
    config.lock()
    return config


def compare(config, workdir: str, only=(), seeds=None) -> dict:
    """`compare_one`, or with `seeds` one comparison per seed in `<workdir>/seed_<s>` and the
    summary over seeds (`seeds_summary`, written to `<workdir>/seeds.md` and `seeds.json`)."""
    if not seeds:
        return compare_one(config, workdir, only)
    configs = {s: seed_config(config, s) for s in seeds}
    for c in configs.values():
        run_configs(c)  # every seed's every run checked before the first trains
    per_seed = {
        s: compare_one(c, os.path.join(workdir, f"seed_{s}"), only) for s, c in configs.items()
    }
    summary = seeds_summary(config, per_seed)
    jsonio.write_text(os.path.join(workdir, "seeds.md"), summary["markdown"] + "\n")
    task = config.base.data.tasks[0]
    jsonio.write_json(
        os.path.join(workdir, "seeds.json"),
        {
            **summary,
            "claims": config.claims.to_dict() if "claims" in config else {},
            "environment": provenance.environment(),
            "per_seed": {
                str(s): snapshot(
                    o["results"], o["reports"], task, o["last_only"], o["metric"], o["cross"]
                )  # fmt: skip
                for s, o in per_seed.items()
            },
        },
    )
    return {"table": summary["markdown"], "speed": None, "summary": summary,
            "train_seconds": {s: out["train_seconds"] for s, out in per_seed.items()}}  # fmt: skip


def main(argv):
    del argv
    cli.quiet_library_info()
    parallel.maybe_initialize_distributed()
    logging.set_verbosity(logging.WARNING)
    t0 = time.perf_counter()
    try:
        seeds = parse_seeds(FLAGS.seeds)
        storage.check_url(FLAGS.workdir)
        out = compare(FLAGS.config, FLAGS.workdir, FLAGS.only, seeds)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    print(out["table"])
    if out["speed"]:
        print(f"Measured cascade speed on this machine (wall-clock, varies):\n\n{out['speed']}")
    written = "seeds.md" if seeds else "comparison.md"
    print(f"\nwall time {time.perf_counter() - t0:.0f}s; written to {FLAGS.workdir}/{written}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_config_flags)
