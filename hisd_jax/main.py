"""Command-line entry: `python -m hisd_jax.main --config configs/x.py[:k=v] --workdir DIR`.

Single fields are overridden as `--config.optimizer.lr=3e-4`. An invalid config, or
an unknown config field, prints one line naming the field and exits with code 2
before anything compiles or the workdir is touched.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from hisd_jax import config as config_lib
from hisd_jax import parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally path:arg.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def config_error(message: str) -> None:
    print(f"config error: {message}", file=sys.stderr)
    sys.exit(2)


def _describe(e: BaseException, argv) -> str:
    """One line for a flag-parsing error, naming the config field or variant at fault."""
    cause, innermost = e, None
    while cause is not None:  # a ConfigError raised while the config file ran (bad `:k=v`)
        if isinstance(cause, config_lib.ConfigError):
            innermost = cause  # ml_collections re-raises it wrapped in a traceback dump
        cause = cause.__cause__ or cause.__context__
    if innermost is not None:
        return str(innermost).splitlines()[0]
    if isinstance(e, OSError):  # the config file could not be loaded
        return "--config: " + str(e).strip().splitlines()[-1].strip()
    if isinstance(e, (AttributeError, KeyError)):  # an override of a field the config lacks
        key = str(e).strip("\"'")
        for arg in argv:
            path = arg.lstrip("-").split("=", 1)[0]
            if path.startswith("config.") and key in path.split("."):
                return f"--{path}: the config has no field {key!r}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def parse_flags(argv):
    """absl flag parsing with config errors (bad file, unknown field) as exit code 2."""
    try:
        argv = FLAGS(argv)
        FLAGS.config.get("name")  # a config file that failed to load raises on first use
        return argv
    except (
        OSError,
        flags.Error,
        config_lib.ConfigError,
        AttributeError,
        KeyError,
        TypeError,
        ValueError,
    ) as e:
        config_error(_describe(e, argv))


def main(argv):
    del argv
    parallel.maybe_initialize_distributed()
    import jax  # noqa: PLC0415

    from hisd_jax import train  # pylint: disable=g-import-not-at-top

    try:  # train_and_evaluate validates everything before it touches the workdir
        results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except config_lib.ConfigError as e:
        config_error(str(e))
    if jax.process_index() != 0:  # every process holds the same results; one prints them
        return
    for task, per_exit in results["test"].items():
        for name, m in per_exit.items():
            print(f"test {task} {name}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items()))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
