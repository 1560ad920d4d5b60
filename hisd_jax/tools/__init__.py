"""Developer tools run as `python -m hisd_jax.tools.<name>` (see each module)."""
