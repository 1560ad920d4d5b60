"""Standalone models cut at one exit, and a per-exit cost table.

  python -m hisd_jax.export --workdir DIR --exit exit1 --out DIR2
  python -m hisd_jax.export --workdir DIR --report

The first writes into DIR2 a model that stops at one exit and needs nothing of this code base:
  params.npz        only the parameters and BatchNorm statistics that exit needs: segments
                    0..e and head e without its projection (a subset of the tree of
                    `build_model(..., cut_at=e)`), keyed by '/'-joined paths;
  model.jaxexport   the inference function `(params, images [B, H, W, C] float32) ->
                    {task: logits [B, C]}` serialized with `jax.export` (batch size symbolic);
  meta.json         exit, tasks, input shape, parameter count, platforms and how to run it.
Loading needs only jax and numpy:

    exported = jax.export.deserialize(bytearray(open("model.jaxexport", "rb").read()))
    params = dict(np.load("params.npz"))
    logits = exported.call(params, images)  # {task: [B, C]}

Inputs are the data set's preprocessed images (what the training pipeline feeds the model).

--report prints for every exit its parameter count, FLOPs, test accuracy, latency per batch and
peak memory (the compiled program's argument + output + temporary bytes from XLA's memory
analysis) and writes DIR/export_report.json; it combines with --exit and --out. A bad flag, or a
workdir or exit that cannot be used, ends with one line on stderr and exit code 2.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hisd_jax import cli
from hisd_jax import jsonio, storage
from hisd_jax.inference import cascade
from hisd_jax.inference import cost as cost_lib
from hisd_jax.models import build_model, labels, model_section
from hisd_jax.workdir import load_workdir, split_arrays

FLAGS = flags.FLAGS
PROG = "hisd_jax.export"
SEP = "/"
MODEL_FILE, PARAMS_FILE = "model.jaxexport", "params.npz"
PLATFORMS = ("cpu", "cuda", "tpu")


def exit_index(exp, exit_name) -> int:
    names = list(exp.exit_names)
    if isinstance(exit_name, int) or str(exit_name).isdigit():
        e = int(exit_name)
    elif exit_name in names:
        e = names.index(exit_name)
    else:
        raise ValueError(f"exit {exit_name!r} is not one of {', '.join(names)}")
    if not 0 <= e < len(names):
        raise ValueError(f"exit index {e} is not in 0..{len(names) - 1}")
    return e


def cut_model(exp, e: int):
    """The model cut at exit e (`build_model(..., cut_at=e)`)."""
    return build_model(model_section(exp.config), exp.tasks, cut_at=e, dataset=exp.dataset)


def _subset(full, like, path=()):
    """The entries of `full` at the paths of `like` (nested dicts), checking leaf shapes."""
    if not isinstance(like, dict):
        if tuple(full.shape) != tuple(like.shape):
            raise ValueError(f"{SEP.join(path)}: shape {full.shape} != cut model's {like.shape}")
        return full
    return {k: _subset(full[k], v, (*path, k)) for k, v in like.items()}


def cut_variables(exp, variables, e: int, standalone: bool = True) -> dict:
    """Variables of the model cut at exit e, taken from the trained full model's.

    The subset follows the cut model's tree (`jax.eval_shape` of its init) without the exit
    heads' feature projections, which only training uses. `standalone=True` keeps only what
    exit e's own prediction needs (segments 0..e and head e); False also keeps heads 0..e-1,
    which the cut model's `__call__` evaluates.
    """
    model = cut_model(exp, e)
    x = jax.ShapeDtypeStruct((1, *exp.dataset.image_shape), exp.dataset.input_dtype)
    like = jax.eval_shape(model.init, jax.random.key(0), x)
    param_labels = model.param_labels(like["params"])

    def needed(label):
        if standalone:
            return labels.needed_by_exit(label, e)
        return labels.role(label) != labels.PROJ and labels.exit_of(label) <= e

    # Other collections (BatchNorm statistics) follow the top-level entries params keep.
    keep = {k for k, sub in param_labels.items() if any(map(needed, jax.tree.leaves(sub)))}
    full = jax.device_get(variables)
    out = {}
    for col, tree in like.items():
        if col == "params":
            tree = labels.select(tree, param_labels, needed)
        else:
            tree = {k: v for k, v in tree.items() if k in keep}
        if tree:
            out[col] = _subset(full[col], tree, (col,))
    return out


def flatten(tree, prefix=()) -> dict:
    """Nested dicts of arrays -> {'a/b/c': array}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, (*prefix, k)))
        else:
            out[SEP.join((*prefix, k))] = v
    return out


