"""The tasks of an experiment as the MTL layer sees them: metrics, directions, exits.

A `TaskSpec` joins what the data set says about a task (`data.TaskInfo`: name, kind,
label field, number of classes) with what the config says: which exits of the shared
trunk its head reads (`model.task_exits`, default every exit) and which test metrics
judge it, each with its direction (`mtl.metrics`, default by kind):

  classification: accuracy (higher is better)
  regression:     mae (lower is better)

`mtl.metrics.<task>` overrides the default with {metric: "higher" | "lower"}, the metrics
being those `results.json` holds for the task's kind (classification: accuracy, loss, ece;
regression: mse, mae). A task is judged at its deepest exit (`TaskSpec.eval_exit`), the
entry `results[split][task][eval_exit][metric]` of `train_and_evaluate`'s results.

`single_task_config` and `method_config` derive the runs of an MTL comparison from one
experiment config: the single-task baseline of a task (only that task, plain EW, same model,
objective, optimizer and budget) and the same experiment under another MTL method.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence

import ml_collections

from hisd_jax.errors import ConfigError
from hisd_jax.kinds import KINDS, METRIC_DIRECTIONS, TaskKind, get_kind
from hisd_jax.models import num_exits
from hisd_jax.mtl.strategy import GRADIENT_METHODS, SPACES, STRATEGIES
from hisd_jax import programs

# The metrics results.json holds for each task kind, and each kind's default judging metric.
KIND_METRICS = {name: kind.metrics for name, kind in KINDS.items()}
DEFAULT_METRICS = {name: kind.default_metrics for name, kind in KINDS.items()}
DIRECTIONS = {"higher": True, "lower": False}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of the experiment: built once (`task_specs`) and used by every layer."""

    name: str
    kind: str  # "classification" | "regression": a key of kinds.KINDS
    label_key: str
    num_classes: int  # 0 for regression
    exits: tuple[int, ...]  # the exits whose head predicts the task, shallow -> deep
    metrics: Mapping[str, bool]  # metric -> higher is better (ordered as configured)

    @property
    def eval_exit(self) -> str:
        """The exit the task is judged at: its deepest one."""
        return f"exit{self.exits[-1]}"

    @property
    def task_kind(self) -> TaskKind:
        """How this kind of task is trained, evaluated and predicted (kinds.py)."""
        return get_kind(self.kind)

    @property
    def num_outputs(self) -> int:
        """The width of the task's head at each of its exits."""
        return self.task_kind.num_outputs(self.num_classes)


def check_metrics_field(metrics, tasks: Sequence[str]) -> None:
    """Validates `mtl.metrics` without the data set (names and directions only)."""
    for task, chosen in metrics.items():
        if task not in tasks:
            raise ConfigError(f"mtl.metrics names {task!r}, which is not in data.tasks")
        if not hasattr(chosen, "items") or not chosen:
            raise ConfigError(
                f"mtl.metrics.{task} must map metric names to 'higher' or 'lower', e.g. "
                "{'accuracy': 'higher'}"
            )
        for metric, direction in chosen.items():
            if metric not in METRIC_DIRECTIONS:
                raise ConfigError(
                    f"mtl.metrics.{task}.{metric}: unknown metric; one of "
                    f"{', '.join(METRIC_DIRECTIONS)}"
                )
            if direction not in DIRECTIONS:
                raise ConfigError(
                    f"mtl.metrics.{task}.{metric}={direction!r} is not one of higher, lower"
                )


def _task_exits(config, task: str) -> tuple[int, ...]:
    n = num_exits(config.model)
    chosen = config.model.task_exits.get(task)
    return tuple(range(n)) if chosen is None else tuple(e for e in chosen if e < n)


def task_specs(config, dataset_tasks: Mapping) -> list[TaskSpec]:
    """The TaskSpec of every task in `config.data.tasks`, in order.

    `dataset_tasks` is the data set's {name: TaskInfo} (`Dataset.tasks`).

    Raises:
      ConfigError: a task the data set does not offer, or a bad `mtl.metrics` entry.
    """
    overrides = config.mtl.get("metrics") or {}
    check_metrics_field(overrides, tuple(config.data.tasks))
    specs = []
    for name in config.data.tasks:
        if name not in dataset_tasks:
            raise ConfigError(
                f"data.tasks={tuple(config.data.tasks)}: {name!r} is not one of "
                f"{', '.join(dataset_tasks)}"
            )
        info = dataset_tasks[name]
        if name in overrides:
            metrics = {m: DIRECTIONS[d] for m, d in overrides[name].items()}
            wrong = [m for m in metrics if m not in KIND_METRICS[info.kind]]
            if wrong:
                raise ConfigError(
                    f"mtl.metrics.{name}.{wrong[0]}: task {name!r} is {info.kind}; its metrics "
                    f"are {', '.join(KIND_METRICS[info.kind])}"
                )
        else:
            metrics = dict(DEFAULT_METRICS[info.kind])
        specs.append(
            TaskSpec(
                name,
                info.kind,
                info.label_key,
                info.num_classes,
                _task_exits(config, name),
                metrics,
            )
        )
    return specs


