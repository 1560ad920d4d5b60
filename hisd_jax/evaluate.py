"""Early-exit evaluation of a trained workdir.

  python -m hisd_jax.evaluate --workdir DIR --policy max_softmax [--tolerance 0.01 | --budget 0.5]

Loads DIR/config.json and the latest checkpoint, runs the model once over the validation
and test splits collecting every exit's logits, and then, on the host:
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
     full model (same batch size, after warm-up).
It prints a table, writes DIR/early_exit.json and DIR/early_exit.png (accuracy against
average compute for a shared threshold swept over the validation confidences, the chosen
operating point marked). `early_exit_report(workdir, ...)` does the same from Python.
"""

import argparse
import json
import math
import os
import time

import jax
import ml_collections
import numpy as np

from hisd_jax import parallel, train
from hisd_jax import config as config_lib
from hisd_jax.data import eval_batches
from hisd_jax.inference import calibration, cascade, policies, thresholds
from hisd_jax.inference import cost as cost_lib

GOAL_DEFAULT = ("tolerance", 0.01)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The workdir's config.json; fields added to `base_config` since the run take defaults."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))

    def fill(stored, defaults):
        for key, value in defaults.items():
            if key not in stored:
                stored[key] = value
            elif isinstance(value, ml_collections.ConfigDict) and isinstance(
                stored[key], ml_collections.ConfigDict
            ):
                fill(stored[key], value)

    fill(config, config_lib.base_config())
    return config


