"""Delta_m%: the average relative change of an MTL model over its single-task baselines."""

from collections.abc import Mapping


def delta_m(
    metrics: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]],
) -> float:
    """Delta_m = 100 / N * sum_{(t, m)} (-1)^{l_tm} (M_tm - M_b,tm) / M_b,tm.

    (Maninis, Radosavovic & Kokkinos, CVPR 2019; as reported by LibMTL and Nash-MTL.)

    The sum runs over all N (task, metric) pairs in ``metrics``; M_b is the single-task baseline
    and l_tm = 1 if lower is better for that metric, else 0, so a positive Delta_m means better
    than the baselines on average. A missing baseline or direction, or a zero baseline, raises
    ValueError: there is no fallback.
    """
    terms = []
    for task, task_metrics in metrics.items():
        for name, value in task_metrics.items():
            try:
                base = baselines[task][name]
                higher = higher_is_better[task][name]
            except KeyError as err:
                raise ValueError(
                    f"no baseline/direction for task {task!r} metric {name!r}"
                ) from err
            if base == 0:
                raise ValueError(f"baseline of task {task!r} metric {name!r} is 0")
            sign = 1.0 if higher else -1.0
            terms.append(sign * (value - base) / base)
    if not terms:
        raise ValueError("delta_m needs at least one (task, metric) pair")
    return 100.0 * sum(terms) / len(terms)
