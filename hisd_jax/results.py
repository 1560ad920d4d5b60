"""Every results table of the README, regenerated from its run directories by one command.

  python -m hisd_jax.results --list            each table: its command, expected wall time, state
  python -m hisd_jax.results                   regenerate the tables whose runs are all there
  python -m hisd_jax.results --run             also run what is missing (finished runs are skipped)
  python -m hisd_jax.results --only main,main_seeds --run

A table's command is the comparison or sweep that produced it (`hisd_jax.compare`,
`hisd_jax.sweep`); both skip finished runs and resume interrupted ones, so `--run` trains only
what is missing. Regenerating copies the command's summary (comparison.json, seeds.json or
sweep.json) to `results/<table>.json` (small, committed: `tests/test_results.py` formats it
and compares with the README) and rewrites the README between the table's markers,
`<!-- results:<table> -->` and `<!-- /results:<table> -->`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

from absl import app, flags

from hisd_jax import cli, jsonio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "results")
README = os.path.join(REPO, "README.md")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Table:
    name: str
    title: str
    argv: tuple[str, ...]  # the command after `python -m`
    workdir: str  # relative to the repository
    summary: str  # the file the command writes in `workdir`, read back by `format`
    wall_time: str  # measured on the 2-core CPU machine of the README

    @property
    def command(self) -> str:
        return "python -m " + " ".join([*self.argv, f"--workdir {self.workdir}"])

    def summary_path(self) -> str:
        return os.path.join(REPO, self.workdir, self.summary)


def _compare(config, *extra):
    return ("hisd_jax.compare", f"--config {config}", *extra)


def _sweep(config, methods, *extra):
    return ("hisd_jax.sweep", f"--config {config}", "--seeds 0,1,2", f"--methods {methods}", *extra)


TABLES = (
    Table(
        "main",
        "HiSD vs every baseline per exit, one seed, and its early-exit operating points",
        _compare("configs/compare_multidigits.py"),
        "runs/compare",
        "comparison.json",
        "8 min",
    ),
    Table(
        "main_seeds",
        "the main comparison over seeds 0, 1, 2: mean ± std, † beyond two standard errors, "
        "the claims' verdicts",
        _compare("configs/compare_multidigits.py", "--seeds 0,1,2"),
        "runs/compare_seeds",
        "seeds.json",
        "25 min",
    ),
    Table(
        "code_search",
        "code search in MoSE's setting: every preset and the dedicated models per exit (MRR), "
        "and HiSD's cross-exit MRR",
        _compare("configs/compare_mose_pycode.py"),
        "runs/mose_pycode",
        "comparison.json",
        "14 min",
    ),
    Table(
        "mtl",
        "MTL methods on 5-task MultiDigits, Δm against single-task runs",
        _sweep(
            "configs/mtl_multidigits.py",
            "ew,uw,dwa,rlw,gls,mgda,pcgrad,gradvac,cagrad,imtlg,gradnorm,nashmtl,"
            "mgda@rep,cagrad@rep,nashmtl@rep",
        ),
        "runs/mtl_sweep",
        "sweep.json",
        "about 4 h",
    ),
    Table(
        "kd_noisy",
        "KD from converged tasks against every MTL method, noisy training labels",
        _sweep(
            "configs/kd_multidigits.py:steps=2500",
            "ew,kd_joint,kd_sequential,cagrad@rep,uw,nashmtl@rep,dwa,imtlg@rep,rlw,pcgrad@rep,"
            "gls,gradvac@rep,mgda@rep,gradnorm@rep",
        ),
        "runs/kd_sweep",
        "sweep.json",
        "about 4 h (2 h 10 min as two --shards)",
    ),
    Table(
        "kd_clean",
        "KD from converged tasks against every MTL method, clean labels",
        _sweep(
            "configs/kd_multidigits.py:steps=2000,num_train=4000,noise=0",
            "ew,uw,dwa,rlw,gls,cagrad@rep,nashmtl@rep,imtlg@rep,mgda@rep,pcgrad@rep,"
            "gradvac@rep,gradnorm@rep,kd_joint,kd_sequential",
        ),
        "runs/kd_sweep_clean",
        "sweep.json",
        "about 70 min",
    ),
    Table(
        "alphavil_epochs",
        "αVIL against MTL weightings for the left digit, equal epochs",
        _sweep(
            "configs/alphavil_multidigits.py",
            "alphavil,ew,gcosine,diw,rlw,mgda@rep",
            "--judge left",
        ),
        "runs/alphavil_epochs",
        "sweep.json",
        "21 min",
    ),
    Table(
        "alphavil_examples",
        "αVIL for the left digit, equal examples (20 epochs)",
        _sweep("configs/alphavil_multidigits.py:budget=examples", "alphavil", "--judge left"),
        "runs/alphavil_examples",
        "sweep.json",
        "5 min",
    ),
    Table(
        "alphavil_benign",
        "αVIL and EW for the left digit without the harmful task",
        _sweep("configs/alphavil_multidigits.py:shuffled=", "alphavil,ew", "--judge left"),
        "runs/alphavil_benign",
        "sweep.json",
        "6 min",
    ),
)
BY_NAME = {t.name: t for t in TABLES}


def format_summary(table: Table, stored: dict) -> str:
    """The table's markdown from its stored summary (the command's own formatter)."""
    if table.summary == "comparison.json":
        from hisd_jax import compare  # noqa: PLC0415

        return compare.format_snapshot(stored).strip()
    if table.summary == "seeds.json":
        from hisd_jax import compare  # noqa: PLC0415

        return compare.format_seeds(stored).strip()
    from hisd_jax import sweep  # noqa: PLC0415

    return sweep.markdown(stored).strip()


def markers(name: str) -> tuple[str, str]:
    return f"<!-- results:{name} -->", f"<!-- /results:{name} -->"


def readme_block(text: str, name: str) -> str | None:
    """The README text between the table's markers (stripped), or None without markers."""
    start, end = markers(name)
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def replace_block(text: str, name: str, body: str) -> str:
    start, end = markers(name)
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def stored_path(name: str) -> str:
    return os.path.join(RESULTS_DIR, f"{name}.json")