def directions(specs: Sequence[TaskSpec]) -> dict[str, dict[str, bool]]:
    """{task: {metric: higher is better}}, the form `delta_m.delta_m` takes."""
    return {s.name: dict(s.metrics) for s in specs}


def task_metrics(results: Mapping, specs: Sequence[TaskSpec], split: str = "test") -> dict:
    """{task: {metric: value}} of each spec's metrics at its evaluated exit.

    Tasks of `specs` that `results` does not hold are left out (a single-task run holds one).
    """
    out = {}
    for s in specs:
        if s.name not in results[split]:
            continue
        per_exit = results[split][s.name]
        if s.eval_exit not in per_exit:
            raise ValueError(
                f"results hold task {s.name!r} at exits {', '.join(per_exit)}, not at "
                f"{s.eval_exit}: the runs do not share model.task_exits"
            )
        out[s.name] = {m: float(per_exit[s.eval_exit][m]) for m in s.metrics}
    return out


def _replace(config, updates: dict):
    """A copy of `config` with top-level-dotted fields replaced (sections may be new dicts)."""
    config = copy.deepcopy(config)
    config.unlock()
    for dotted, value in updates.items():
        section, _, field = dotted.rpartition(".")
        target = config
        for key in section.split(".") if section else ():
            target = target[key]
        if isinstance(value, dict):
            value = ml_collections.ConfigDict(value)
        target[field] = value
    config.lock()
    return config


def single_task_config(config, task: str, seed: int | None = None, name: str | None = None):
    """The single-task baseline of `task`: only that task, EW, everything else unchanged."""
    if task not in config.data.tasks:
        raise ConfigError(
            f"single={task!r} is not one of the experiment's tasks {', '.join(config.data.tasks)}"
        )
    updates = {
        "name": name or f"{config.name}_single_{task}",
        "data.tasks": (task,),
        "model.task_exits": {k: v for k, v in config.model.task_exits.items() if k == task},
        "mtl.method": "ew",
        "mtl.space": "param",
        "mtl.hparams": {},
        "mtl.metrics": {k: v for k, v in (config.mtl.get("metrics") or {}).items() if k == task},
        "program.name": "standard",
    }
    if seed is not None:
        updates["seed"] = seed
    return _replace(config, updates)


def method_config(
    config,
    method: str,
    space: str | None = None,
    seed: int | None = None,
    hparams=None,
    name: str | None = None,
    program: str = "standard",
):
    """`config` trained with MTL method `method` (in `space`, default the config's) by the
    training program `program`.

    The method's hyper-parameters are `hparams`, else the config's own when it already uses
    `method`, else the method's defaults.
    """
    space = space or config.mtl.space
    if hparams is None:
        hparams = config.mtl.hparams.to_dict() if method == config.mtl.method else {}
    suffix = f"_{space}" if space != "param" else ""
    prefix = f"{program}_" if program != "standard" else ""
    updates = {
        "name": name or f"{config.name}_{prefix}{method}{suffix}",
        "program.name": program,
        "mtl.method": method,
        "mtl.space": space,
        "mtl.hparams": dict(hparams),
    }
    if seed is not None:
        updates["seed"] = seed
    return _replace(config, updates)


def parse_method(token: str, default_space: str = "param") -> tuple[str, str]:
    """'pcgrad' -> ('pcgrad', default_space); 'pcgrad@rep' -> ('pcgrad', 'rep').

    Loss weightings have no space; theirs is reported as 'param'.
    """
    name, _, space = token.strip().partition("@")
    if name not in STRATEGIES:
        raise ConfigError(f"method {token!r}: {name!r} is not one of {', '.join(STRATEGIES)}")
    space = space or default_space
    if space not in SPACES:
        raise ConfigError(f"method {token!r}: space {space!r} is not one of {', '.join(SPACES)}")
    return name, (space if name in GRADIENT_METHODS else "param")


def parse_run(token: str, default_space: str = "param") -> tuple[str, str, str]:
    """A sweep token -> (program, method, space).

    'pcgrad@rep' -> ('standard', 'pcgrad', 'rep'); 'kd_joint' -> ('kd_joint', 'ew', 'param');
    'kd_joint+cagrad' -> ('kd_joint', 'cagrad', default_space): a training program, optionally
    with the MTL method it composes with (default EW).
    """
    head, plus, method = token.strip().partition("+")
    program, _, _ = head.partition("@")
    if program in programs.PROGRAMS and program != "standard":
        name, space = parse_method(method if plus else "ew" + head[len(program) :], default_space)
        return program, name, space
    if plus:
        raise ConfigError(
            f"method {token!r}: {program!r} is not one of {', '.join(programs.PROGRAMS)}"
        )
    try:
        return ("standard", *parse_method(token, default_space))
    except ConfigError as e:
        others = [p for p in programs.PROGRAMS if p != "standard"]
        raise ConfigError(
            f"{e}; or a training program: {', '.join(others)} (optionally +method)"
        ) from e


def method_label(name: str, space: str, program: str = "standard") -> str:
    """'pcgrad' for parameter space (and every loss weighting), 'pcgrad@rep' otherwise;
    'kd_joint' (EW) or 'kd_joint+pcgrad@rep' under another training program."""
    label = name if space == "param" else f"{name}@{space}"
    if program == "standard":
        return label
    return program if label == "ew" else f"{program}+{label}"
