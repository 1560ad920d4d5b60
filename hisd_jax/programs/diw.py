"""Discriminative importance weighting of auxiliary examples (`program.name = "diw"`).

A target-focused baseline of αVIL (Kourdis et al., arXiv 2405.07769, after the
discriminative importance weighting of Bickel, Brückner & Scheffer, ICML 2007, "Discriminative
Learning for Differing Training and Test Distributions"): a probabilistic classifier is trained
to tell the target's dev inputs (the validation split, label 1) from the auxiliary tasks'
training inputs (label 0); each training example x then weighs the auxiliary tasks' losses by

    w(x) = p(dev | x) / (1 − p(dev | x)) · N_train / N_dev

(the density ratio p_dev(x) / p_train(x); 1 when the two are alike), normalised to mean 1 over
each batch's real rows (a self-normalised importance-weighted mean). The target's own loss is
unweighted. The classifier is scikit-learn's L2-regularised logistic regression on the
standardised pixels (`program.diw_c`, its inverse regularisation strength), fitted once on
the host when the program is built; the weights are a table by `position` in the program state.

With the embedded data sets every task reads the same training images, drawn like the
validation images, so the weights stay near 1: the baseline then behaves like EW, as it should.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hisd_jax import steps
from hisd_jax.errors import ConfigError
from hisd_jax.programs.base import Program


class DIWProgram(Program):
    """The standard update with per-example weights on the auxiliary tasks' losses."""

    name = "diw"

    def __init__(self, exp):
        super().__init__(exp)
        cfg = exp.config.program
        names = exp.task_names
        if cfg.target and cfg.target not in names:
            raise ConfigError(f"program.target={cfg.target!r} is not one of data.tasks={names}")
        if not (np.isfinite(cfg.diw_c) and cfg.diw_c > 0):
            raise ConfigError(f"program.diw_c={cfg.diw_c!r} must be a finite number > 0")
        self.target = cfg.target or names[0]
        self.weights = importance_weights(exp, cfg.diw_c)

    def init_state(self, variables):
        del variables
        return {"example_weights": jnp.asarray(self.weights)}

    def make_unit_fn(self):
        exp, target = self.exp, self.target

        def diw_step_fn(state, sums, batch):
            w = state.program["example_weights"][batch["position"]]
            w = w / jnp.maximum(jnp.mean(w), 1e-12)  # mean 1 over the batch (no padding here)
            ctx = steps.LossContext(
                progress=steps.progress(exp, state.step),
                active=jnp.ones(len(exp.tasks), jnp.float32),
                soft_weight=jnp.zeros(len(exp.tasks), jnp.float32),
                soft_targets={},
                example_weights={t: w for t in exp.task_names if t != target},
            )
            state, metrics = steps.train_step(exp, state, batch, ctx)
            return state, steps.accumulate(sums, metrics)

        return diw_step_fn

    def results(self, state) -> dict:
        w = np.asarray(jax.device_get(state.program["example_weights"]))
        return {
            "diw": {
                "target": self.target,
                "weights": {
                    "mean": float(w.mean()),
                    "std": float(w.std()),
                    "min": float(w.min()),
                    "max": float(w.max()),
                },
            }
        }


def importance_weights(exp, c: float = 1.0) -> np.ndarray:
    """float32 [N_train]: p/(1−p) · N_train/N_dev of a logistic regression telling validation
    images (1) from training images (0), by training-split position (module docstring)."""
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    train, dev = exp.dataset.splits["train"], exp.dataset.splits["val"]
    key = exp.dataset.input_key
    x_train = train.get_batch(np.arange(len(train)))[key].reshape(len(train), -1)
    x_dev = dev.get_batch(np.arange(len(dev)))[key].reshape(len(dev), -1)
    x = np.concatenate([x_train, x_dev]).astype(np.float64)
    y = np.concatenate([np.zeros(len(x_train)), np.ones(len(x_dev))])
    clf = LogisticRegression(C=c, max_iter=1000).fit(x, y)
    # log(p / (1 - p)) is the decision function: exp of it is stable where p is near 0 or 1.
    log_odds = np.clip(clf.decision_function(x_train), -30.0, 30.0)
    return (np.exp(log_odds) * len(x_train) / len(x_dev)).astype(np.float32)
