"""Early-exit evaluation of a trained workdir.

  python -m hisd_jax.evaluate --workdir DIR --policy max_softmax [--tolerance 0.01 | --budget 0.5]

Loads DIR/config.json and the latest checkpoint (`workdir.load_workdir`), runs the model once
over the validation and test splits collecting every exit's logits, and then, on the host:
  1. fits one temperature per exit on validation data (unless --nocalibrate) and reports
     each exit's ECE before and after scaling;
  2. fits the policy's thresholds (or the patience) on validation data for the goal:
     --tolerance t: least average compute with accuracy >= final-exit accuracy - t;
     --budget b: best accuracy with average compute <= b (a fraction of the full model's
     FLOPs); the default is --tolerance 0.01;
  3. applies them to the test data: accuracy, exit rates, average FLOPs fraction (the
     cascade cost of exiting at e is segments <= e + heads <= e, from XLA's cost analysis);
  4. runs the compacting cascade (`inference/cascade.py`) on the test set, checks that it
     agrees with the mask-based policy, and measures its wall-clock throughput against the
     full model (same batch size, after warm-up; --nospeed skips this step).
It prints a table, writes DIR/early_exit.json and DIR/early_exit.png (accuracy against
average compute for a shared threshold swept over the validation confidences, the chosen
operating point marked). `early_exit_report(workdir, ...)` does the same from Python.
A bad flag, or a workdir or task that cannot be used, ends with one line on stderr and exit
code 2.
"""

import math
import os
import time

import numpy as np
from absl import app, flags

from hisd_jax import cli
from hisd_jax import jsonio, storage
from hisd_jax.inference import calibration, cascade, policies, thresholds
from hisd_jax.inference import cost as cost_lib
from hisd_jax.workdir import load_workdir, split_arrays

FLAGS = flags.FLAGS
PROG = "hisd_jax.evaluate"
GOAL_DEFAULT = ("tolerance", 0.01)
SPLITS = ("val", "test")  # fitted on the first, reported on both


_PIECES = {}


def _piece_flops(model, variables, image_shape, dtype="float32"):
    """`cost.piece_flops`, compiled once per (model, input shape and dtype) in this process."""
    key = (model, image_shape, dtype)
    if key not in _PIECES:
        _PIECES[key] = cost_lib.piece_flops(model, variables, image_shape, dtype)
    return _PIECES[key]


def _task(exp, task):
    info = exp.tasks[0] if task is None else next((t for t in exp.tasks if t.name == task), None)
    if info is None:
        raise ValueError(f"task {task!r} is not one of {', '.join(t.name for t in exp.tasks)}")
    if not info.task_kind.has_confidence:
        raise ValueError(f"early exit needs a classification task; {info.name!r} is {info.kind}")
    own = [exp.exit_names[e] for e in info.exits]
    if len(own) < 2:
        raise ValueError(
            f"early exit needs a task with heads on at least two exits; {info.name!r} has one "
            f"({', '.join(own)}, model.task_exits)"
        )
    return info


def _goal(tolerance, budget):
    """("tolerance", t) with t in [0, 1] or ("budget", b) with b in (0, 1]; ValueError (one
    line naming the flag) otherwise."""
    if tolerance is not None and budget is not None:
        raise ValueError("give either tolerance or budget, not both")
    if budget is not None:
        budget = float(budget)
        if not (math.isfinite(budget) and 0 < budget <= 1):
            raise ValueError(
                f"--budget={budget!r} must be a fraction of the full model's FLOPs in (0, 1]"
            )
        return "budget", budget
    if tolerance is None:
        return GOAL_DEFAULT
    tolerance = float(tolerance)
    if not (math.isfinite(tolerance) and 0 <= tolerance <= 1):
        raise ValueError(f"--tolerance={tolerance!r} must be an accuracy drop in [0, 1]")
    return "tolerance", tolerance


