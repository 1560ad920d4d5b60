"""Results you can trust: the pinned environment, the README's tables against the stored
results they were formatted from, and the comparison's statistics and verdicts on hand-made
numbers."""

import math
import os
import re

import ml_collections
import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from hisd_jax import compare, provenance, results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pinned() -> dict[str, Version]:
    out = {}
    with open(os.path.join(REPO, "constraints.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, version = line.split("==")
                out[canonical(name)] = Version(version)
    return out


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def setup_requirements() -> list[str]:
    """INSTALL_REQUIRES and every extra of setup.py, read from its syntax tree (not run)."""
    import ast  # noqa: PLC0415

    with open(os.path.join(REPO, "setup.py")) as f:
        tree = ast.parse(f.read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "INSTALL_REQUIRES" for t in node.targets
        ):
            out += ast.literal_eval(node.value)
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            out += [r for reqs in ast.literal_eval(node.value).values() for r in reqs]
    return out


def test_constraints_pin_every_requirement_of_setup_py_within_its_minimum():
    """Every install and test requirement of setup.py is pinned in constraints.txt, at a
    version its specifier accepts (the lock and the minimums agree)."""
    pins = pinned()
    requirements = setup_requirements()
    assert len(requirements) >= 15
    for text in requirements:
        req = Requirement(text)
        name = canonical(req.name)
        assert name in pins, f"{req.name} is required by setup.py but not pinned"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside setup.py's {req.specifier}"
        )


def test_constraints_pin_exact_versions_only():
    with open(os.path.join(REPO, "constraints.txt")) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", ln) for ln in lines)
    assert len({canonical(ln.split("==")[0]) for ln in lines}) == len(lines)


def test_environment_names_commit_packages_and_devices():
    env = provenance.environment()
    assert env["packages"]["jax"] == __import__("jax").__version__
    assert env["device_kind"] and env["device_count"] >= 1 and env["backend"] == "cpu"
    assert env["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["commit"])
    assert provenance.package_versions(("no-such-distribution-xyz",)) == {
        "no-such-distribution-xyz": None
    }


STORED = [t for t in results.TABLES if os.path.exists(results.stored_path(t.name))]


def test_the_main_the_code_search_and_the_alphavil_tables_are_stored():
    names = {t.name for t in STORED}
    assert {"main", "main_seeds", "alphavil_epochs", "alphavil_examples", "code_search"} <= names, (
        names
    )


@pytest.mark.parametrize("table", STORED, ids=[t.name for t in STORED])
def test_readme_table_is_the_stored_results_formatted(table):
    """The README's table equals the comparison's own formatter run on the stored results
    (results/<table>.json, copied from the run directory by `python -m hisd_jax.results`): the
    README shows what the command printed, to the last digit."""
    import json  # noqa: PLC0415

    with open(results.stored_path(table.name)) as f:
        stored = json.load(f)
    with open(results.README) as f:
        block = results.readme_block(f.read(), table.name)
    assert block is not None, f"README has no {results.markers(table.name)[0]} block"
    assert block == results.format_summary(table, stored)


def test_every_readme_block_belongs_to_a_registered_table():
    with open(results.README) as f:
        names = re.findall(r"<!-- results:(\w+) -->", f.read())
    assert names and set(names) <= set(results.BY_NAME), names
    assert {"main", "main_seeds"} <= set(names)


def test_replace_block_rewrites_only_between_the_markers():
    text = "a\n<!-- results:x -->\nold\n<!-- /results:x -->\nb\n"
    new = results.replace_block(text, "x", "| new |")
    assert new == "a\n<!-- results:x -->\n| new |\n<!-- /results:x -->\nb\n"
    assert results.readme_block(new, "x") == "| new |"


# --------------------------------------------------------------------------- statistics
def test_mean_se_and_welch_difference_by_hand():
    mean, std, se = compare.mean_se([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(
        math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    )
    assert se == pytest.approx(std / math.sqrt(3))
    d, se_d = compare.differs([1.0, 2.0, 4.0], [0.0, 0.0, 3.0])
    assert d == pytest.approx(7 / 3 - 1)
    assert se_d == pytest.approx(math.sqrt(std**2 / 3 + np.var([0, 0, 3], ddof=1) / 3))
    assert compare.mean_se([5.0]) == (5.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "a, b, verdict",
    [
        ([80, 81, 82], [70, 71, 72], "reproduced"),  # far above
        ([80, 81, 82], [80, 81, 82], "reproduced"),  # equal: "matches"
        ([80, 81, 82], [80.5, 81.5, 82.5], "inconclusive"),  # below, within 2 SE (1.63)
        ([70, 71, 72], [80, 81, 82], "not reproduced"),  # below by more than 2 SE
    ],
)
def test_at_least_verdicts(a, b, verdict):
    assert compare.at_least("claim", a, b, "x")["verdict"] == verdict


def fake_seed(acc: dict, tol=None, task="sum"):
    """A per-seed comparison: {run: [accuracy per exit]} (fractions); `tol`: (test acc, final
    acc, avg FLOPs) of hisd's 1% tolerance point."""
    exits = {f"exit{e}": {"flops": 1e6 * (e + 1), "fraction": (e + 1) / 4} for e in range(4)}
    res = {}
    for run, accs in acc.items():
        names = list(exits)[: len(accs)]
        res[run] = {
            "exits": {n: exits[n] for n in names},
            "test": {task: {n: {"accuracy": a} for n, a in zip(names, accs)}},
        }
    reports = {}
    if tol:
        t = {"accuracy": tol[0], "final_exit_accuracy": tol[1], "avg_flops_fraction": tol[2],
             "exit_rates": [0.0, 0.0, 1.0, 0.0]}  # fmt: skip
        reports["hisd/tol"] = {"goal": "tolerance", "value": 0.01, "test": t}
    return {"results": res, "reports": reports, "last_only": {"dedicated0", "dedicated1"}}


CLAIMS = ml_collections.ConfigDict(
    {
        "base": {"data": {"tasks": ("sum",)}},
        "claims": {
            "method": "hisd",
            "final_only": "final_only",
            "dedicated": {"exit0": "dedicated0", "exit1": "dedicated1"},
            "middle_exit": "mose",
        },
    }
)


def test_seeds_summary_marks_cells_beyond_two_standard_errors_and_gives_verdicts():
    """Three seeds of hand-made accuracies; every mean, std, mark and verdict below is worked
    out by hand (SE = std / sqrt(3); a difference's SE is Welch's)."""
    per_seed = {
        s: fake_seed(
            {
                "final_only": [0.05, 0.05, 0.05, 0.80 + d],
                "mose": [0.30, 0.70 + d, 0.85 + 2 * d, 0.80 + d],
                "hisd": [0.25 + d, 0.40 + d, 0.79 + d, 0.81 + d],
                "dedicated0": [0.50 + d],
                "dedicated1": [0.10, 0.40 + 2 * d],  # its exit0 is untrained: not shown
            },
            tol=(0.80 + d, 0.81 + d, 0.6),
        )
        for s, d in zip((0, 1, 2), (0.0, 0.01, 0.02))
    }
    summary = compare.seeds_summary(CLAIMS, per_seed)
    rows = {r.split(" | ")[0].strip("| "): r for r in summary["markdown"].splitlines()}
    # exit0: final_only 5 vs hisd 26 ± 1 (-21, SE 0.58) †; mose 30 (+4) †; dedicated0 51 ± 1
    # (+25, SE 0.82) †; dedicated1 has no trained exit0.
    assert rows["exit0"] == (
        "| exit0 | 1.00M | 0.250 | 5.00 ± 0.00 † | 30.00 ± 0.00 † | 26.00 ± 1.00 "
        "| 51.00 ± 1.00 † |  |"
    )
    # exit1: dedicated1 42 ± 2 vs hisd 41 ± 1: +1 within 2 SE (2.58), no mark.
    assert rows["exit1"] == (
        "| exit1 | 2.00M | 0.500 | 5.00 ± 0.00 † | 71.00 ± 1.00 † | 41.00 ± 1.00 |  "
        "| 42.00 ± 2.00 |"
    )
    got = [(v["verdict"], round(v["difference"], 4)) for v in summary["verdicts"]]
    kept = np.mean([100 * (0.80 + d) / (0.81 + d) for d in (0.0, 0.01, 0.02)])
    assert got == [
        ("not reproduced", -25.0),  # exit0: 26 vs dedicated 51
        ("inconclusive", -1.0),  # exit1: 41 vs 42, within 2 SE
        ("reproduced", 1.0),  # final exit: 82 vs final-only 81
        ("not reproduced", round(kept - 99, 4)),  # keeps 98.78% < 99%, SE ~ 0.01
        ("reproduced", 6.0),  # mose: exit2 87 ± 2 vs final 81 ± 1, 2 SE = 2.58
    ]
    assert "exit2 vs exit3" in summary["verdicts"][4]["claim"]


def test_a_retrieval_comparison_tabulates_mrr_and_the_cross_exit_table():
    """Hand-made MRRs: the table shows the judged metric x100, a dedicated model only its own
    exit, no early-exit section (retrieval has no confidence), and the method's cross-exit MRRs
    (rows: query exit, columns: code exit); the stored snapshot formats to the same text."""
    exits = {f"exit{e}": {"flops": (e + 1) * 1e6, "fraction": (e + 1) / 2} for e in range(2)}

    def run(mrr, cross=None):
        test = {}
        for e, m in enumerate(mrr):
            test[f"exit{e}"] = {"mrr": m, "candidates": 1000.0}
            if cross:
                test[f"exit{e}"].update({f"mrr_docs_exit{f}": cross[e][f] for f in range(2)})
        return {"exits": dict(list(exits.items())[: len(mrr)]), "test": {"search": test}}

    runs = {
        "final_only": run([0.084, 0.096]),
        "hisd": run([0.121, 0.125], cross=[[0.121, 0.1012], [0.0987, 0.125]]),
        "dedicated0": run([0.110]),
    }
    assert compare.judged_metric(runs["hisd"], "search") == "mrr"
    text = compare.tables(runs, {}, "search", {"dedicated0"}, "mrr", "hisd")
    lines = text.splitlines()
    assert lines[0] == "Test MRR (x100, 1000 candidates) per exit, task 'search'."
    assert "| exit0 | 1.00M | 0.500 | 8.40 | 12.10 | 11.00 |" in lines
    assert "| exit1 | 2.00M | 1.000 | 9.60 | 12.50 |  |" in lines
    assert "Early exit" not in text
    assert "| exit0 | 12.10 | 10.12 |" in lines and "| exit1 | 9.87 | 12.50 |" in lines
    snap = compare.snapshot(runs, {}, "search", {"dedicated0"}, "mrr", "hisd")
    assert compare.format_snapshot(snap) == text