def load_workdir(workdir: str):
    """(Experiment, variables {'params', 'batch_stats'}) of a workdir's latest checkpoint.

    Only what inference needs is taken from the checkpoint (not the optimizer or MTL
    strategy state); its structure is checked against the model of config.json.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415

    exp = train.build_experiment(load_config(workdir))
    replicated = parallel.replicated(exp.mesh)
    like = jax.eval_shape(lambda: train.init_state(exp))
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    with ocp.CheckpointManager(directory, item_names=("state",)) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        saved = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    variables = {}
    for key in ("params", "batch_stats"):
        got = saved.state.get(key) or {}
        if jax.tree.structure(got) != jax.tree.structure(getattr(like, key)):
            raise ValueError(
                f"checkpoint {key} in {directory} do not match the model of config.json"
            )
        variables[key] = jax.tree.map(lambda x: jax.device_put(np.asarray(x), replicated), got)
    return exp, variables


def split_arrays(exp, split: str, label_key: str):
    """Host images [N, ...] and labels [N] of a whole split (read once, in order)."""
    images, labels = [], []
    for batch in eval_batches(exp.dataset.splits[split], exp.config.train.eval_batch_size):
        real = batch["mask"] > 0
        images.append(batch["image"][real])
        labels.append(batch[label_key][real])
    return np.concatenate(images), np.concatenate(labels)


_PIECES = {}


def _piece_flops(model, variables, image_shape):
    """`cost.piece_flops`, compiled once per (model, input shape) in this process."""
    key = (model, image_shape)
    if key not in _PIECES:
        _PIECES[key] = cost_lib.piece_flops(model, variables, image_shape)
    return _PIECES[key]


def _task(exp, task):
    info = exp.tasks[0] if task is None else next((t for t in exp.tasks if t.name == task), None)
    if info is None:
        raise ValueError(f"task {task!r} is not one of {', '.join(t.name for t in exp.tasks)}")
    if info.kind != "classification":
        raise ValueError(f"early exit needs a classification task; {info.name!r} is {info.kind}")
    return info


def _goal(tolerance, budget):
    if tolerance is not None and budget is not None:
        raise ValueError("give either tolerance or budget, not both")
    if budget is not None:
        return "budget", float(budget)
    return ("tolerance", float(tolerance)) if tolerance is not None else GOAL_DEFAULT


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
    means tolerance 0.01. `exp` and `variables` (as `load_workdir` returns them) may be passed
    to skip loading the workdir.
    """
    t0 = time.perf_counter()
    if policy not in cascade.POLICIES:
        raise ValueError(f"Unknown policy {policy!r}; allowed: {', '.join(cascade.POLICIES)}.")
    goal, value = _goal(tolerance, budget)
    if exp is None or variables is None:
        exp, variables = load_workdir(workdir)
    info = _task(exp, task)
    model, names = exp.model, list(exp.exit_names)
    num_exits = len(names)

    # One forward per split collecting every exit's logits.
    data = {}
    for split in ("val", "test"):
        images, labels = split_arrays(exp, split, info.label_key)
        logits = cascade.all_exit_logits(model, variables, images, info.name, batch_size)
        data[split] = {"images": images, "labels": labels, "logits": logits}
    t_forward = time.perf_counter() - t0

    pieces = _piece_flops(model, variables, tuple(exp.dataset.image_shape))
    costs = cost_lib.exit_costs(pieces)
    cost = costs["cascade_fraction"]

    temps = np.ones(num_exits)
    if calibrate:
        temps = calibration.fit_temperatures(data["val"]["logits"], data["val"]["labels"])
    calib = {"temperatures": temps, "applied": bool(calibrate and policy != "patience")}
    for split, d in data.items():
        rep = calibration.calibration_report(d["logits"], d["labels"], temps)
        calib[split] = {"ece_before": rep["ece_before"], "ece_after": rep["ece_after"]}
    used_temps = temps if calib["applied"] else np.ones(num_exits)

    for d in data.values():
        z = d["logits"].astype(np.float64)
        d["preds"] = z.argmax(-1)
        d["correct"] = d["preds"] == d["labels"][None]
        if policy != "patience":
            d["conf"] = policies.confidence(z / used_temps[:, None, None], policy)
    val, test = data["val"], data["test"]
    reference = {s: float(d["correct"][-1].mean()) for s, d in data.items()}

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
    t_fit = time.perf_counter() - t0 - t_forward

    summary = {}
    for split, d in data.items():
        exit_idx, preds, _ = cascade.mask_policy(
            d["logits"], policy, temperatures=used_temps, **rule
        )
        d["exit_idx"], d["policy_preds"] = exit_idx, preds
        summary[split] = _split_summary(exit_idx, preds, d["labels"], cost, reference[split])
    summary["val"]["feasible"] = fit["feasible"]

    speed = None
    if measure_speed:
        t1 = time.perf_counter()
        runner = cascade.Cascade(
            model,
            variables,
            info.name,
            policy,
            batch_size=batch_size,
            buckets=buckets,
            min_bucket=min_bucket,
            pieces=pieces,
        )
        out = runner(test["images"], temperatures=used_temps, **rule)
        speed = cascade.measure_speed(
            runner, test["images"], temperatures=used_temps, repeats=speed_repeats, **rule
        )
        speed.update(
            flops_speedup=1.0 / summary["test"]["avg_flops_fraction"],
            cascade_avg_flops_fraction=out["flops_per_example"] / costs["full"],
            cascade_padded_flops_fraction=out["padded_flops_per_example"] / costs["full"],
            agreement_exits=float(np.mean(out["exit_idx"] == test["exit_idx"])),
            agreement_preds=float(np.mean(out["preds"] == test["policy_preds"])),
            cascade_accuracy=float(np.mean(out["preds"] == test["labels"])),
            stage_sizes=out["stage_sizes"],
            wall_s=time.perf_counter() - t1,
        )

    per_exit = {
        "val_accuracy": val["correct"].mean(axis=1),
        "test_accuracy": test["correct"].mean(axis=1),
        "flops": costs["standalone"],
        "standalone_fraction": costs["fraction"],
        "cascade_flops": costs["cascade"],
        "cascade_fraction": costs["cascade_fraction"],
        "segment_flops": pieces["segments"],
        "head_flops": pieces["heads"],
    }
    report = {
        "workdir": os.path.abspath(workdir),
        "name": exp.config.name,
        "task": info.name,
        "policy": policy,
        "goal": goal,
        "value": value,
        "search": search if policy != "patience" else None,
        "exits": names,
        "full_flops": costs["full"],
        "per_exit": per_exit,
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
    if plot:
        png = os.path.join(workdir, "early_exit.png")
        plot_tradeoff(report, png)
        report["plot"] = png
    if write:
        path = os.path.join(workdir, "early_exit.json")
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(path + ".tmp", path)
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_report(r: dict) -> str:
    """The report as a text table."""
    names = r["exits"]
    pe, cal = r["per_exit"], r["calibration"]
    lines = [
        f"{r['name']} ({r['workdir']}): task {r['task']}, policy {r['policy']}, "
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m hisd_jax.evaluate", description="Early-exit evaluation of a workdir."
    )
    p.add_argument("--workdir", required=True, help="trained workdir (config.json + checkpoints/)")
    p.add_argument("--policy", default="max_softmax", choices=cascade.POLICIES)
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--tolerance", type=float, help="accuracy drop allowed (default 0.01)")
    goal.add_argument("--budget", type=float, help="average compute, fraction of the full model")
    p.add_argument("--no_calibrate", dest="calibrate", action="store_false",
                   help="no per-exit temperature scaling")  # fmt: skip
    p.add_argument("--task", help="task whose exits are evaluated (default: the first)")
    p.add_argument("--search", default="per_exit", choices=thresholds.SEARCHES)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--buckets", default="pow2", choices=cascade.BUCKETS)
    p.add_argument("--speed_repeats", type=int, default=3, help="timed passes of each model")
    p.add_argument("--no_speed", dest="speed", action="store_false",
                   help="skip the throughput measurement")  # fmt: skip
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    report = early_exit_report(
        args.workdir,
        args.policy,
        args.tolerance,
        args.budget,
        args.calibrate,
        task=args.task,
        search=args.search,
        batch_size=args.batch_size,
        buckets=args.buckets,
        measure_speed=args.speed,
        speed_repeats=args.speed_repeats,
    )
    print(format_report(report))
    print(f"\nwrote {os.path.join(args.workdir, 'early_exit.json')} and {report['plot']}")


if __name__ == "__main__":
    main()