def unflatten(flat: dict) -> dict:
    out = {}
    for key, v in flat.items():
        *parents, leaf = key.split(SEP)
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def standalone_fn(model, e: int):
    """``(flat_variables, images) -> {task: logits}`` of exit e alone: segments 0..e, head e."""
    cls = type(model)

    def fn(flat, x):
        variables = unflatten(flat)
        for i in range(e + 1):
            x = model.apply(variables, i, x, method=cls.run_segment)
        return model.apply(variables, e, x, method=cls.run_head)["logits"]

    return fn


def param_count(flat: dict) -> int:
    """Parameters (not BatchNorm statistics) in a flat variables dict."""
    return int(sum(np.size(v) for k, v in flat.items() if k.startswith("params" + SEP)))


def export_exit(workdir: str, exit_name, out_dir: str, *, exp=None, variables=None) -> dict:
    """Writes exit `exit_name`'s standalone model to `out_dir` (see the module docstring).

    Returns the meta dict that is also written to meta.json.
    """
    if exp is None or variables is None:
        exp, variables = load_workdir(workdir)
    e = exit_index(exp, exit_name)
    model = cut_model(exp, e)
    flat = {k: np.asarray(v) for k, v in flatten(cut_variables(exp, variables, e)).items()}
    fn = jax.jit(standalone_fn(model, e))
    (b,) = jax.export.symbolic_shape("b")
    image_shape = tuple(exp.dataset.image_shape)
    specs = (
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()},
        jax.ShapeDtypeStruct((b, *image_shape), exp.dataset.input_dtype),
    )
    try:
        exported = jax.export.export(fn, platforms=PLATFORMS)(*specs)
    except Exception:  # noqa: BLE001 - a backend's lowering is missing: this platform only
        exported = jax.export.export(fn)(*specs)
    storage.makedirs(out_dir)
    serialized = exported.serialize()
    storage.write_atomic(
        os.path.join(out_dir, MODEL_FILE), lambda f: f.write(serialized), binary=True
    )
    storage.write_atomic(
        os.path.join(out_dir, PARAMS_FILE), lambda f: np.savez(f, **flat), binary=True
    )
    meta = {
        "source_workdir": storage.absolute(workdir),
        "name": exp.config.name,
        "exit": exp.exit_names[e],
        "exit_index": e,
        "num_exits_full_model": len(exp.exit_names),
        "tasks": {t.name: t.num_outputs for t in exp.tasks},
        "input": {"shape": ["batch", *image_shape], "dtype": exp.dataset.input_dtype},
        "params": param_count(flat),
        "variables": len(flat),
        "platforms": list(exported.platforms),
        "files": [MODEL_FILE, PARAMS_FILE, "meta.json"],
        "usage": (
            "exported = jax.export.deserialize(bytearray(open('model.jaxexport', 'rb').read())); "
            "params = dict(np.load('params.npz')); logits = exported.call(params, images)"
        ),
    }
    jsonio.write_json(os.path.join(out_dir, "meta.json"), meta)
    return meta


