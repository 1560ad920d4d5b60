"""αVIL as a training program (`program.name = "alphavil"`).

Kourdis, Gordon-Hall & Gorinski, arXiv 2405.07769 (Algorithm 1); the pure pieces are
`mtl/alphavil.py`. An αVIL epoch is the `steps_per_epoch` units of its joint pass followed by
the epoch's αVIL update:

  0. joint pass: one unit = one optimizer step (the config's `optimizer`, the train state's
     optimizer state) on one batch of the training stream with loss Σ_t w_t L_t: the multitask
     training that the task weights w steer;
  then, once the epoch's last joint step is taken, one jitted function (`end_epoch`):
  1. from θ, every task trains alone with loss w_t L_t for K = round(program.rho x
     steps_per_epoch) steps on a ρ-fraction sample of the training split (K batches drawn by
     (config.seed, epoch); every example carries every task's label, so the tasks share the
     sample) with the config's `optimizer`, its name and learning rate replaced by
     `program.inner_optimizer` and `program.inner_lr` where set (its state fresh each epoch
     or carried, `program.inner_state`), vmapped, looped or scanned over tasks (`program.task_batching`):
     δ_t = θ_t − θ, BatchNorm statistics too;
  2. α (from 1) takes `alpha_steps` steps of `alpha_optimizer` at `alpha_lr` on the target's
     loss, evaluation mode, at θ + Σ α_t δ_t, one batch of `alpha_batch_size` rows of the
     validation split (drawn by (config.seed, epoch)) a step;
  3. θ ← θ + Σ α_t δ_t, w_t ← w_t + (α_t − 1) (clipped to `weight_clamp` if set).

`state.step` counts joint steps (batches of the training stream). Examples seen per epoch:
(steps_per_epoch + T x K) x batch + alpha_steps x alpha_batch_size, about
1 + ρ·T + alpha_steps x alpha_batch_size / (steps_per_epoch x batch) times a plain epoch. `program.budget` says what `train.steps` buys: "epochs" (the
same epochs as a standard run of train.steps) or "examples" (the whole epochs whose examples
fit in train.steps batches; `total_steps`). A resume is exact
at any step: the epoch's phase is `state.step`, its samples depend on (seed, epoch) alone, and
the program state holds w, the last α and dev losses, the epoch count, α and w after every
epoch so far (`alpha_history`, `weight_history`, [epochs, T], NaN ahead) and, if carried,
every task's inner optimizer state. Results are reported on test at the final parameters (validation
feeds the α fit and must not also select the model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from hisd_jax import data as data_lib
from hisd_jax.data import augment as augment_lib
from hisd_jax import optim, parallel, steps
from hisd_jax.config import OPTIMIZERS
from hisd_jax.errors import ConfigError
from hisd_jax.mtl import alphavil
from hisd_jax.programs.base import Program

ALPHA_OPTIMIZERS = {"sgd": optax.sgd, "adam": optax.adam}
INNER_STATES = ("fresh", "carried")
BUDGETS = ("epochs", "examples")


class AlphaVILProgram(Program):
    """αVIL (see the module docstring)."""

    name = "alphavil"

    @staticmethod
    def check_fields(program_cfg) -> None:
        _check_fields(program_cfg)

    def __init__(self, exp):
        super().__init__(exp)
        self.cfg = cfg = _checked_config(exp)
        names = exp.task_names
        self.target = names.index(cfg.target) if cfg.target else 0
        self.steps_per_epoch = exp.steps_per_epoch
        self.inner_steps = max(1, round(cfg.rho * exp.steps_per_epoch))
        self.inner_tx = optim.build_optimizer(_inner_optimizer(exp.config), exp.config.train.steps)
        self.alpha_tx = ALPHA_OPTIMIZERS[cfg.alpha_optimizer](cfg.alpha_lr)
        self.alpha_batch_size = cfg.alpha_batch_size or exp.config.train.batch_size
        steps = exp.config.train.steps
        if steps < self.steps_per_epoch:
            raise ConfigError(
                f"train.steps={steps} is less than one αVIL epoch ({self.steps_per_epoch} "
                "steps of the training split): no αVIL update would run"
            )
        if cfg.budget == "epochs" and steps % self.steps_per_epoch:
            logging.warning(
                "αVIL runs whole epochs: train.steps=%d is %d epochs of %d steps; the last %d "
                "steps are dropped",
                steps,
                steps // self.steps_per_epoch,
                self.steps_per_epoch,
                steps % self.steps_per_epoch,
            )
        self._epoch_fn = None
        self._step = None  # the next unit's step, read from the state once (host side)

    @property
    def total_steps(self) -> int:
        """The whole epochs of `train.steps` (budget "epochs": as many epochs as a standard
        run of train.steps; a remainder of train.steps % steps_per_epoch steps is dropped, with
        a warning), or (budget "examples") the whole epochs whose examples fit in train.steps
        batches:
        an epoch reads (steps_per_epoch + T x K) training batches and alpha_steps validation
        batches of alpha_batch_size rows."""
        steps = self.exp.config.train.steps
        if self.cfg.budget == "epochs":  # whole epochs: a remainder would train without update
            return steps // self.steps_per_epoch * self.steps_per_epoch
        batch = self.exp.config.train.batch_size
        seen = (self.steps_per_epoch + len(self.exp.tasks) * self.inner_steps) * batch
        seen += self.cfg.alpha_steps * self.alpha_batch_size
        return max(1, steps * batch // seen) * self.steps_per_epoch

    # ------------------------------------------------------------------ state
    def init_state(self, variables):
        num = len(self.exp.tasks)
        state = {
            "weights": jnp.ones(num, jnp.float32),
            "alpha": jnp.ones(num, jnp.float32),
            "dev_loss": jnp.zeros(2, jnp.float32),  # the last fit's [before, after]
            "epoch": jnp.zeros((), jnp.int32),
            # α and w after each epoch's update, [epochs of the run, T] (NaN: not yet run)
            "alpha_history": jnp.full((self.epochs, num), jnp.nan, jnp.float32),
            "weight_history": jnp.full((self.epochs, num), jnp.nan, jnp.float32),
        }
        if self.cfg.inner_state == "carried":
            stacked = jax.tree.map(lambda x: jnp.stack([x] * num), variables["params"])
            state["inner_opt"] = jax.vmap(self.inner_tx.init)(stacked)
        return state

    # ------------------------------------------------------------------ 0. the joint pass
    def make_unit_fn(self):
        exp, names = self.exp, self.exp.task_names

        def joint_step(state, sums, batch):
            program = state.program
            ctx = steps.LossContext.hard(steps.progress(exp, state.step), len(names))

            def objective(params):
                losses, (metrics, new_bs) = steps.loss_fn(
                    exp, params, state.batch_stats, batch, ctx
                )
                return jnp.sum(program["weights"] * losses), (metrics, new_bs)

            (loss, (metrics, new_bs)), grads = jax.value_and_grad(objective, has_aux=True)(
                state.params
            )
            no_strategy = jax.tree.map(jnp.zeros_like, state.strategy_params)
            state, update_metrics = steps.apply_update(
                exp, state, loss, (grads, no_strategy), state.strategy_state, new_bs
            )
            metrics = {"loss": loss, **update_metrics, **metrics}
            metrics["alphavil/dev_loss_before_fit"] = program["dev_loss"][0]
            metrics["alphavil/dev_loss_after_fit"] = program["dev_loss"][1]
            for i, t in enumerate(names):
                metrics[f"weight/{t}"] = program["weights"][i]
                metrics[f"alphavil/weight/{t}"] = program["weights"][i]
                metrics[f"alphavil/alpha/{t}"] = program["alpha"][i]
            metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
            return state, steps.accumulate(sums, metrics)

        return joint_step

    # ------------------------------------------------------------------ 1-3. the αVIL update
    def make_epoch_fn(self):
        """`(state, sums, *K train batches, *alpha_steps dev batches) -> (state, sums)`:
        steps 1-3 of the module docstring; `state.step` unchanged, `sums` passed through."""
        exp, cfg, k = self.exp, self.cfg, self.inner_steps
        num, target = len(exp.tasks), self.target
        target_name = exp.task_names[target]
        clamp = tuple(cfg.weight_clamp) or None

        def task_loss(params, batch_stats, batch, t, progress):
            ctx = steps.LossContext.hard(progress, num, active=jax.nn.one_hot(t, num))
            losses, (_, new_bs) = steps.loss_fn(exp, params, batch_stats, batch, ctx)
            return losses[t], new_bs

        def dev_loss(variables, batch):
            outputs = exp.model.apply(
                variables, batch[exp.dataset.input_key], project=exp.objective.needs_projection
            )
            ctx = steps.LossContext.hard(1.0, num, active=jax.nn.one_hot(target, num))
            losses, _ = exp.objective.task_losses(outputs, batch, ctx)
            return losses[target_name]

        def epoch_fn(state, sums, *batches):
            program = state.program
            train = jax.tree.map(lambda *xs: jnp.stack(xs), *batches[:k])
            dev = jax.tree.map(lambda *xs: jnp.stack(xs), *batches[k:])
            progress = steps.progress(exp, state.step)
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            if cfg.inner_state == "carried":
                opt_states = program["inner_opt"]
            else:
                stacked = jax.tree.map(lambda x: jnp.stack([x] * num), state.params)
                opt_states = jax.vmap(self.inner_tx.init)(stacked)
            deltas, opt_states, _ = alphavil.single_task_deltas(
                lambda p, bs, b, t: task_loss(p, bs, b, t, progress),
                self.inner_tx,
                variables,
                opt_states,
                train,
                program["weights"],
                cfg.task_batching,
            )
            alpha, dev_losses = alphavil.fit_alpha(
                dev_loss, self.alpha_tx, variables, deltas, jnp.ones(num, jnp.float32), dev
            )
            merged = alphavil.merge(variables, deltas, alpha)
            weights = alphavil.update_weights(program["weights"], alpha, clamp)
            finite = jnp.all(jnp.isfinite(alpha)) & jnp.all(
                jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(merged)])
            )
            ok = finite & (state.bad_step < 0)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
            after = dev_loss(merged, jax.tree.map(lambda x: x[-1], dev))
            new_program = {
                "weights": keep(weights, program["weights"]),
                "alpha": keep(alpha, program["alpha"]),
                "dev_loss": keep(jnp.stack([dev_losses[0], after]), program["dev_loss"]),
                "epoch": program["epoch"] + 1,
            }
            row = jnp.minimum(program["epoch"], program["alpha_history"].shape[0] - 1)
            for name, key in (("alpha_history", "alpha"), ("weight_history", "weights")):
                new_program[name] = program[name].at[row].set(new_program[key])
            if cfg.inner_state == "carried":
                new_program["inner_opt"] = keep(opt_states, program["inner_opt"])
            state = state.replace(
                params=keep(merged["params"], state.params),
                batch_stats=keep(merged["batch_stats"], state.batch_stats),
                program=new_program,
                bad_step=jnp.where(ok | (state.bad_step >= 0), state.bad_step, state.step),
            )
            return state, sums

        return epoch_fn

    def end_epoch(self, state, epoch: int):
        """Steps 1-3 for `epoch` (0-based) on its sampled batches; returns the new state."""
        if self._epoch_fn is None:
            num_batches = self.inner_steps + self.cfg.alpha_steps
            self._epoch_fn = steps.jit_unit(self.exp, self.make_epoch_fn(), num_batches)
        size = self.exp.config.train.batch_size
        train = self.sampled_batches("train", epoch, 1102, self.inner_steps, size)
        dev = self.sampled_batches("val", epoch, 1103, self.cfg.alpha_steps, self.alpha_batch_size)
        return self._epoch_fn(state, {}, *train, *dev)[0]

    def sampled_batches(self, split: str, epoch: int, salt: int, count: int, size: int):
        """`count` global batches of `size` rows of `split` drawn without replacement (with it
        when the split is smaller) by (config.seed, salt, epoch) alone; this process's block of
        each, sharded like a training batch. Training rows are augmented like the training
        stream (`Experiment.augment`), each example by its own draw of (seed, salt, epoch), so
        the batches do not depend on the process count."""
        exp = self.exp
        source = exp.dataset.splits[split]
        local = size // jax.process_count()
        start = jax.process_index() * local
        rng = np.random.default_rng([exp.config.seed, salt, epoch])
        total = count * size
        rows = (
            rng.permutation(len(source))[:total]
            if total <= len(source)
            else rng.choice(len(source), total, replace=True)
        )
        keys = exp.batch_keys(train=True)
        sharding = parallel.batch_sharded(exp.mesh)
        augment = exp.augment if split == "train" else None
        if augment is not None:  # one draw per example of the split, indexed by its row
            aug_rng = np.random.default_rng([exp.config.seed, salt, epoch, augment_lib.STREAM])
            draws = augment.draw(aug_rng, len(source))
        out = []
        for i in range(count):
            block = rows[i * size : (i + 1) * size][start : start + local]
            batch = data_lib.with_positions(source, np.sort(block))
            if augment is not None:
                batch = augment.apply(batch, {k: v[batch["position"]] for k, v in draws.items()})
            out.append(parallel.global_batch({k: batch[k] for k in keys}, sharding))
        return out

    def run_unit(self, state, sums, batches):
        if self._step is None:  # once per run: the host does not read the state per unit
            self._step = int(jax.device_get(state.step))
        state, sums = super().run_unit(state, sums, batches)
        self._step += 1
        if self._step % self.steps_per_epoch == 0:
            state = self.end_epoch(state, self._step // self.steps_per_epoch - 1)
        return state, sums

    @property
    def epochs(self) -> int:
        """αVIL epochs (updates) the run takes: whole epochs of `total_steps`, at least 1."""
        return max(1, self.total_steps // self.steps_per_epoch)

    def results(self, state) -> dict:
        program = jax.device_get(state.program)
        names = self.exp.task_names
        done = int(program["epoch"])

        def history(key):
            return {t: [float(v) for v in program[key][:done, i]] for i, t in enumerate(names)}

        return {
            "alphavil": {
                "target": names[self.target],
                "epochs": int(program["epoch"]),
                "joint_steps_per_epoch": self.steps_per_epoch,
                "inner_steps_per_epoch": self.inner_steps,
                "alpha_steps_per_epoch": self.cfg.alpha_steps,
                "alpha_batch_size": self.alpha_batch_size,
                "weights": {t: float(w) for t, w in zip(names, program["weights"])},
                "last_alpha": {t: float(a) for t, a in zip(names, program["alpha"])},
                "alpha_history": history("alpha_history"),
                "weight_history": history("weight_history"),
                "reported_parameters": "final",
            }
        }


def benchmark_settings(config, budget: str = "epochs") -> None:
    """Sets, in place, the αVIL settings of the project's benchmarks (configs/
    alphavil_multidigits.py, configs/mtl_multimnist.py): inner runs of plain SGD at 0.05, α
    by Adam at 0.05 on 256 validation rows a step, w kept in [0, 3], and `budget`. Chosen on
    the validation loss of the α fit on MultiDigits (see that config's docstring)."""
    config.program.inner_optimizer = "sgd"
    config.program.inner_lr = 0.05
    config.program.alpha_optimizer = "adam"
    config.program.alpha_lr = 0.05
    config.program.alpha_batch_size = 256
    config.program.weight_clamp = (0.0, 3.0)
    config.program.budget = budget


def _inner_optimizer(config):
    """The `optimizer` section with `program.inner_optimizer` / `program.inner_lr` applied."""
    opt = config.optimizer.to_dict()
    if config.program.inner_optimizer:
        opt["name"] = config.program.inner_optimizer
    if config.program.inner_lr:
        opt["lr"] = config.program.inner_lr
    return ml_collections.ConfigDict(opt)


def _checked_config(exp):
    """The program section, validated against the experiment (ConfigError naming the field)."""
    cfg = exp.config.program
    names = exp.task_names
    if exp.config.mtl.method != "ew":
        raise ConfigError(
            f"mtl.method={exp.config.mtl.method!r}: program.name='alphavil' weighs the tasks "
            "itself (its joint pass minimises Σ w_t L_t); use mtl.method='ew'"
        )
    if cfg.target and cfg.target not in names:
        raise ConfigError(f"program.target={cfg.target!r} is not one of data.tasks={names}")
    AlphaVILProgram.check_fields(cfg)
    if len(exp.dataset.splits["val"]) < 1:
        raise ConfigError("program.name='alphavil' fits α on the validation split: it is empty")
    return cfg


def _check_fields(cfg) -> None:
    """αVIL's settings on their own (`Program.check_fields`): every run checks them."""
    if not (isinstance(cfg.rho, float | int) and 0 < cfg.rho <= 1):
        raise ConfigError(f"program.rho={cfg.rho!r} must lie in (0, 1]")
    if cfg.inner_state not in INNER_STATES:
        raise ConfigError(
            f"program.inner_state={cfg.inner_state!r} is not one of {', '.join(INNER_STATES)}"
        )
    if cfg.task_batching not in alphavil.TASK_BATCHING:
        raise ConfigError(
            f"program.task_batching={cfg.task_batching!r} is not one of "
            f"{', '.join(alphavil.TASK_BATCHING)}"
        )
    if cfg.alpha_optimizer not in ALPHA_OPTIMIZERS:
        raise ConfigError(
            f"program.alpha_optimizer={cfg.alpha_optimizer!r} is not one of "
            f"{', '.join(ALPHA_OPTIMIZERS)}"
        )
    if cfg.budget not in BUDGETS:
        raise ConfigError(f"program.budget={cfg.budget!r} is not one of {', '.join(BUDGETS)}")
    if cfg.inner_optimizer and cfg.inner_optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"program.inner_optimizer={cfg.inner_optimizer!r} is not one of '' (the "
            f"optimizer's), {', '.join(OPTIMIZERS)}"
        )
    if not np.isfinite(cfg.inner_lr) or cfg.inner_lr < 0:
        raise ConfigError(
            f"program.inner_lr={cfg.inner_lr!r} must be a finite number >= 0 (0: optimizer.lr)"
        )
    if not np.isfinite(cfg.alpha_lr) or cfg.alpha_lr < 0:
        raise ConfigError(f"program.alpha_lr={cfg.alpha_lr!r} must be a finite number >= 0")
    if not isinstance(cfg.alpha_steps, int) or cfg.alpha_steps < 1:
        raise ConfigError(f"program.alpha_steps={cfg.alpha_steps!r} must be an integer >= 1")
    size, devices = cfg.alpha_batch_size, jax.device_count()
    if not isinstance(size, int) or size < 0 or (size and size % devices):
        raise ConfigError(
            f"program.alpha_batch_size={size!r} must be 0 (train.batch_size) or a positive "
            f"multiple of the device count ({devices})"
        )
    clamp = tuple(cfg.weight_clamp)
    if clamp and not (len(clamp) == 2 and clamp[0] <= clamp[1]):
        raise ConfigError(
            f"program.weight_clamp={clamp!r} must be () or (low, high) with low <= high"
        )
