"""Command-line entry: `python -m hisd_jax.main --config configs/x.py[:k=v] --workdir DIR`.

Single fields are overridden as `--config.optimizer.lr=3e-4`. An invalid config, or
an unknown config field, prints one line naming the field and exits with code 2
before anything compiles or the workdir is touched.

A job that seems hung (several processes waiting on one another): set
HISD_DUMP_STACKS_AFTER_S=N and every process prints all its threads' Python stacks to stderr
after N seconds (and goes on running).
"""

import faulthandler
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from hisd_jax import cli, parallel
from hisd_jax import config as config_lib
from hisd_jax.errors import WorkdirError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally path:arg.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if os.environ.get("HISD_DUMP_STACKS_AFTER_S"):
        faulthandler.dump_traceback_later(float(os.environ["HISD_DUMP_STACKS_AFTER_S"]))
    cli.quiet_library_info()
    parallel.maybe_initialize_distributed()
    import jax  # noqa: PLC0415

    from hisd_jax import train  # pylint: disable=g-import-not-at-top

    try:  # train_and_evaluate validates everything before it touches the workdir
        results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except config_lib.ConfigError as e:
        cli.config_error(str(e))
    except WorkdirError as e:
        print(f"workdir error: {e}", file=sys.stderr)
        sys.exit(1)
    except FloatingPointError as e:  # the non-finite guard stopped the run
        print(f"training stopped: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() != 0:  # every process holds the same results; one prints them
        return
    for task, per_exit in results["test"].items():
        for name, m in per_exit.items():
            print(f"test {task} {name}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items()))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_config_flags)
