"""αVIL as a training program (`program.name = "alphavil"`): one unit = one αVIL epoch.

Kourdis, Gordon-Hall & Gorinski, arXiv 2405.07769; the pure pieces are `mtl/alphavil.py`.
A unit takes K = round(program.rho x steps per epoch) batches of the training stream (every
example carries every task's label) and `program.alpha_steps` batches of the target's
validation split, and in one jitted function:

  1. from θ, every task trains alone on the K batches with loss w_t L_t (the config's
     `optimizer`; its state fresh each epoch or carried, `program.inner_state`), vmapped or
     looped over tasks (`program.task_batching`): δ_t = θ_t − θ, BatchNorm statistics too;
  2. α (from 1) takes `alpha_steps` steps of `alpha_optimizer` at `alpha_lr` on the target's
     loss, evaluation mode, at θ + Σ α_t δ_t, one validation batch a step;
  3. θ ← θ + Σ α_t δ_t, w_t ← w_t + (α_t − 1) (clipped to `weight_clamp` if set).

`state.step` advances by K a unit (batches of the training stream consumed); the examples
seen are T x K x batch for the inner passes plus alpha_steps x batch for the α fit. The α-fit
batches are drawn from the validation split by (config.seed, epoch) alone, so a resume is
exact; results are reported on test at the final parameters (validation is used by the α fit
and must not also select the model). Program state: the weights w, the last α, the epoch and,
if carried, every task's inner optimizer state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hisd_jax import data as data_lib
from hisd_jax import optim, parallel, steps
from hisd_jax.errors import ConfigError
from hisd_jax.mtl import alphavil
from hisd_jax.programs.base import Program

ALPHA_OPTIMIZERS = {"sgd": optax.sgd, "adam": optax.adam}
INNER_STATES = ("fresh", "carried")


class AlphaVILProgram(Program):
    """αVIL (see the module docstring)."""

    name = "alphavil"

    def __init__(self, exp):
        super().__init__(exp)
        self.cfg = cfg = _checked_config(exp)
        names = exp.task_names
        self.target = names.index(cfg.target) if cfg.target else 0
        self.inner_steps = max(1, round(cfg.rho * exp.steps_per_epoch))
        self.batches_per_unit = self.updates_per_unit = self.inner_steps
        self.inner_tx = optim.build_optimizer(exp.config.optimizer, exp.config.train.steps)
        self.alpha_tx = ALPHA_OPTIMIZERS[cfg.alpha_optimizer](cfg.alpha_lr)
        self._epoch = None  # the next unit's epoch, read from the state once (host side)

    # ------------------------------------------------------------------ state
    def init_state(self, variables):
        num = len(self.exp.tasks)
        state = {
            "weights": jnp.ones(num, jnp.float32),
            "alpha": jnp.ones(num, jnp.float32),
            "epoch": jnp.zeros((), jnp.int32),
        }
        if self.cfg.inner_state == "carried":
            stacked = jax.tree.map(lambda x: jnp.stack([x] * num), variables["params"])
            state["inner_opt"] = jax.vmap(self.inner_tx.init)(stacked)
        return state

    # ------------------------------------------------------------------ the unit of work
    def make_unit_fn(self):
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
                variables, batch["image"], project=exp.objective.needs_projection
            )
            ctx = steps.LossContext.hard(1.0, num, active=jax.nn.one_hot(target, num))
            losses, _ = exp.objective.task_losses(outputs, batch, ctx)
            return losses[target_name]

        def unit_fn(state, sums, *batches):
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
            deltas, opt_states, inner_losses = alphavil.single_task_deltas(
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
            new_program = {
                "weights": keep(weights, program["weights"]),
                "alpha": keep(alpha, program["alpha"]),
                "epoch": program["epoch"] + 1,
            }
            if cfg.inner_state == "carried":
                new_program["inner_opt"] = keep(opt_states, program["inner_opt"])
            state = state.replace(
                step=state.step + k,
                params=keep(merged["params"], state.params),
                batch_stats=keep(merged["batch_stats"], state.batch_stats),
                program=new_program,
                bad_step=jnp.where(ok | (state.bad_step >= 0), state.bad_step, state.step),
            )
            metrics = {
                "loss": jnp.mean(inner_losses[target]),
                "alphavil/dev_loss_before": dev_losses[0],
                "alphavil/dev_loss_after_fit": dev_loss(merged, jax.tree.map(lambda x: x[-1], dev)),
            }
            for i, t in enumerate(exp.task_names):
                metrics[f"alphavil/alpha/{t}"] = alpha[i]
                metrics[f"alphavil/weight/{t}"] = new_program["weights"][i]
                metrics[f"{t}/inner_loss"] = jnp.mean(inner_losses[i])
            return state, steps.accumulate(sums, metrics)

        return unit_fn

    @property
    def unit(self):
        if self._unit is None:
            num_batches = self.inner_steps + self.cfg.alpha_steps
            self._unit = steps.jit_unit(self.exp, self.make_unit_fn(), num_batches)
        return self._unit

    def dev_batches(self, epoch: int) -> list[dict]:
        """The α-fit batches of `epoch`: validation rows drawn by (config.seed, epoch) only,
        this process's block of each global batch, sharded like a training batch."""
        exp = self.exp
        source = exp.dataset.splits["val"]
        size = exp.config.train.batch_size
        local = size // jax.process_count()
        start = jax.process_index() * local
        rng = np.random.default_rng([exp.config.seed, 1103, epoch])
        keys = exp.batch_keys(train=True)
        sharding = parallel.batch_sharded(exp.mesh)
        out = []
        for _ in range(self.cfg.alpha_steps):
            rows = rng.choice(len(source), size, replace=len(source) < size)
            batch = data_lib.with_positions(source, np.sort(rows[start : start + local]))
            out.append(parallel.global_batch({k: batch[k] for k in keys}, sharding))
        return out

    def run_unit(self, state, sums, batches):
        if self._epoch is None:  # once per run: the host does not read the state per unit
            self._epoch = int(jax.device_get(state.program["epoch"]))
        batches = [*batches, *self.dev_batches(self._epoch)]
        self._epoch += 1
        return super().run_unit(state, sums, batches)

    def results(self, state) -> dict:
        program = jax.device_get(state.program)
        names = self.exp.task_names
        return {
            "alphavil": {
                "target": names[self.target],
                "epochs": int(program["epoch"]),
                "inner_steps_per_epoch": self.inner_steps,
                "weights": {t: float(w) for t, w in zip(names, program["weights"])},
                "last_alpha": {t: float(a) for t, a in zip(names, program["alpha"])},
                "reported_parameters": "final",
            }
        }


def _checked_config(exp):
    """The program section, validated against the experiment (ConfigError naming the field)."""
    cfg = exp.config.program
    names = exp.task_names
    if cfg.target and cfg.target not in names:
        raise ConfigError(f"program.target={cfg.target!r} is not one of data.tasks={names}")
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
    if not np.isfinite(cfg.alpha_lr) or cfg.alpha_lr < 0:
        raise ConfigError(f"program.alpha_lr={cfg.alpha_lr!r} must be a finite number >= 0")
    if not isinstance(cfg.alpha_steps, int) or cfg.alpha_steps < 1:
        raise ConfigError(f"program.alpha_steps={cfg.alpha_steps!r} must be an integer >= 1")
    clamp = tuple(cfg.weight_clamp)
    if clamp and not (len(clamp) == 2 and clamp[0] <= clamp[1]):
        raise ConfigError(
            f"program.weight_clamp={clamp!r} must be () or (low, high) with low <= high"
        )
    if len(exp.dataset.splits["val"]) < 1:
        raise ConfigError("program.name='alphavil' fits α on the validation split: it is empty")
    return cfg