def _jsonable(x):
    """Plain JSON: arrays to lists, numpy scalars to Python, +-inf to the strings 'inf'/'-inf'."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")
    return x


def _split_summary(exit_idx, preds, labels, cost, reference):
    s = policies.summarize(exit_idx, preds, labels, cost)
    return {
        "accuracy": s["accuracy"],
        "final_exit_accuracy": reference,
        "accuracy_drop": reference - s["accuracy"],
        "exit_rates": s["exit_rates"],
        "avg_flops_fraction": s["avg_cost"],
    }


def collect_logits(exp, variables, task: str, label_key: str, batch_size: int) -> dict:
    """One forward pass per split collecting every exit's logits.

    Returns {split: {'images' [N, ...], 'labels' [N], 'logits' [E, N, C]}} for val and test.
    """
    data = {}
    for split in SPLITS:
        images, labels = split_arrays(exp, split, label_key)
        logits = cascade.all_exit_logits(exp.model, variables, images, task, batch_size)
        data[split] = {"images": images, "labels": labels, "logits": logits}
    return data


def calibrate_exits(data: dict, policy: str, calibrate: bool) -> tuple[dict, np.ndarray]:
    """Temperature scaling per exit, fitted on validation (all ones without `calibrate`).

    Returns the report's 'calibration' section (temperatures, whether the policy applies them
    (patience ignores confidences), ECE before/after per split) and the temperatures the
    policy uses.
    """
    num_exits = data["val"]["logits"].shape[0]
    temps = np.ones(num_exits)
    if calibrate:
        temps = calibration.fit_temperatures(data["val"]["logits"], data["val"]["labels"])
    calib = {"temperatures": temps, "applied": bool(calibrate and policy != "patience")}
    for split, d in data.items():
        rep = calibration.calibration_report(d["logits"], d["labels"], temps)
        calib[split] = {"ece_before": rep["ece_before"], "ece_after": rep["ece_after"]}
    return calib, temps if calib["applied"] else np.ones(num_exits)


def add_predictions(data: dict, policy: str, temperatures: np.ndarray) -> None:
    """Adds to each split's entry 'preds' and 'correct' [E, N] of every exit and, for a
    threshold policy, 'conf' [E, N], the confidences of the temperature-scaled logits."""
    for d in data.values():
        z = d["logits"].astype(np.float64)
        d["preds"] = z.argmax(-1)
        d["correct"] = d["preds"] == d["labels"][None]
        if policy != "patience":  # in the cascade's arithmetic (float32), see the function
            d["conf"] = policies.cascade_confidence(d["logits"], policy, temperatures)


def fit_policy(data: dict, policy: str, cost, goal: str, value: float, search: str):
    """Fits the policy's thresholds (or patience) on validation for the goal.

    Returns (fit, rule, curves): `thresholds.fit_*`'s result, the rule as keyword arguments
    of `cascade.mask_policy` / `Cascade` ({'thresholds': ...} or {'patience': ...}), and per
    split the accuracy/compute trade-off curve of the rule's family.
    """
    val = data["val"]
    if policy == "patience":
        fit = thresholds.fit_patience(val["preds"], val["correct"], cost, goal=goal, value=value)
        rule = {"patience": fit["patience"]}
        curves = {
            s: thresholds.patience_outcomes(d["preds"], d["correct"], cost) for s, d in data.items()
        }
    else:
        fit = thresholds.fit_thresholds(
            val["conf"], val["correct"], cost, goal=goal, value=value, search=search
        )
        rule = {"thresholds": fit["thresholds"]}
        curves = {
            s: thresholds.tradeoff_curve(d["conf"], d["correct"], cost) for s, d in data.items()
        }
    return fit, rule, curves


def summarize_splits(data: dict, policy: str, rule: dict, temperatures, cost, feasible) -> dict:
    """Applies the fitted rule to each split (mask-based): accuracy, final-exit accuracy, drop,
    exit rates, average FLOPs fraction. Adds each split's 'exit_idx' and 'policy_preds' to
    `data`; the validation summary records whether the fit met the goal."""
    summary = {}
    for split, d in data.items():
        exit_idx, preds, _ = cascade.mask_policy(
            d["logits"], policy, temperatures=temperatures, **rule
        )
        d["exit_idx"], d["policy_preds"] = exit_idx, preds
        reference = float(d["correct"][-1].mean())
        summary[split] = _split_summary(exit_idx, preds, d["labels"], cost, reference)
    summary["val"]["feasible"] = feasible
    return summary


def measure_cascade(
    exp,
    variables,
    task: str,
    policy: str,
    test: dict,
    rule: dict,
    temperatures,
    pieces: dict,
    costs: dict,
    test_flops_fraction: float,
    *,
    batch_size: int,
    buckets: str,
    min_bucket: int,
    repeats: int,
) -> dict:
    """Runs the compacting cascade on the test split: its wall-clock throughput against the
    full model (`cascade.measure_speed`), the FLOPs it ran, and its agreement with the
    mask-based policy (`test` must hold 'exit_idx' and 'policy_preds')."""
    t0 = time.perf_counter()
    runner = cascade.Cascade(
        exp.model,
        variables,
        task,
        policy,
        batch_size=batch_size,
        buckets=buckets,
        min_bucket=min_bucket,
        pieces=pieces,
    )
    out = runner(test["images"], temperatures=temperatures, **rule)
    speed = cascade.measure_speed(
        runner, test["images"], temperatures=temperatures, repeats=repeats, **rule
    )
    speed.update(
        flops_speedup=1.0 / test_flops_fraction,
        cascade_avg_flops_fraction=out["flops_per_example"] / costs["full"],
        cascade_padded_flops_fraction=out["padded_flops_per_example"] / costs["full"],
        agreement_exits=float(np.mean(out["exit_idx"] == test["exit_idx"])),
        agreement_preds=float(np.mean(out["preds"] == test["policy_preds"])),
        cascade_accuracy=float(np.mean(out["preds"] == test["labels"])),
        stage_sizes=out["stage_sizes"],
        wall_s=time.perf_counter() - t0,
    )
    return speed


def per_exit_table(data: dict, costs: dict, pieces: dict) -> dict:
    """The report's 'per_exit' section: each exit's accuracy alone and its costs."""
    return {
        "val_accuracy": data["val"]["correct"].mean(axis=1),
        "test_accuracy": data["test"]["correct"].mean(axis=1),
        "flops": costs["standalone"],
        "standalone_fraction": costs["fraction"],
        "cascade_flops": costs["cascade"],
        "cascade_fraction": costs["cascade_fraction"],
        "segment_flops": costs["stage_segments"],
        "head_flops": costs["heads"],
    }


def write_outputs(report: dict, workdir: str, *, write: bool, plot: bool) -> None:
    """The plot (its path recorded in `report['plot']`) and early_exit.json, as asked."""
    if plot:
        png = os.path.join(workdir, "early_exit.png")
        plot_tradeoff(report, png)
        report["plot"] = png
    if write:
        jsonio.write_json(os.path.join(workdir, "early_exit.json"), report)


def early_exit_report(
    workdir: str,
    policy: str = "max_softmax",
    tolerance: float | None = None,
    budget: float | None = None,
    calibrate: bool = True,
    *,
    task: str | None = None,
    search: str = "per_exit",
    batch_size: int = 256,
    buckets: str = "pow2",
    min_bucket: int = 8,
    measure_speed: bool = True,
    speed_repeats: int = 3,
    write: bool = True,
    plot: bool = True,
    exp=None,
    variables=None,
) -> dict:
    """Fits an early-exit policy on the validation split of a trained workdir and reports it on
    the test split (see the module docstring). Returns a JSON-ready dict, also written to
    ``workdir/early_exit.json`` (and the plot to ``early_exit.png``) when `write`/`plot`.

    `policy`: max_softmax, margin, neg_entropy or patience. Exactly one of `tolerance` (accuracy
    drop allowed vs the final exit) or `budget` (fraction of the full model's FLOPs); neither
    means tolerance 0.01. `exp` and `variables` (as `workdir.load_workdir` returns them) may be
    passed to skip loading the workdir.
    """
    t0 = time.perf_counter()
    if policy not in cascade.POLICIES:
        raise ValueError(f"Unknown policy {policy!r}; allowed: {', '.join(cascade.POLICIES)}.")
    goal, value = _goal(tolerance, budget)
    step = None  # the checkpoint's step, when loaded here
    if exp is None or variables is None:
        exp, variables, step = load_workdir(workdir, with_step=True)
    info = _task(exp, task)
    data = collect_logits(exp, variables, info.name, info.label_key, batch_size)
    t_forward = time.perf_counter() - t0

    pieces = _piece_flops(
        exp.model, variables, tuple(exp.dataset.image_shape), exp.dataset.input_dtype
    )
    costs = cost_lib.exit_costs(pieces, info.exits)  # over the task's own exits
    cost = costs["cascade_fraction"]
    calib, temps = calibrate_exits(data, policy, calibrate)
    add_predictions(data, policy, temps)
    fit, rule, curves = fit_policy(data, policy, cost, goal, value, search)
    t_fit = time.perf_counter() - t0 - t_forward

    summary = summarize_splits(data, policy, rule, temps, cost, fit["feasible"])
    speed = None
    if measure_speed:
        speed = measure_cascade(
            exp,
            variables,
            info.name,
            policy,
            data["test"],
            rule,
            temps,
            pieces,
            costs,
            summary["test"]["avg_flops_fraction"],
            batch_size=batch_size,
            buckets=buckets,
            min_bucket=min_bucket,
            repeats=speed_repeats,
        )

    report = {
        "workdir": storage.absolute(workdir),
        "name": exp.config.name,
        "task": info.name,
        "checkpoint_step": step,
        "policy": policy,
        "goal": goal,
        "value": value,
        "search": search if policy != "patience" else None,
        "exits": [exp.exit_names[e] for e in info.exits],
        "full_flops": costs["full"],
        "per_exit": per_exit_table(data, costs, pieces),
        "calibration": calib,
        **rule,
        "val": summary["val"],
        "test": summary["test"],
        "speed": speed,
        "curves": curves,
        "timing_s": {
            "load_and_forward": t_forward,
            "flops_calibration_fit": t_fit,
            "speed": speed["wall_s"] if speed else 0.0,
            "total": time.perf_counter() - t0,
        },
        "num_examples": {s: int(d["labels"].shape[0]) for s, d in data.items()},
    }
    report = _jsonable(report)
    write_outputs(report, workdir, write=write, plot=plot)
    return report


def plot_tradeoff(report: dict, path: str) -> None:
    """Accuracy against average compute: the validation and test curves (every threshold of a
    shared sweep, or every patience), each exit alone, and the chosen operating point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for split, style in (("val", "--"), ("test", "-")):
        c = report["curves"][split]
        ax.plot(c["avg_cost"], c["accuracy"], style, marker=".", ms=3, label=f"{split} sweep")
    pe = report["per_exit"]
    ax.scatter(pe["standalone_fraction"], pe["test_accuracy"], marker="s", c="gray", zorder=3,
               label="each exit alone (test)")  # fmt: skip
    for name, x, y in zip(report["exits"], pe["standalone_fraction"], pe["test_accuracy"]):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    for split, face in (("val", "none"), ("test", "red")):
        s = report[split]
        ax.scatter([s["avg_flops_fraction"]], [s["accuracy"]], marker="*", s=220, zorder=4,
                   facecolors=face, edgecolors="red", label=f"chosen ({split})")  # fmt: skip
    if report["goal"] == "tolerance":
        ax.axhline(report["val"]["final_exit_accuracy"] - report["value"], color="gray", lw=0.8,
                   ls=":", label=f"val final - {report['value']:g}")  # fmt: skip
    else:
        ax.axvline(
            report["value"], color="gray", lw=0.8, ls=":", label=f"budget {report['value']:g}"
        )
    ax.set_xlabel("average compute (fraction of the full model's FLOPs)")
    ax.set_ylabel(f"accuracy ({report['task']})")
    ax.set_title(f"{report['name']}: {report['policy']}, {report['goal']} {report['value']:g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    storage.save_figure(fig, path, dpi=120)
    plt.close(fig)


def format_report(r: dict) -> str:
    """The report as a text table."""
    names = r["exits"]
    pe, cal = r["per_exit"], r["calibration"]
    lines = [
        f"{r['name']} ({r['workdir']}"
        + (f", step {r['checkpoint_step']}" if r.get("checkpoint_step") is not None else "")
        + f"): task {r['task']}, policy {r['policy']}, "
        f"goal {r['goal']} {r['value']:g}, calibrated {cal['applied']}",
        "",
        f"{'exit':<8}{'val acc':>9}{'test acc':>9}{'FLOPs':>12}{'alone':>8}{'cascade':>9}"
        f"{'T':>7}{'ECE val':>15}{'ECE test':>15}"
        + ("" if r["policy"] == "patience" else f"{'threshold':>11}"),
    ]
    for e, name in enumerate(names):
        row = (
            f"{name:<8}{pe['val_accuracy'][e]:>9.4f}{pe['test_accuracy'][e]:>9.4f}"
            f"{pe['flops'][e]:>12.4g}{pe['standalone_fraction'][e]:>8.3f}"
            f"{pe['cascade_fraction'][e]:>9.3f}{cal['temperatures'][e]:>7.3f}"
            f"{cal['val']['ece_before'][e]:>7.4f}->{cal['val']['ece_after'][e]:<6.4f}"
            f"{cal['test']['ece_before'][e]:>7.4f}->{cal['test']['ece_after'][e]:<6.4f}"
        )
        if r["policy"] != "patience":
            t = r["thresholds"][e]
            row += (
                f"{'final' if e == len(names) - 1 else 'never' if t == 'inf' else f'{t:.4f}':>11}"
            )
        lines.append(row)
    if r["policy"] == "patience":
        lines.append(f"patience {r['patience']}")
    lines += [
        "",
        f"{'split':<6}{'accuracy':>9}{'final':>8}{'drop':>8}{'avg FLOPs':>10}  exit rates ("
        + " ".join(names)
        + ")",
    ]
    for split in ("val", "test"):
        s = r[split]
        lines.append(
            f"{split:<6}{s['accuracy']:>9.4f}{s['final_exit_accuracy']:>8.4f}"
            f"{s['accuracy_drop']:>8.4f}{s['avg_flops_fraction']:>10.3f}  "
            + " ".join(f"{x:.3f}" for x in s["exit_rates"])
        )
    if not r["val"]["feasible"]:
        lines.append("note: no setting met the goal on validation data; the closest is shown")
    sp = r["speed"]
    if sp:
        lines += [
            "",
            f"cascade vs full model on test ({sp['examples']} examples, batch {sp['batch_size']}, "
            f"buckets {sp['buckets']}, best of repeats after warm-up):",
            f"  full {sp['full_s'] * 1e3:.1f} ms ({sp['full_examples_per_s']:.0f} ex/s), cascade "
            f"{sp['cascade_s'] * 1e3:.1f} ms ({sp['cascade_examples_per_s']:.0f} ex/s): measured "
            f"speedup {sp['speedup']:.2f}x, FLOPs speedup {sp['flops_speedup']:.2f}x "
            f"(padded buckets {1 / sp['cascade_padded_flops_fraction']:.2f}x)",
            f"  agreement with the mask-based policy: exits {sp['agreement_exits']:.4f}, "
            f"predictions {sp['agreement_preds']:.4f}",
        ]
    return "\n".join(lines)


# Spellings of the argparse version of this command, still accepted.
RENAMED_FLAGS = {"--no_calibrate": "--nocalibrate", "--no_speed": "--nospeed"}


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so that importing this
    module, e.g. from `compare`, defines no flags next to another entry point's)."""
    flags.DEFINE_string("workdir", None, "Trained workdir (config.json + checkpoints/).")
    flags.DEFINE_enum("policy", "max_softmax", cascade.POLICIES, "Early-exit policy.")
    flags.DEFINE_float("tolerance", None, "Accuracy drop allowed vs the final exit (default 0.01).")
    flags.DEFINE_float("budget", None, "Average compute, a fraction of the full model's FLOPs.")
    flags.DEFINE_bool(
        "calibrate", True, "Per-exit temperature scaling; --nocalibrate (or --no_calibrate): none."
    )
    flags.DEFINE_string("task", None, "Task whose exits are evaluated (default: the first).")
    flags.DEFINE_enum("search", "per_exit", thresholds.SEARCHES, "Threshold search.")
    flags.DEFINE_integer("batch_size", 256, "Batch size of the forward passes.", lower_bound=1)
    flags.DEFINE_enum("buckets", "pow2", cascade.BUCKETS, "Bucket sizes of the cascade.")
    flags.DEFINE_integer("speed_repeats", 3, "Timed passes of each model.", lower_bound=1)
    flags.DEFINE_bool(
        "speed", True, "Measure the cascade's throughput; --nospeed (or --no_speed): skip it."
    )
    flags.mark_flag_as_required("workdir")
    flags.mark_flags_as_mutual_exclusive(["tolerance", "budget"])


def main(argv):
    cli.quiet_library_info()
    if len(argv) > 1:
        cli.fail(PROG, f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        report = early_exit_report(
            FLAGS.workdir,
            FLAGS.policy,
            FLAGS.tolerance,
            FLAGS.budget,
            FLAGS.calibrate,
            task=FLAGS.task,
            search=FLAGS.search,
            batch_size=FLAGS.batch_size,
            buckets=FLAGS.buckets,
            measure_speed=FLAGS.speed,
            speed_repeats=FLAGS.speed_repeats,
        )
    except cli.user_errors() as e:  # no workdir, unknown --task, a damaged workdir, ...
        cli.fail(PROG, e)
    print(format_report(report))
    print(f"\nwrote {os.path.join(FLAGS.workdir, 'early_exit.json')} and {report['plot']}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.flags_parser(PROG, RENAMED_FLAGS))
