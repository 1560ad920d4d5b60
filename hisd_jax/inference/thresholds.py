"""Fitting early-exit thresholds on validation data (host-side NumPy, float64).

Inputs are over a whole validation set: ``conf [E, N]`` (``policies.confidence``), ``correct
[E, N]`` (whether exit e's prediction is right) and ``cost [E]`` (cumulative cost of exiting at
exit e). A threshold vector ``[E]`` is used by ``policies.threshold_exit``; the final entry is
ignored there and is returned as -inf. A threshold of +inf disables an exit (confidences are
assumed finite).

Two goals: "tolerance" minimises average cost subject to accuracy >= reference - value;
"budget" maximises accuracy subject to average cost <= value. Ties go to higher accuracy
(tolerance) or lower cost (budget). Every candidate threshold is scored exactly with
sort/searchsorted/cumsum sweeps rather than one pass over the data per candidate.
"""

import numpy as np

from hisd_jax.inference.policies import patience_exit, threshold_exit

GOALS = ("tolerance", "budget")
SEARCHES = ("shared", "per_exit")
_EPS = 1e-12  # slack for float round-off in the constraints and in objective ties


def _shared_sweep(conf, correct, taus):
    """Exit counts ``[K, E]`` and number correct ``[K]`` for a shared threshold, per tau in ``taus``
    (sorted ascending).

    With one threshold t at every non-final exit, example n leaves at exit e exactly when
    max(conf[:e, n]) < t <= conf[e, n] (the final exit: max(conf[:-1, n]) < t), an interval of
    t; each (e, n) adds its count to the taus inside its interval through a difference array.
    """
    num_exits, n = conf.shape
    k = taus.shape[0]
    inner = conf[:-1]
    lower = np.concatenate([np.full((1, n), -np.inf), np.maximum.accumulate(inner, axis=0)])
    upper = np.concatenate([inner, np.full((1, n), np.inf)])
    start = np.searchsorted(taus, lower, side="right")  # first tau > lower
    stop = np.maximum(np.searchsorted(taus, upper, side="right"), start)  # empty if not a new max
    rows = np.arange(num_exits)[:, None] * (k + 1)

    def interval_sums(weights):
        diff = np.bincount((rows + start).ravel(), weights.ravel(), num_exits * (k + 1))
        diff -= np.bincount((rows + stop).ravel(), weights.ravel(), num_exits * (k + 1))
        return np.rint(np.cumsum(diff.reshape(num_exits, k + 1), axis=1)[:, :k].T).astype(np.int64)

    return interval_sums(np.ones_like(conf)), interval_sums(correct.astype(np.float64)).sum(axis=1)


def _exit_sweep(conf, correct, thresholds, e, taus):
    """Exit counts ``[K, E]`` and number correct ``[K]`` when ``thresholds[e]`` is replaced by each
    tau in ``taus`` (any order) and the other thresholds are kept."""
    num_exits, n = conf.shape
    skip = thresholds.copy()
    skip[e] = np.inf
    rest = threshold_exit(conf, skip)  # where each example leaves if it does not stop at e
    reach = np.flatnonzero(rest > e)  # examples that get to exit e
    order = reach[np.argsort(conf[e, reach], kind="stable")]
    sorted_conf = conf[e, order]

    def suffix_sums(x):  # row i: sum over the examples from position i of the sorted order
        return np.concatenate(
            [np.cumsum(x[::-1], axis=0)[::-1], np.zeros((1, *x.shape[1:]), x.dtype)]
        )

    moved_from = suffix_sums(np.eye(num_exits, dtype=np.int64)[rest[order]])
    gained = suffix_sums(correct[e, order].astype(np.int64) - correct[rest[order], order])
    first = np.searchsorted(sorted_conf, taus, side="left")  # examples from here on stop at e
    counts = np.bincount(rest, minlength=num_exits) - moved_from[first]
    counts[:, e] += order.shape[0] - first
    return counts, correct[rest, np.arange(n)].sum() + gained[first]


def _outcome(conf, correct, thresholds):
    """Exit counts ``[1, E]`` and number correct ``[1]`` of one threshold vector (sweep layout)."""
    exit_idx = threshold_exit(conf, thresholds)
    counts = np.bincount(exit_idx, minlength=conf.shape[0])
    return counts[None], correct[exit_idx, np.arange(conf.shape[1])].sum(keepdims=True)


