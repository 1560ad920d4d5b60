"""The main job: HiSD against its baselines on the embedded MultiDigits data set.

Task: the sum of the two digits (19 classes) on a 12x12 canvas built from
scikit-learn's real handwritten digits. Model: a 4-stage ResNet (one basic block
per stage, width 16) with an exit after every stage. Every method gets the same
budget (2000 Adam steps, batch 128, cosine schedule):

  final_only   cross-entropy at the final exit only
  sdn          cross-entropy at every exit, internal weights ramped (Kaya et al. 2019)
  hisd         cross-entropy + KD from the final exit + hierarchical KD + feature alignment
  dedicated0   a model cut at the first exit, trained alone

Run:
  python -m hisd_jax.compare --config configs/compare_multidigits.py --workdir runs/compare
Variant: configs/compare_multidigits.py:steps=500,seed=1
Expected: ~7 minutes on 2 CPU cores; prints the per-exit table (FLOPs fraction and
test accuracy of every method) and writes comparison.md and accuracy_vs_flops.png.
See the README's results table for the measured numbers.
"""

import os

import ml_collections

from hisd_jax.config import config_from_file, parse_arg

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    arg = parse_arg(arg, steps=2000, seed=0)
    c = ml_collections.ConfigDict()
    c.base = config_from_file(
        os.path.join(_HERE, "hisd_multidigits.py"), f"steps={arg.steps},seed={arg.seed}"
    )
    c.runs = {
        "final_only": {"name": "final_only", "objective": {"preset": "final_only"}},
        "sdn": {"name": "sdn", "objective": {"preset": "sdn"}},
        "hisd": {"name": "hisd", "objective": {"preset": "hisd"}},
        "dedicated0": {
            "name": "dedicated0",
            "objective": {"preset": "final_only"},
            "model": {"cut_at": 0},
        },
    }
    return c
