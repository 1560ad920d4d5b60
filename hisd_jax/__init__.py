"""hisd_jax: multi-exit and multitask training in JAX/Flax."""