def _keys(acc, avg_cost, goal):
    """Objective of each candidate as (primary, secondary), both to minimise, rounded so that
    float round-off cannot decide ties."""
    keys = (avg_cost, -acc) if goal == "tolerance" else (-acc, avg_cost)
    return np.round(np.stack(keys, axis=-1), 12)


def _best(keys, feasible):
    """Index of the lexicographically smallest feasible key (the first on ties), or None."""
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    order = order[feasible[order]]
    return int(order[0]) if order.size else None


def _thresholds(num_exits, inner):
    """Threshold vector [E] with ``inner`` at the non-final exits and -inf at the final one."""
    thresholds = np.full(num_exits, -np.inf)
    thresholds[:-1] = inner
    return thresholds


def _block_descent(conf, correct, thresholds, evaluate, levels, max_sweeps):
    """Improves feasible ``thresholds`` by moving one exit's threshold, or two at once.

    Single moves rarely help from a constrained optimum (any one change that lowers the objective
    breaks the constraint), so for every pair e < f each candidate for exit e is tried with the
    best response at exit f. A move is taken when it is feasible and strictly improves the key.
    """
    num_exits = conf.shape[0]

    def candidates(th, e):
        """Current threshold, quantiles of the confidences of the examples reaching e, +inf."""
        reaching = conf[e, threshold_exit(conf, th) >= e]
        return np.concatenate(
            [[th[e]], np.quantile(reaching, levels) if reaching.size else [], [np.inf]]
        )

    def key(th):
        keys, _ = evaluate(*_outcome(conf, correct, th))
        return tuple(keys[0])

    for _ in range(max_sweeps):
        moved = False
        for e in range(num_exits - 1):
            best_key, best_th = key(thresholds), thresholds
            for f in range(e, num_exits - 1):  # f == e: move exit e alone
                for a in [thresholds[e]] if f == e else candidates(thresholds, e):
                    trial = thresholds.copy()
                    trial[e] = a
                    cands = candidates(trial, f)
                    keys, feasible = evaluate(*_exit_sweep(conf, correct, trial, f, cands))
                    i = _best(keys, feasible)
                    if i is not None and tuple(keys[i]) < best_key:
                        trial[f] = cands[i]
                        best_key, best_th = tuple(keys[i]), trial
            moved |= best_th is not thresholds
            thresholds = best_th
        if not moved:
            break
    return thresholds


def fit_thresholds(
    conf,
    correct,
    cost,
    *,
    goal,
    value,
    search="per_exit",
    reference_accuracy=None,
    num_candidates=101,
    max_sweeps=5,
):
    """Fits exit thresholds ``[E]`` on validation data.

    goal="tolerance": minimise average cost subject to accuracy >= reference_accuracy - value
    (reference default: accuracy of the final exit alone). goal="budget": maximise accuracy
    subject to average cost <= value.

    search="shared": one threshold at every non-final exit, chosen exactly among all distinct
    non-final confidences and +inf (never exit early). search="per_exit": from the best shared
    solution, block coordinate descent (at most ``max_sweeps`` sweeps) over single exits and
    pairs of exits; exit e's candidates are ``num_candidates`` quantiles of the confidences of
    the examples reaching it, plus +inf; a move is taken only when it keeps feasibility and
    strictly improves the objective. Deterministic. With E = 3 this is an exhaustive search
    over the candidates; its cost grows as E^2 * num_candidates sweeps over the data.

    When no shared setting is feasible, the closest one is returned with ``feasible=False``:
    the most accurate one for "tolerance" (with the default reference the all-final setting is
    always feasible) and the cheapest one (everything leaves at exit 0) for "budget".

    Returns a dict: thresholds [E], accuracy, avg_cost, exit_rates [E], feasible.
    """
    if goal not in GOALS:
        raise ValueError(f"Unknown goal {goal!r}; allowed: {', '.join(GOALS)}.")
    if search not in SEARCHES:
        raise ValueError(f"Unknown search {search!r}; allowed: {', '.join(SEARCHES)}.")
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    cost = np.asarray(cost, dtype=np.float64)
    num_exits, n = conf.shape
    if reference_accuracy is None:
        reference_accuracy = correct[-1].mean()

    def evaluate(counts, n_correct, goal=goal):
        """Objective keys and feasibility of candidates given their exit counts and number correct."""
        acc, avg_cost = n_correct / n, counts @ cost / n
        if goal == "tolerance":
            feasible = acc >= reference_accuracy - value - _EPS
        else:
            feasible = avg_cost <= value + _EPS
        return _keys(acc, avg_cost, goal), feasible

    taus = np.append(np.unique(conf[:-1]), np.inf)
    counts, n_correct = _shared_sweep(conf, correct, taus)
    keys, feasible = evaluate(counts, n_correct)
    best = _best(keys, feasible)
    if best is None:  # closest: tolerance -> most accurate, budget -> cheapest
        closest_keys, _ = evaluate(
            counts, n_correct, goal="budget" if goal == "tolerance" else "tolerance"
        )
        best = _best(closest_keys, np.ones_like(feasible))
    thresholds = _thresholds(num_exits, taus[best])

    if search == "per_exit" and feasible[best]:
        levels = np.linspace(0.0, 1.0, num_candidates)
        thresholds = _block_descent(conf, correct, thresholds, evaluate, levels, max_sweeps)

    counts, n_correct = _outcome(conf, correct, thresholds)
    _, feasible = evaluate(counts, n_correct)
    return {
        "thresholds": thresholds,
        "accuracy": float(n_correct[0] / n),
        "avg_cost": float(counts[0] @ cost / n),
        "exit_rates": counts[0] / n,
        "feasible": bool(feasible[0]),
    }


