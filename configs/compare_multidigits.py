"""The main job: HiSD against every baseline on the embedded MultiDigits data set.

Task: the sum of the two digits (19 classes) on a 12x12 canvas built from
scikit-learn's real handwritten digits. Model: a 4-stage ResNet (one basic block per
stage, width 16) with an exit after every stage. Every method gets the same budget (2000
Adam steps, batch 128, cosine schedule):

  final_only   cross-entropy at the final exit only (also the dedicated model of exit 3:
               the same network trained on the same loss)
  sdn          cross-entropy at every exit, internal weights ramped (Kaya et al. 2019)
  byot         cross-entropy + KD from the final exit + feature hints (Zhang et al. 2019)
  mose         cross-entropy at every exit weighted by depth (MoSE, arXiv 2503.03008)
  hisd         cross-entropy + KD from the final exit + hierarchical KD from the next exit
  dedicated0/1/2   the network cut at exit 0/1/2, trained alone on its own exit

Run (one seed, the quick start's main job):
  python -m hisd_jax.compare --config configs/compare_multidigits.py --workdir runs/compare
Expected: ~8 minutes on 2 quiet CPU cores; prints the per-exit table (FLOPs fraction and test
accuracy of every method) and the early-exit operating points, and writes comparison.md and
accuracy_vs_flops.png. Three seeds, mean +- std, differences beyond two standard errors marked
and the claims' verdicts (~25 minutes):
  python -m hisd_jax.compare --config configs/compare_multidigits.py --seeds 0,1,2 \
      --workdir runs/compare_seeds
Variant: configs/compare_multidigits.py:steps=500,seed=1
See the README's results for the measured numbers.
"""

import os

import ml_collections

from hisd_jax.config import config_from_file, parse_arg

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    arg = parse_arg(arg, steps=2000, seed=0)
    c = ml_collections.ConfigDict()
    # The base carries no method's settings; each run names its own (hisd: the loss weights
    # and temperature chosen on validation in hisd_multidigits.py).
    hisd = config_from_file(
        os.path.join(_HERE, "hisd_multidigits.py"), f"steps={arg.steps},seed={arg.seed}"
    )
    c.base = config_from_file(
        os.path.join(_HERE, "hisd_multidigits.py"),
        f"preset=final_only,steps={arg.steps},seed={arg.seed}",
    )
    c.runs = {
        "final_only": {"name": "final_only", "objective": {"preset": "final_only"}},
        "sdn": {"name": "sdn", "objective": {"preset": "sdn"}},
        "byot": {"name": "byot", "objective": {"preset": "byot"}},
        "mose": {"name": "mose", "objective": {"preset": "mose"}},
        "hisd": {
            "name": "hisd",
            "objective": {
                "preset": "hisd",
                "feat": hisd.objective.feat,
                "temperature": hisd.objective.temperature,
            },
        },
        **{
            f"dedicated{e}": {
                "name": f"dedicated{e}",
                "objective": {"preset": "final_only"},
                "model": {"cut_at": e},
            }
            for e in range(3)
        },
    }
    c.order = (
        "final_only",
        "sdn",
        "byot",
        "mose",
        "hisd",
        "dedicated0",
        "dedicated1",
        "dedicated2",
    )
    # What the verdicts compare (hisd_jax.compare.verdicts): the method under test, the
    # multi-exit baseline that trains only the final exit, and the dedicated model per exit.
    c.claims = {
        "method": "hisd",
        "final_only": "final_only",
        "dedicated": {f"exit{e}": f"dedicated{e}" for e in range(3)},
        "middle_exit": "mose",
    }
    return c
