"""Delta_m%: the average relative change of an MTL model over its single-task baselines."""

from collections.abc import Mapping


AVERAGES = ("pairs", "tasks")


def delta_m(
    metrics: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]],
    average: str = "pairs",
) -> float:
    """Delta_m%: the average relative change over the single-task baselines, in percent.

    With r_tm = (-1)^{l_tm} (M_tm - M_b,tm) / M_b,tm (M_b the single-task baseline, l_tm = 1
    if lower is better for that metric, else 0; positive = better than the baselines):

      average="pairs" (default):  100 / N * sum_{(t, m)} r_tm, over all N (task, metric)
          pairs: Maninis, Radosavovic & Kokkinos (CVPR 2019) and Nash-MTL's reporting;
      average="tasks":  100 / T * sum_t (1 / N_t) sum_m r_tm, each task's metrics averaged
          first (LibMTL's convention: a task with several metrics counts once).

    The two agree when every task has one metric (this project's default judging metrics).
    A missing baseline or direction, or a zero baseline, raises ValueError: no fallback.
    """
    if average not in AVERAGES:
        raise ValueError(f"delta_m average={average!r} is not one of {', '.join(AVERAGES)}")
    per_task = []
    for task, task_metrics in metrics.items():
        terms = []
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
        if terms:
            per_task.append(terms)
    if not per_task:
        raise ValueError("delta_m needs at least one (task, metric) pair")
    if average == "tasks":
        return 100.0 * sum(sum(t) / len(t) for t in per_task) / len(per_task)
    pairs = [r for terms in per_task for r in terms]
    return 100.0 * sum(pairs) / len(pairs)