def tradeoff_curve(conf, correct, cost, num_points=101):
    """Accuracy and average cost of a shared threshold swept over ``num_points - 1`` quantiles
    of the non-final confidences (the first point sends everything to exit 0), plus +inf (all
    examples at the final exit). Returns a dict: thresholds, accuracy, avg_cost, exit_rates
    (``[num_points, E]``)."""
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    cost = np.asarray(cost, dtype=np.float64)
    n = conf.shape[1]
    taus = np.append(np.quantile(conf[:-1], np.linspace(0.0, 1.0, num_points - 1)), np.inf)
    counts, n_correct = _shared_sweep(conf, correct, taus)
    return {
        "thresholds": taus,
        "accuracy": n_correct / n,
        "avg_cost": counts @ cost / n,
        "exit_rates": counts / n,
    }


def patience_outcomes(preds, correct, cost):
    """Accuracy, average cost and exit rates ``[E, E]`` of the patience policy
    (``policies.patience_exit``) for every patience 1..E (patience E sends everything to the
    final exit). preds, correct: ``[E, N]``; cost: ``[E]``."""
    preds, correct = np.asarray(preds), np.asarray(correct, dtype=bool)
    cost = np.asarray(cost, dtype=np.float64)
    num_exits, n = preds.shape
    patience = np.arange(1, num_exits + 1)
    counts, n_correct = [], []
    for p in patience:
        exit_idx = patience_exit(preds, int(p))
        counts.append(np.bincount(exit_idx, minlength=num_exits))
        n_correct.append(correct[exit_idx, np.arange(n)].sum())
    counts, n_correct = np.array(counts), np.array(n_correct)
    return {
        "patience": patience,
        "accuracy": n_correct / n,
        "avg_cost": counts @ cost / n,
        "exit_rates": counts / n,
    }


def fit_patience(preds, correct, cost, *, goal, value, reference_accuracy=None):
    """The patience in 1..E that best meets the goal on validation data (see `fit_thresholds`
    for the goals and for the closest setting returned with ``feasible=False``).

    Returns a dict: patience, accuracy, avg_cost, exit_rates [E], feasible.
    """
    if goal not in GOALS:
        raise ValueError(f"Unknown goal {goal!r}; allowed: {', '.join(GOALS)}.")
    correct = np.asarray(correct, dtype=bool)
    if reference_accuracy is None:
        reference_accuracy = correct[-1].mean()
    out = patience_outcomes(preds, correct, cost)
    acc, avg_cost = out["accuracy"], out["avg_cost"]
    if goal == "tolerance":
        feasible = acc >= reference_accuracy - value - _EPS
    else:
        feasible = avg_cost <= value + _EPS
    best = _best(_keys(acc, avg_cost, goal), feasible)
    if best is None:
        other = "budget" if goal == "tolerance" else "tolerance"
        best = _best(_keys(acc, avg_cost, other), np.ones_like(feasible))
    return {
        "patience": int(out["patience"][best]),
        "accuracy": float(acc[best]),
        "avg_cost": float(avg_cost[best]),
        "exit_rates": out["exit_rates"][best],
        "feasible": bool(feasible[best]),
    }
