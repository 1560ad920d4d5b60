"""An experiment built from a config: data, tasks, model, objective, strategy, optimizer, mesh.

`build_experiment(config)` validates the config and builds every component by name, compiling
nothing and touching no file; `init_state(exp)` creates the train state directly with its
shardings. Training (`train.py`, `loop.py`), benchmarks, evaluation and export all start here.
"""

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from hisd_jax import config as config_lib
from hisd_jax import data as data_lib
from hisd_jax.data import augment as augment_lib
from hisd_jax import optim, parallel, programs
from hisd_jax.errors import ConfigError
from hisd_jax.models import build_model, exit_positions, model_section
from hisd_jax.mtl import strategy as strategy_lib
from hisd_jax.mtl.tasks import TaskSpec, task_specs
from hisd_jax.objectives.objective import Objective, build_objective


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: optimizer steps taken (a unit of work may take several)
    params: Any
    batch_stats: Any  # BatchNorm running statistics ({} without BatchNorm)
    opt_state: Any  # optimizer state of {"model": params, "strategy": strategy_params}
    strategy_params: Any  # learnable MTL strategy parameters (UW's log-variances), else {}
    strategy_state: Any  # MTL strategy state (DWA's losses, GradVac's targets, ...), else {}
    program: Any  # the training program's state (programs/), {} for the standard program
    rng: jnp.ndarray  # uint32 key data; step keys are fold_in(rng, step)
    bad_step: jnp.ndarray  # int32: state.step before the first non-finite update, -1 if none


@dataclasses.dataclass
class Experiment:
    """Everything built from a config, shared by training, benchmarks and evaluation."""

    config: Any
    dataset: data_lib.Dataset
    tasks: list[TaskSpec]
    model: Any
    objective: Objective
    strategy: strategy_lib.Strategy
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Any
    param_labels: Any  # label tree of the model's parameters (models/labels.py)
    steps_per_epoch: int  # training-stream batches per pass over the train split
    program: Any = None  # the training program (programs/), set by build_experiment
    # `state_shardings`, computed once; not an init field, so `dataclasses.replace` (another
    # optimizer, strategy or program) computes it again for the new experiment
    _state_shardings: Any = dataclasses.field(default=None, init=False, repr=False)

    @property
    def state_shardings(self):
        """A NamedSharding per TrainState leaf (`parallel.state_shardings` with the config's
        `mesh` rules): what `init_state` creates, every step takes and returns, and a restore
        reshards into."""
        if self._state_shardings is None:
            abstract = jax.eval_shape(_init_fn(self), self.config.seed)
            m = self.config.mesh
            self._state_shardings = parallel.state_shardings(
                self.mesh, abstract, m.rules, m.min_shard_size
            )
        return self._state_shardings

    @property
    def augment(self):
        """The training stream's augmentation (`data/augment.py`; None for data.augment='none'),
        applied by the training `BatchIterator`."""
        d = self.config.data
        return augment_lib.build(d.augment, padding=d.crop_padding, key=self.dataset.input_key)

    @property
    def exit_names(self):
        return self.model.exit_names

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def batch_keys(self, train: bool) -> tuple[str, ...]:
        """The batch fields the jitted steps read (the loader's other fields stay on host)."""
        keys = (self.dataset.input_key, "index", "position", *(t.label_key for t in self.tasks))
        return keys if train else (*keys, "mask")


