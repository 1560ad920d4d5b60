"""Calibration of exit heads: expected calibration error and temperature scaling.

Host-side NumPy/SciPy code (float64) over a whole validation set. Temperatures fitted here are
applied as ``logits / T`` (per exit: ``logits / temperatures[:, None, None]``) before
``policies.confidence``; scaling does not change any exit's predictions, only its confidences.
"""

import numpy as np
from scipy import optimize, special

# Search interval for T (log-space bounded Brent). An optimum outside it ends up at a bound.
_LOG_T_BOUNDS = (np.log(1e-2), np.log(1e2))


def ece(probs, labels, num_bins=15):
    """Expected calibration error (Guo et al. 2017) of the top-1 prediction.

    probs: ``[N, C]``; labels: ``[N]``. Confidences are binned into ``num_bins`` equal-width bins
    (lo, hi] over [0, 1]; ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.searchsorted(edges[1:-1], conf, side="left")
    gap = np.bincount(bins, weights=correct - conf, minlength=num_bins)  # n_b * (acc_b - conf_b)
    return float(np.abs(gap).sum() / conf.shape[0])


def fit_temperature(logits, labels):
    """Temperature T > 0 minimising the NLL of softmax(logits / T) on ``logits [N, C]``.

    The NLL is convex in 1/T, hence unimodal in log T, which is searched by bounded Brent.
    """
    z = np.asarray(logits, dtype=np.float64)
    z_label = z[np.arange(z.shape[0]), np.asarray(labels)]

    def nll(log_t):
        inv_t = np.exp(-log_t)
        return np.mean(special.logsumexp(z * inv_t, axis=-1) - z_label * inv_t)

    res = optimize.minimize_scalar(
        nll, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-8}
    )
    return float(np.exp(res.x))


def fit_temperatures(logits, labels):
    """One temperature per exit for ``logits [E, N, C]``: an array ``[E]``."""
    return np.array([fit_temperature(z, labels) for z in logits])


def calibration_report(logits, labels, temperatures=None, num_bins=15):
    """Per-exit ECE before and after temperature scaling (temperatures fitted when not given).

    Returns a dict with ``temperatures``, ``ece_before`` and ``ece_after``, each ``[E]``.
    """
    z = np.asarray(logits, dtype=np.float64)
    if temperatures is None:
        temperatures = fit_temperatures(z, labels)
    temperatures = np.asarray(temperatures, dtype=np.float64)

    def per_exit_ece(scaled):
        return np.array([ece(special.softmax(s, axis=-1), labels, num_bins) for s in scaled])

    return {
        "temperatures": temperatures,
        "ece_before": per_exit_ece(z),
        "ece_after": per_exit_ece(z / temperatures[:, None, None]),
    }
