"""Figures from workdirs.

  python -m hisd_jax.plots --workdirs runs/kd_ew,runs/kd_joint,runs/kd_seq --out kd_curves.png
  python -m hisd_jax.plots --kind alphavil --workdirs runs/av --out alphavil_weights.png

`kd_curves`: one panel per task, its judging metric on the validation split (the first of
`mtl.metrics`, at the task's deepest exit) against the training step, one line per workdir,
with a marker where KD from converged tasks declared the task converged and switched it to its
soft labels (`results.json` "kd" entry; runs of other programs have no markers).

`alphavil_weights`: αVIL's task weights w and fitted α per task against the αVIL epoch (the
paper's Figure 3), one row per workdir, from the `alphavil/weight/<task>` and
`alphavil/alpha/<task>` training events (means over each log interval; the αVIL configs log
every epoch).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from hisd_jax import cli, jsonio, storage
from hisd_jax import data as data_lib
from hisd_jax.mtl.tasks import task_specs
from hisd_jax.workdir import load_config

PROG = "hisd_jax.plots"


def _events(workdir: str) -> list[dict]:
    text = storage.read_text(os.path.join(workdir, "metrics.jsonl"))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def judging_metrics(config) -> dict[str, tuple[str, bool]]:
    """{task: (metric, higher is better)} judging each task (its `TaskSpec`'s first metric)."""
    dataset = data_lib.get_dataset(config.data.name, seed=config.data.seed, **config.data.kwargs)
    return {s.name: next(iter(s.metrics.items())) for s in task_specs(config, dataset.tasks)}


def validation_curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """{task: [(step, value of its judging metric at its deepest exit)]} from metrics.jsonl."""
    out, events = {}, _events(workdir)
    for task, (metric, _) in judging_metrics(load_config(workdir)).items():
        points = {}
        for e in events:
            if e["split"] != "val":
                continue
            keys = [k for k in e if k.startswith(f"{task}/exit") and k.endswith(f"/{metric}")]
            if keys:  # the deepest exit the task has
                points[e["step"]] = e[max(keys, key=lambda k: int(k.split("/")[1][4:]))]
        out[task] = sorted(points.items())
    return out


def _label(workdir: str) -> str:
    """A workdir's legend entry: its name, or method/seedN for a sweep's run directory."""
    parent, name = os.path.split(os.path.normpath(workdir))
    if name.startswith("seed") and name[4:].isdigit():
        return f"{os.path.basename(parent)}/{name}"
    return name


def kd_curves(workdirs: list[str], out: str) -> None:
    """The figure of the module docstring, written to `out` (PNG)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    curves = {w: validation_curves(w) for w in workdirs}
    tasks = list(next(iter(curves.values())))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False)
    for w in workdirs:
        label = _label(w)
        results_path = os.path.join(w, "results.json")
        converged = {}
        if storage.exists(results_path):
            converged = jsonio.read_json(results_path).get("kd", {}).get("converged_step", {})
        for ax, task in zip(axes[0], tasks):
            steps_values = curves[w].get(task, [])
            if not steps_values:
                continue
            xs, ys = zip(*steps_values)
            (line,) = ax.plot(xs, ys, label=label, lw=1.2)
            step = converged.get(task)
            if step is not None and step in xs:
                ax.plot([step], [ys[xs.index(step)]], "o", color=line.get_color(), ms=7)
    judging = judging_metrics(load_config(workdirs[0]))
    for ax, task in zip(axes[0], tasks):
        metric, higher = judging[task]
        ax.set_title(f"{task} ({metric}, {'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("validation curves; o = converged, switched to its soft labels", fontsize=10)
    fig.tight_layout()
    storage.save_figure(fig, out, dpi=110)
    plt.close(fig)


def alphavil_histories(workdir: str) -> dict:
    """{"weight": {task: [w after epoch 1, 2, ...]}, "alpha": {task: [α fitted in epoch 1,
    2, ...]}} of an αVIL run: from results.json (the program state's histories) when the run
    has finished, else from metrics.jsonl, whose epoch-e point holds the values in use during
    epoch e, i.e. after epoch e - 1 (the last epoch's update is then not yet known)."""
    path = os.path.join(workdir, "results.json")
    if storage.exists(path):
        av = jsonio.read_json(path).get("alphavil") or {}
        if av.get("weight_history"):
            return {"weight": av["weight_history"], "alpha": av["alpha_history"]}
    events = [e for e in _events(workdir) if e["split"] == "train" and "loss" in e]
    out = {}
    for kind in ("weight", "alpha"):
        keys = sorted(k for k in (events[0] if events else {}) if k.startswith(f"alphavil/{kind}/"))
        out[kind] = {k.split("/")[-1]: [e[k] for e in events[1:]] for k in keys}
    return out


def alphavil_weights(workdirs: list[str], out: str) -> None:
    """The αVIL figure of the module docstring, written to `out` (PNG): per run, the task
    weights w from their start (1 at epoch 0) to after the last epoch, and the α fitted in
    each epoch (`alphavil_histories`)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(
        len(workdirs), 2, figsize=(9, 3.0 * len(workdirs)), squeeze=False, sharex="row"
    )
    for row, w in zip(axes, workdirs):
        histories = alphavil_histories(w)
        for ax, kind in zip(row, ("weight", "alpha")):
            for task, values in sorted(histories[kind].items()):
                if kind == "weight":  # from the start, w = 1 before the first update
                    xs, ys = range(len(values) + 1), [1.0, *values]
                else:
                    xs, ys = range(1, len(values) + 1), values
                ax.plot(list(xs), ys, label=task, lw=1.2)
            title = "task weight w after each epoch" if kind == "weight" else "α fitted each epoch"
            ax.set_title(f"{_label(w)}: {title}", fontsize=9)
            ax.set_xlabel("αVIL epoch")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    storage.save_figure(fig, out, dpi=110)
    plt.close(fig)


FIGURES = {"kd": kd_curves, "alphavil": alphavil_weights}


def main(argv):
    cli.quiet_library_info()
    if len(argv) > 1:
        cli.fail(PROG, f"unexpected arguments: {' '.join(argv[1:])}")
    workdirs = [w for w in flags.FLAGS.workdirs.split(",") if w]
    try:
        missing = [w for w in workdirs if not storage.exists(os.path.join(w, "metrics.jsonl"))]
    except OSError as e:
        cli.fail(PROG, f"--workdirs: {e}")
    if not workdirs or missing:
        cli.fail(PROG, f"--workdirs: no metrics.jsonl in {', '.join(missing) or '(none given)'}")
    if flags.FLAGS.kind not in FIGURES:
        cli.fail(PROG, f"--kind={flags.FLAGS.kind!r} is not one of {', '.join(FIGURES)}")
    try:
        FIGURES[flags.FLAGS.kind](workdirs, flags.FLAGS.out)
    except OSError as e:
        cli.fail(PROG, f"--out={flags.FLAGS.out}: {e.strerror or e}")
    print(f"wrote {flags.FLAGS.out}")


if __name__ == "__main__":
    flags.DEFINE_string("workdirs", None, "Comma-separated training workdirs.", required=True)
    flags.DEFINE_string("out", "kd_curves.png", "The PNG to write.")
    flags.DEFINE_string("kind", "kd", "The figure: kd (validation curves), alphavil (weights).")
    app.run(main, flags_parser=cli.flags_parser(PROG))
