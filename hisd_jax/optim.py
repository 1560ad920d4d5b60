"""Optimizer and learning-rate schedule from the config's `optimizer` section."""

import optax


def schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup then the named decay: 'constant', 'cosine' to 0, 'linear' to 0, or 'step'
    (lr times `step_factor` at each of `step_fractions` of the decay steps, rounded down: the
    step decay of He et al. 2016 and BYOT)."""
    lr, warm = opt_cfg.lr, opt_cfg.warmup_steps
    decay_steps = total_steps - warm
    decays = {
        "constant": lambda: optax.constant_schedule(lr),
        "cosine": lambda: optax.cosine_decay_schedule(lr, decay_steps),
        "linear": lambda: optax.linear_schedule(lr, 0.0, decay_steps),
        "step": lambda: optax.piecewise_constant_schedule(
            lr, {int(f * decay_steps): opt_cfg.step_factor for f in opt_cfg.step_fractions}
        ),
    }
    decay = decays[opt_cfg.schedule]()
    if not warm:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def build_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
    lr = schedule(opt_cfg, total_steps)
    makers = {
        "adam": lambda: optax.adam(lr),
        "adamw": lambda: optax.adamw(lr, weight_decay=opt_cfg.weight_decay),
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum=opt_cfg.momentum),
        "nesterov": lambda: optax.sgd(lr, momentum=opt_cfg.momentum, nesterov=True),
    }
    # Every slot is always present (identity when off), so the optimizer state has the same
    # structure whatever grad_clip and weight_decay are: a resume may turn clipping on.
    clip = optax.clip_by_global_norm(opt_cfg.grad_clip) if opt_cfg.grad_clip else optax.identity()
    decay = opt_cfg.weight_decay and opt_cfg.name != "adamw"
    decayed = optax.add_decayed_weights(opt_cfg.weight_decay) if decay else optax.identity()
    return optax.chain(clip, decayed, makers[opt_cfg.name]())