def build_experiment(config) -> Experiment:
    """Validates the config and builds data, model, objective and optimizer (no compile).

    Raises:
      ConfigError: the first invalid field (one line naming it and the allowed values).
    """
    config_lib.validate(config)
    try:
        dataset = data_lib.get_dataset(
            config.data.name, seed=config.data.seed, **config.data.kwargs
        )
    except ConfigError:  # errors.DataError: the data set's contents, already one line
        raise
    except (TypeError, ValueError) as e:  # a bad or unknown data.kwargs entry
        raise ConfigError(f"data.kwargs of data.name={config.data.name!r}: {e}") from e
    if config.data.augment != "none" and (
        len(dataset.image_shape) != 3 or not dataset.input_dtype.startswith("float")
    ):
        raise ConfigError(
            f"data.augment={config.data.augment!r} needs images [H, W, C]; data.name="
            f"{config.data.name!r} gives {dataset.input_dtype} {list(dataset.image_shape)} "
            "(use data.augment='none')"
        )
    tasks = task_specs(config, dataset.tasks)
    model_cfg = model_section(config)
    try:
        model = build_model(model_cfg, tasks, dataset=dataset)
    except ValueError as e:  # a model the data cannot feed (e.g. a transformer on images)
        raise ConfigError(str(e)) from e
    depths = exit_positions(model_cfg)[: model.num_exits]
    try:
        objective = build_objective(config.objective, tasks, depths)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    steps_per_epoch = data_lib.steps_per_epoch(
        len(dataset.splits["train"]), config.train.batch_size
    )
    strategy = build_strategy(config, tasks, steps_per_epoch)
    try:  # traces the model on the data's input shape: shape errors are config errors
        abstract = jax.eval_shape(
            lambda: model.init(
                jax.random.key(0), jnp.zeros((1, *dataset.image_shape), dataset.input_dtype)
            )
        )
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    exp = Experiment(
        config,
        dataset,
        tasks,
        model,
        objective,
        strategy,
        optim.build_optimizer(config.optimizer, config.train.steps),
        optim.schedule(config.optimizer, config.train.steps),
        parallel.make_mesh(config.mesh),
        model.param_labels(abstract["params"]),
        steps_per_epoch,
    )
    try:
        for name in programs.PROGRAMS:  # every program's own settings, running or not
            programs.program_class(name).check_fields(config.program)
        exp.program = programs.program_class(config.program.name)(exp)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    per_unit = exp.program.updates_per_unit
    if config.train.steps % per_unit:
        raise ConfigError(
            f"train.steps={config.train.steps} must be a multiple of {per_unit}: a unit of work "
            f"of program {config.program.name!r} takes {per_unit} optimizer steps"
        )
    return exp


def build_strategy(config, tasks, steps_per_epoch: int) -> strategy_lib.Strategy:
    """The MTL strategy of `config.mtl` (EW for a single task reduces to the plain loss).

    gcosine's target is `mtl.hparams.target` if given, else `program.target` (the target the
    target-focused programs use), else the first task."""
    hparams = config.mtl.hparams.to_dict()
    if config.mtl.method == "gcosine" and "target" not in hparams and config.program.target:
        hparams["target"] = config.program.target
    try:
        return strategy_lib.build_strategy(
            config.mtl.method,
            [t.name for t in tasks],
            space=config.mtl.space,
            backward=config.mtl.backward,
            steps_per_epoch=steps_per_epoch,
            **hparams,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"mtl: {e}") from e


def _init_fn(exp: Experiment):
    """seed -> the initial TrainState (pure; `init_state` jits it with the state's shardings)."""
    shape = (1, *exp.dataset.image_shape)

    def init(seed):
        key = jax.random.key(seed)
        variables = exp.model.init(key, jnp.zeros(shape, exp.dataset.input_dtype))
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
        strategy_params, strategy_state = exp.strategy.init()
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=exp.tx.init({"model": params, "strategy": strategy_params}),
            strategy_params=strategy_params,
            strategy_state=strategy_state,
            program=(
                exp.program.init_state({"params": params, "batch_stats": batch_stats})
                if exp.program is not None
                else {}
            ),
            rng=jax.random.key_data(jax.random.fold_in(key, 1)),
            bad_step=jnp.full((), -1, jnp.int32),
        )

    return init


def init_state(exp: Experiment) -> TrainState:
    """Creates the train state directly with its shardings (`Experiment.state_shardings`:
    replicated, or FSDP-sharded leaves; no host copy, no device holds more than its shard)."""
    return jax.jit(_init_fn(exp), static_argnums=0, out_shardings=exp.state_shardings)(
        exp.config.seed
    )
