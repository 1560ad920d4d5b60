"""Code search: HiSD against every multi-exit baseline on the embedded code corpus (MoSE's
setting, issue #12).

Data and model: `configs/mose_pycode.py` (queries and code of the installed Python sources
through one multi-exit encoder with 3 exits; test MRR among 1000 candidates). Every run gets the
same budget (500 Adam steps of 64 pairs):

  final_only   InfoNCE at the final exit only
  sdn          InfoNCE at every exit, internal weights ramped (Kaya et al. 2019)
  byot         + similarity KD from the final exit and embedding hints (Zhang et al. 2019)
  mose         InfoNCE at every exit weighted by depth (MoSE, arXiv 2503.03008)
  hisd         + similarity KD from the final and from the next deeper exit, and alignment of
               every exit's embeddings to the final exit's
  dedicated0/1 the encoder cut at exit 0/1, trained alone on its own exit

Run:
  python -m hisd_jax.compare --config configs/compare_mose_pycode.py --workdir runs/mose_pycode
Expected: ~10 minutes on 2 CPU cores; prints per exit the FLOPs fraction and every run's test
MRR, and HiSD's cross-exit table (queries embedded at one exit against code embedded at
another); writes comparison.md and mrr_vs_flops.png. Three seeds: add --seeds 0,1,2 (~30 min).
Variant: configs/compare_mose_pycode.py:steps=1000,seed=1
See the README's code-search table for the measured numbers.
"""

import os

import ml_collections

from hisd_jax.config import config_from_file, parse_arg

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    arg = parse_arg(arg, steps=500, seed=0)
    c = ml_collections.ConfigDict()
    c.base = config_from_file(
        os.path.join(_HERE, "mose_pycode.py"),
        f"preset=final_only,steps={arg.steps},seed={arg.seed}",
    )
    presets = ("final_only", "sdn", "byot", "mose", "hisd")
    c.runs = {p: {"name": p, "objective": {"preset": p}} for p in presets}
    for e in range(2):
        c.runs[f"dedicated{e}"] = {
            "name": f"dedicated{e}",
            "objective": {"preset": "final_only"},
            "model": {"cut_at": e},
        }
    c.order = (*presets, "dedicated0", "dedicated1")
    c.claims = {
        "method": "hisd",
        "final_only": "final_only",
        "dedicated": {f"exit{e}": f"dedicated{e}" for e in range(2)},
        "middle_exit": "mose",
    }
    return c
