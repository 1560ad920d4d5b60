"""The command-line entry points (absl flags): help, one-line errors, no flags on import.

Each case runs the command in a fresh process; none trains or loads a model.
"""

import pytest
from conftest import run_python

# absl's --help prints the usage on stdout and exits with code 1.
HELP = {
    "evaluate": ["--workdir", "--policy", "--[no]calibrate", "--tolerance", "--budget"],
    "export": ["--workdir", "--exit", "--out", "--[no]report", "--batch_size"],
    "compare": ["--config", "--workdir", "--only"],
    "sweep": ["--config", "--workdir", "--methods", "--seeds"],
    "bench": ["--config", "--steps", "--strategies"],
}


@pytest.mark.parametrize("command", list(HELP))
def test_help(command):
    proc = run_python(["-m", f"hisd_jax.{command}", "--help"], timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for flag in HELP[command]:
        assert flag in proc.stdout, flag


BAD = [
    ("evaluate", ["--workdir", "x", "--policy", "nope"], "flag --policy=nope: value should be"),
    ("evaluate", ["--workdir", "x", "--tolerance", "abc"], "flag --tolerance=abc"),
    ("evaluate", ["--workdir", "x", "--tolerance", "0.1", "--budget", "0.5"], "At most one of"),
    ("evaluate", ["--policy", "margin"], "--workdir must have a value"),
    ("evaluate", ["--workdir", "x", "--batch_size", "0"], "flag --batch_size=0"),
    ("evaluate", ["--workdir", "x", "--bogus"], "Unknown command line flag 'bogus'"),
    ("evaluate", ["--workdir", "x", "stray"], "unexpected arguments: stray"),
    # The argparse-era spellings still parse: the error is the missing workdir, not a flag.
    ("evaluate", ["--workdir", "none", "--no_calibrate", "--no_speed"], "none/config.json"),
    ("evaluate", ["--workdir", "none", "--nocalibrate", "--nospeed"], "none/config.json"),
    ("export", ["--workdir", "x"], "give --exit and --out, or --report"),
    ("export", ["--workdir", "x", "--exit", "exit1"], "--exit needs --out"),
    ("export", ["--workdir", "x", "--report", "--batch_size", "abc"], "flag --batch_size=abc"),
    ("export", ["--workdir", "none", "--report"], "none/config.json"),
    ("evaluate", ["--workdir", "x", "--budget", "0"], "--budget=0.0 must be a fraction"),
    ("evaluate", ["--workdir", "x", "--budget", "1.5"], "in (0, 1]"),
    ("evaluate", ["--workdir", "x", "--tolerance", "-1"], "--tolerance=-1.0 must be"),
    ("evaluate", ["--workdir", "x", "--tolerance", "nan"], "--tolerance=nan must be"),
]


@pytest.mark.parametrize("command, args, message", BAD, ids=[" ".join(c[1]) for c in BAD])
def test_bad_value_is_one_line_and_exit_code_2(command, args, message, tmp_path):
    args = [str(tmp_path / "none") if a == "none" else a for a in args]
    proc = run_python(["-m", f"hisd_jax.{command}", *args], timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"hisd_jax.{command}: error: ") and message in lines[0], lines[0]


def test_importing_the_commands_defines_no_flags():
    """Only the program that runs defines its flags, so the modules import side by side (and
    next to `main`, which defines --config and --workdir at import)."""
    code = (
        "from absl import flags\n"
        "from hisd_jax import bench, compare, evaluate, export, sweep\n"
        "assert not [f for f in flags.FLAGS if f in ('config', 'workdir', 'policy', 'exit')]\n"
        "from hisd_jax import main\n"
        "assert 'workdir' in flags.FLAGS\n"
    )
    proc = run_python(code, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("where", ["empty", "file", "under-file"])
def test_a_path_that_cannot_be_a_workdir_is_one_line(where, tmp_path):
    """An empty --workdir, an existing file, a path under a file: one line, exit code 2,
    before the data or model is built (tracebacks before)."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    workdir = {"empty": "", "file": str(afile), "under-file": str(afile / "sub")}[where]
    proc = run_python(
        ["-m", "hisd_jax.main", "--config=configs/hisd_multidigits.py", f"--workdir={workdir}"],
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().startswith("config error: --workdir="), proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert afile.read_text() == "not a directory"


def test_the_malformed_input_fuzzer_runs_and_judges():
    """`python -m hisd_jax.tools.fuzz_configs` (all its cases: the closing notes give the
    count); here a handful of its cases, and one that must miss the bar: a valid value."""
    from hisd_jax.tools import fuzz_configs  # noqa: PLC0415

    ok, failed, total = fuzz_configs.fuzz(limit=6)
    assert (ok, failed, total) == (6, [], 6)
    assert len(fuzz_configs.config_cases()) + len(fuzz_configs.command_cases()) >= 100
    label, met, why = fuzz_configs.run_case(
        "valid", ["hisd_jax.main", "--config=configs/hisd_multidigits.py"], "x", "/tmp", 3.0
    )
    assert not met and "still running" in why
