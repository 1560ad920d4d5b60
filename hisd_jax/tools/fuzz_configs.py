"""Malformed configs and command lines through every entry point, judged as a user would.

  python -m hisd_jax.tools.fuzz_configs [--limit N] [--jobs 2] [--timeout 10]

Each case runs one command (`python -m hisd_jax.<entry> ...`) in a fresh process on a workdir
that does not exist yet, and meets the bar when it ends with a non-zero exit code within
`--timeout` seconds, prints exactly one line on stderr that names the field, flag or file at
fault (the case's expected words), and leaves the workdir uncreated. The cases:

  * every field of `config.base_config()` given a value of the wrong type (a word for a
    number, a fraction for an integer, a word for a boolean, a number for a tuple);
  * values of the right type that are invalid (negative counts, NaN and infinite rates,
    out-of-range probabilities, unknown names, inconsistent shapes...), including every
    example of issue #14's config list;
  * unknown fields and config variants, config files that do not exist, do not parse or raise;
  * bad flags and missing or unusable workdirs for evaluate, export, sweep, bench, plots.

Prints one line per case that misses the bar and then the count, e.g. `112/112 cases: non-zero
exit, one line naming the field or file, workdir untouched, under 10 s`. Exit code 0 when
every case meets the bar, 1 otherwise. (A valid value given by mistake would train: it is cut
at the timeout and reported.)
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from hisd_jax import config as config_lib

CONFIG = "configs/hisd_multidigits.py"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Right type, wrong value: (field, value, words the one line must contain).
INVALID_VALUES = [
    ("seed", "-1", "seed"),
    ("seed", "2147483648", "seed"),
    ("data.name", "imagenet_xl", "data.name"),
    ("data.seed", "-1", "data.seed"),
    ("data.tasks", "()", "data.tasks"),
    ("data.tasks", "('sum','sum')", "data.tasks"),
    ("data.tasks", "('nope',)", "nope"),
    ("model.name", "vgg", "model.name"),
    ("model.width", "0", "model.width"),
    ("model.width", "-4", "model.width"),
    ("model.stage_sizes", "(1,0,1)", "model.stage_sizes"),
    ("model.stage_sizes", "('a','b')", "model.stage_sizes"),
    ("model.strides", "(1,3,2)", "model.strides"),
    ("model.exits", "(0,3)", "model.exits"),
    ("model.exits", "(2,1,3)", "model.exits"),
    ("model.cut_at", "7", "model.cut_at"),
    ("model.cut_at", "-2", "model.cut_at"),
    ("model.head_pool", "0", "model.head_pool"),
    ("model.head_pool", "50", "model.head_pool"),
    ("model.head_hidden", "(0,)", "model.head_hidden"),
    ("model.stem_features", "-3", "model.stem_features"),
    ("model.norm", "layer_norm_x", "model.norm"),
    ("model.stem", "nope", "model.stem"),
    ("model.dtype", "float8", "model.dtype"),
    ("objective.preset", "bogus", "objective.preset"),
    ("objective.kd", "-1.0", "objective.kd"),
    ("objective.hier", "nan", "objective.hier"),
    ("objective.feat", "-0.5", "objective.feat"),
    ("objective.temperature", "0.0", "objective.temperature"),
    ("objective.temperature", "inf", "objective.temperature"),
    ("objective.ce", "(1.0,1.0)", "objective.ce"),
    ("objective.ce", "(1.0,-1.0,1.0,1.0)", "objective.ce"),
    ("objective.similarity_temperature", "0.0", "objective.similarity_temperature"),
    ("objective.similarity_temperature", "nan", "objective.similarity_temperature"),
    ("model.embed_dim", "-1", "model.embed_dim"),
    ("mesh.fsdp", "3", "mesh"),
    ("mesh.data", "0", "mesh.data"),
    ("mesh.fsdp", "-2", "mesh.fsdp"),
    ("mesh.min_shard_size", "0", "mesh.min_shard_size"),
    ("mesh.rules", "(('x','sideways'),)", "mesh.rules"),
    ("mesh.rules", "(('(','fsdp'),)", "mesh.rules"),
    ("mtl.method", "bogus", "mtl.method"),
    ("mtl.space", "both", "mtl.space"),
    ("mtl.backward", "sideways", "mtl.backward"),
    ("optimizer.name", "lion9", "optimizer.name"),
    ("optimizer.schedule", "exponential", "optimizer.schedule"),
    ("optimizer.step_fractions", "(0.7,0.2)", "optimizer.step_fractions"),
    ("optimizer.step_factor", "0", "optimizer.step_factor"),
    ("data.augment", "mixup", "data.augment"),
    ("data.crop_padding", "-1", "data.crop_padding"),
    ("optimizer.lr", "0.0", "optimizer.lr"),
    ("optimizer.lr", "-1e-3", "optimizer.lr"),
    ("optimizer.lr", "nan", "optimizer.lr"),
    ("optimizer.lr", "inf", "optimizer.lr"),
    ("optimizer.momentum", "-1.0", "optimizer.momentum"),
    ("optimizer.momentum", "nan", "optimizer.momentum"),
    ("optimizer.momentum", "1.0", "optimizer.momentum"),
    ("optimizer.weight_decay", "-0.1", "optimizer.weight_decay"),
    ("optimizer.grad_clip", "-1.0", "optimizer.grad_clip"),
    ("optimizer.warmup_steps", "-1", "optimizer.warmup_steps"),
    ("optimizer.warmup_steps", "5000", "optimizer.warmup_steps"),
    ("train.steps", "0", "train.steps"),
    ("train.steps", "-5", "train.steps"),
    ("train.batch_size", "0", "train.batch_size"),
    ("train.eval_batch_size", "-1", "train.eval_batch_size"),
    ("train.log_every", "0", "train.log_every"),
    ("train.eval_every", "-1", "train.eval_every"),
    ("train.checkpoint_every", "0", "train.checkpoint_every"),
    ("train.keep_checkpoints", "0", "train.keep_checkpoints"),
    ("program.name", "bogus", "program.name"),
    # another program's settings, under the standard program (ignored silently before)
    ("program.budget", "x", "program.budget"),
    ("program.inner_state", "y", "program.inner_state"),
    ("program.rho", "0.0", "program.rho"),
    ("program.alpha_steps", "0", "program.alpha_steps"),
    ("program.label_dtype", "int3", "program.label_dtype"),
    ("program.patience", "0", "program.patience"),
    ("program.hard_weight", "2.0", "program.hard_weight"),
    # fields whose default is None (the preset's value): any wrong type
    ("objective.ce", "('a','b','c','d')", "objective.ce"),
    ("objective.ce", "abc", "objective.ce"),
    ("objective.kd", "abc", "objective.kd"),
    ("objective.hier", "(1,2)", "objective.hier"),
    ("objective.feat", "abc", "objective.feat"),
    ("objective.temperature", "abc", "objective.temperature"),
]
WRONG_TYPE = {  # a value of the wrong type for each kind of field
    "int": "abc",
    "float": "abc",
    "bool": "maybe",
    "tuple": "((1,2),)",  # nested ("12" is read as the valid 1-tuple (12,))
}
# free text (any string is a valid experiment name), and program settings that only their
# program reads (the hisd config trains the standard program)
SKIP_TYPE = ("name", "program.order", "program.weight_clamp")


def config_cases() -> list[tuple[str, list[str], str]]:
    """(label, argv after `python -m`, expected words) for the trainer."""
    main = ["hisd_jax.main", f"--config={CONFIG}"]
    cases = []
    for field, value, words in INVALID_VALUES:
        cases.append((f"{field}={value}", [*main, f"--config.{field}={value}"], words))
    for field, kind in _fields(config_lib.base_config()):
        if field in SKIP_TYPE or kind not in WRONG_TYPE:
            continue
        value = WRONG_TYPE[kind]
        cases.append((f"{field}={value} (type)", [*main, f"--config.{field}={value}"], field))
    cases += [
        ("unknown field", [*main, "--config.model.nope=1"], "model.nope"),
        ("unknown section", [*main, "--config.nope.x=1"], "nope"),
        ("bad variant", ["hisd_jax.main", f"--config={CONFIG}:bogus=1"], "bogus"),
        ("variant type", ["hisd_jax.main", f"--config={CONFIG}:seed=abc"], "seed"),
        (
            "variant value",
            ["hisd_jax.main", "--config=configs/kd_multidigits.py:noise=-1"],
            "noise",
        ),
        (
            "alphavil budget",
            ["hisd_jax.main", "--config=configs/alphavil_multidigits.py:budget=x"],
            "budget",
        ),
        (
            "retrieval on a CNN",
            ["hisd_jax.main", "--config=configs/mose_pycode.py", "--config.model.name=resnet"],
            "transformer",
        ),
        (
            "KD from converged tasks on retrieval",
            ["hisd_jax.main", "--config=configs/mose_pycode.py", "--config.program.name=kd_joint"],
            "retrieval",
        ),
        (
            "image augmentation on tokens",
            [
                "hisd_jax.main",
                "--config=configs/pycode_classify.py",
                "--config.data.augment=crop_flip",
            ],
            "data.augment",
        ),
        ("missing file", ["hisd_jax.main", "--config=configs/nope.py"], "nope.py"),
        ("syntax error", ["hisd_jax.main", "--config={tmp}/bad_syntax.py"], "bad_syntax.py"),
        ("name error", ["hisd_jax.main", "--config={tmp}/bad_name.py"], "NameError"),
        ("import error", ["hisd_jax.main", "--config={tmp}/bad_import.py"], "no_such_module_xyz"),
        ("no config", ["hisd_jax.main"], "config"),
        ("empty workdir", [*main, "--workdir="], "--workdir"),
        ("workdir is a file", [*main, "--workdir={tmp}/afile"], "--workdir"),
        ("workdir under a file", [*main, "--workdir={tmp}/afile/sub"], "--workdir"),
        ("workdir URL scheme", [*main, "--workdir=ftp://host/run"], "--workdir"),
    ]
    return cases


def command_cases() -> list[tuple[str, list[str], str]]:
    """The other entry points: evaluate, export, sweep, compare, results, bench, plots."""
    none = "{tmp}/no_such_run"
    return [
        ("evaluate no workdir", ["hisd_jax.evaluate", f"--workdir={none}"], "config.json"),
        ("evaluate policy", ["hisd_jax.evaluate", "--workdir=x", "--policy=nope"], "--policy"),
        (
            "evaluate tolerance",
            ["hisd_jax.evaluate", "--workdir=x", "--tolerance=-1"],
            "--tolerance",
        ),
        (
            "evaluate tolerance nan",
            ["hisd_jax.evaluate", "--workdir=x", "--tolerance=nan"],
            "--tolerance",
        ),
        ("evaluate budget", ["hisd_jax.evaluate", "--workdir=x", "--budget=0"], "--budget"),
        (
            "evaluate both",
            ["hisd_jax.evaluate", "--workdir=x", "--budget=0.5", "--tolerance=0.1"],
            "one of",
        ),
        ("evaluate batch", ["hisd_jax.evaluate", "--workdir=x", "--batch_size=0"], "--batch_size"),
        ("evaluate stray", ["hisd_jax.evaluate", "--workdir=x", "stray"], "stray"),
        ("export no workdir", ["hisd_jax.export", f"--workdir={none}", "--report"], "config.json"),
        ("export no out", ["hisd_jax.export", "--workdir=x", "--exit=exit1"], "--out"),
        ("export nothing", ["hisd_jax.export", "--workdir=x"], "--exit"),
        (
            "export batch",
            ["hisd_jax.export", "--workdir=x", "--report", "--batch_size=0"],
            "--batch_size",
        ),
        (
            "sweep judge",
            [
                "hisd_jax.sweep",
                f"--config={CONFIG}",
                "--workdir={tmp}/sw",
                "--judge=up",
                "--methods=ew",
            ],
            "--judge",
        ),
        (
            "sweep shard",
            [
                "hisd_jax.sweep",
                f"--config={CONFIG}",
                "--workdir={tmp}/sw",
                "--shard=2/2",
                "--methods=ew",
            ],
            "--shard",
        ),
        (
            "sweep method",
            ["hisd_jax.sweep", f"--config={CONFIG}", "--workdir={tmp}/sw", "--methods=bogus"],
            "bogus",
        ),
        (
            "sweep seeds",
            [
                "hisd_jax.sweep",
                f"--config={CONFIG}",
                "--workdir={tmp}/sw",
                "--seeds=1,1",
                "--methods=ew",
            ],
            "--seeds",
        ),
        (
            "compare seeds",
            [
                "hisd_jax.compare",
                "--config=configs/compare_multidigits.py",
                "--workdir={tmp}/cmp",
                "--seeds=0,a",
            ],
            "--seeds",
        ),
        (
            "compare seeds twice",
            [
                "hisd_jax.compare",
                "--config=configs/compare_multidigits.py",
                "--workdir={tmp}/cmp",
                "--seeds=1,1",
            ],
            "--seeds",
        ),
        (
            "compare variant",
            [
                "hisd_jax.compare",
                "--config=configs/compare_multidigits.py:steps=-5x",
                "--workdir={tmp}/cmp",
            ],
            "steps",
        ),
        ("results only", ["hisd_jax.results", "--only=nope"], "--only"),
        (
            "bench config",
            ["hisd_jax.bench", f"--config={CONFIG}", "--config.train.steps=0"],
            "train.steps",
        ),
        ("plots kind", ["hisd_jax.plots", "--workdirs={tmp}", "--kind=nope"], "metrics.jsonl"),
        ("plots workdirs", ["hisd_jax.plots", f"--workdirs={none}"], "--workdirs"),
    ]


def _fields(d, prefix=""):
    for key, value in d.items():
        path = f"{prefix}{key}"
        if hasattr(value, "items"):
            yield from _fields(value, path + ".")
        else:
            yield path, type(value).__name__


def run_case(label, argv, words, tmp, timeout):
    """(label, ok, why) after running one case in a fresh process."""
    workdir = os.path.join(tmp, "wd_" + str(abs(hash(label))))
    argv = [a.replace("{tmp}", tmp) for a in argv]
    if argv[0] == "hisd_jax.main" and not any(a.startswith("--workdir") for a in argv):
        argv.append(f"--workdir={workdir}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return label, False, f"still running after {timeout:g} s (a valid value?)"
    seconds = time.perf_counter() - t0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    problems = []
    if proc.returncode == 0:
        problems.append("exit code 0")
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr: {' | '.join(lines[-3:])[:300]}")
    elif words.lower() not in lines[0].lower():
        problems.append(f"the line does not name {words!r}: {lines[0][:200]}")
    if os.path.exists(workdir):
        problems.append("the workdir was created")
    if seconds > timeout:
        problems.append(f"{seconds:.1f} s")
    return label, not problems, "; ".join(problems)


def _prepare(tmp):
    with open(os.path.join(tmp, "bad_syntax.py"), "w") as f:
        f.write("def get_config(:\n    pass\n")
    with open(os.path.join(tmp, "bad_name.py"), "w") as f:
        f.write("def get_config():\n    return undefined_name\n")
    with open(os.path.join(tmp, "bad_import.py"), "w") as f:
        f.write("import no_such_module_xyz\n\n\ndef get_config():\n    return None\n")
    with open(os.path.join(tmp, "afile"), "w") as f:
        f.write("a file\n")


def fuzz(limit: int | None = None, jobs: int = 2, timeout: float = 10.0) -> tuple[int, list, int]:
    """Runs the cases; returns (count meeting the bar, [(label, why) of the others], total)."""
    cases = config_cases() + command_cases()
    if limit:
        cases = cases[:limit]
    with tempfile.TemporaryDirectory() as tmp:
        _prepare(tmp)
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(lambda c: run_case(*c, tmp, timeout), cases))
    failed = [(label, why) for label, ok, why in results if not ok]
    return len(results) - len(failed), failed, len(results)


def main(argv):
    del argv
    ok, failed, total = fuzz(FLAGS.limit or None, FLAGS.jobs, FLAGS.timeout)
    for label, why in failed:
        print(f"MISS {label}: {why}")
    print(
        f"{ok}/{total} cases: non-zero exit, one line naming the field or file, workdir "
        f"untouched, under {FLAGS.timeout:g} s"
    )
    sys.exit(0 if not failed else 1)


FLAGS = flags.FLAGS

if __name__ == "__main__":
    flags.DEFINE_integer("limit", 0, "Run only the first N cases (0: all).")
    flags.DEFINE_integer("jobs", 2, "Cases run at once.")
    flags.DEFINE_float("timeout", 10.0, "Seconds a case may take.")
    app.run(main)