def state(table: Table) -> str:
    if os.path.exists(table.summary_path()):
        return "runs done"
    if os.path.isdir(os.path.join(REPO, table.workdir)):
        return "runs partly done"
    return "not run"


def run(table: Table) -> None:
    """Runs the table's command (it skips finished runs); raises CalledProcessError."""
    args = [sys.executable, "-m"] + " ".join(table.argv).split() + ["--workdir", table.workdir]
    print(f"== {table.name}: {table.command}", file=sys.stderr)
    subprocess.run(args, cwd=REPO, check=True)


def regenerate(table: Table) -> bool:
    """Copies the summary to results/ and rewrites the README block; False if not run yet."""
    if not os.path.exists(table.summary_path()):
        return False
    with open(table.summary_path()) as f:
        stored = json.load(f)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    jsonio.write_json(stored_path(table.name), stored, indent=None)
    with open(README) as f:
        text = f.read()
    if readme_block(text, table.name) is None:
        print(f"== {table.name}: README has no {markers(table.name)[0]} block", file=sys.stderr)
        return True
    jsonio.write_text(README, replace_block(text, table.name, format_summary(table, stored)))
    return True


def main(argv):
    del argv
    cli.quiet_library_info()
    unknown = [n for n in FLAGS.only if n not in BY_NAME]
    if unknown:
        cli.fail("hisd_jax.results", f"--only: unknown table(s) {', '.join(unknown)}; "
                 f"allowed: {', '.join(BY_NAME)}")  # fmt: skip
    tables = [BY_NAME[n] for n in FLAGS.only] if FLAGS.only else list(TABLES)
    if FLAGS.list:
        for t in tables:
            print(f"{t.name}: {t.title}\n  {t.command}\n  expected {t.wall_time}; {state(t)}")
        return
    for t in tables:
        if FLAGS.run:
            run(t)
        if regenerate(t):
            print(f"{t.name}: README and {os.path.relpath(stored_path(t.name), REPO)} rewritten")
        else:
            print(f"{t.name}: not run yet ({t.command}; {t.wall_time}); add --run")


if __name__ == "__main__":
    flags.DEFINE_bool("list", False, "List the tables, their commands and wall times.")
    flags.DEFINE_bool("run", False, "Run each table's command first (finished runs are skipped).")
    flags.DEFINE_list("only", [], f"Tables to handle (default: all): {', '.join(BY_NAME)}.")
    app.run(main, flags_parser=cli.flags_parser("hisd_jax.results"))