def _latency(compiled, args, repeats=20, warmup=3):
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def exit_report(
    workdir: str, batch_size: int = 256, split: str = "test", *, exp=None, variables=None
):
    """Per exit where the first task has a head (`model.task_exits`; every exit by default):
    parameters, FLOPs (and fraction of the full model), accuracy (a retrieval task: MRR, over the
    whole split) on `split`, latency per batch of
    `batch_size` (median after warm-up) and peak memory of the compiled standalone model
    (argument + output + temporary bytes)."""
    if exp is None or variables is None:
        exp, variables = load_workdir(workdir)
    task = exp.tasks[0]
    images, labels = split_arrays(exp, split, task.label_key)
    pieces = cost_lib.piece_flops(
        exp.model, variables, exp.dataset.image_shape, exp.dataset.input_dtype
    )
    costs = cost_lib.exit_costs(pieces)
    logits = cascade.all_exit_logits(exp.model, variables, images, task.name)
    x = cascade._pad_rows(images[:batch_size], batch_size)
    kind = task.task_kind
    metric = "accuracy" if kind.has_confidence else "mrr" if kind.split_metrics else None
    whole_split = {}  # a metric of the whole split's outputs (retrieval: MRR per exit)
    if kind.split_metrics is not None:
        outputs = np.stack([np.asarray(z) for z in logits], axis=1)
        whole_split = kind.split_metrics(outputs, [exp.exit_names[e] for e in task.exits])
    rows = []
    for e, name in enumerate(exp.exit_names):
        if e not in task.exits:  # no head of the task here: nothing to cut a model at
            continue
        flat = flatten(cut_variables(exp, variables, e))
        flat = {k: jnp.asarray(v) for k, v in flat.items()}
        compiled = jax.jit(standalone_fn(cut_model(exp, e), e)).lower(flat, x).compile()
        mem = compiled.memory_analysis()
        peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        row = {
            "exit": name,
            "params": param_count(flat),
            "flops": float(costs["standalone"][e]),
            "fraction": float(costs["fraction"][e]),
            "latency_ms": 1e3 * _latency(compiled, (flat, x)),
            "peak_memory_bytes": int(peak),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
        }
        if kind.has_confidence:
            z = logits[list(task.exits).index(e)]
            row[f"{split}_accuracy"] = float(np.mean(z.argmax(-1) == labels))
        elif name in whole_split:
            row[f"{split}_mrr"] = whole_split[name]["mrr"]
        rows.append(row)
    report = {"workdir": storage.absolute(workdir), "task": task.name, "batch_size": batch_size,
              "split": split, "metric": metric, "exits": rows}  # fmt: skip
    jsonio.write_json(os.path.join(workdir, "export_report.json"), report)
    return report


def format_exit_report(report: dict) -> str:
    split = report["split"]
    metric = report.get("metric") or "accuracy"
    label = f"{split} {'acc' if metric == 'accuracy' else metric}"
    lines = [
        f"{report['workdir']}: standalone model per exit (task {report['task']}, batch "
        f"{report['batch_size']})",
        f"{'exit':<8}{'params':>10}{'FLOPs':>12}{'fraction':>10}{label:>10}"
        f"{'latency ms':>12}{'peak MiB':>10}",
    ]
    for r in report["exits"]:
        acc = r.get(f"{split}_{metric}", float("nan"))
        lines.append(
            f"{r['exit']:<8}{r['params']:>10d}{r['flops']:>12.4g}{r['fraction']:>10.3f}"
            f"{acc:>10.4f}{r['latency_ms']:>12.3f}{r['peak_memory_bytes'] / 2**20:>10.2f}"
        )
    return "\n".join(lines)


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so that importing this
    module defines no flags next to another entry point's)."""
    flags.DEFINE_string("workdir", None, "Trained workdir (config.json + checkpoints/).")
    flags.DEFINE_string("exit", None, "Exit name (exit0, ...) or index to export.")
    flags.DEFINE_string("out", None, "Output directory of the standalone model.")
    flags.DEFINE_bool("report", False, "Print every exit's costs (and write export_report.json).")
    flags.DEFINE_integer("batch_size", 256, "Batch of the latency report.", lower_bound=1)
    flags.mark_flag_as_required("workdir")
    flags.register_multi_flags_validator(["exit", "out", "report"], _check_outputs)


def _check_outputs(values: dict) -> bool:
    if values["exit"] is not None and values["out"] is None:
        raise flags.ValidationError("--exit needs --out")
    if values["exit"] is None and not values["report"]:
        raise flags.ValidationError("give --exit and --out, or --report")
    return True


def main(argv):
    cli.quiet_library_info()
    if len(argv) > 1:
        cli.fail(PROG, f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        exp, variables = load_workdir(FLAGS.workdir)
        if FLAGS.exit is not None:
            meta = export_exit(FLAGS.workdir, FLAGS.exit, FLAGS.out, exp=exp, variables=variables)
            print(
                f"exported {meta['exit']} ({meta['params']} parameters, platforms "
                f"{', '.join(meta['platforms'])}) to {FLAGS.out}"
            )
        if FLAGS.report:
            report = exit_report(FLAGS.workdir, FLAGS.batch_size, exp=exp, variables=variables)
            print(format_exit_report(report))
    except cli.user_errors() as e:  # no workdir, unknown --exit, a damaged workdir, ...
        cli.fail(PROG, e)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.flags_parser(PROG))
