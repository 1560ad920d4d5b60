"""Command-line helpers shared by the commands (main, sweep, evaluate, export, plots).

Every error a user can cause on the command line ends as one line, `prog: error: ...`, on
stderr and exit code 2 (no traceback, nothing written).
"""

import sys


def user_errors() -> tuple[type[BaseException], ...]:
    """What a workdir command reports in one line (`fail`) rather than as a traceback: a path
    that cannot be read (OSError), a bad value or config (ValueError, ConfigError), a workdir
    that cannot be used (WorkdirError)."""
    from hisd_jax.errors import WorkdirError  # noqa: PLC0415

    return (OSError, ValueError, WorkdirError)


def fail(prog: str, message) -> None:
    """Prints `prog: error: message` on one line and exits with code 2."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def flags_parser(prog: str, renamed: dict[str, str] | None = None):
    """An `app.run(main, flags_parser=...)` parser for the workdir commands.

    A flag error (unknown flag, bad or missing value, a failed validator) prints one line,
    `prog: error: ...`, on stderr and exits with code 2, instead of absl's traceback-free but
    multi-line report. `renamed` maps old spellings to absl's (e.g. the argparse-era
    '--no_calibrate' to '--nocalibrate'), so documented command lines keep working.
    """
    from absl import flags  # noqa: PLC0415

    renamed = renamed or {}

    def parse(argv):
        argv = [renamed.get(arg, arg) for arg in argv]
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(prog, e)

    return parse


def config_error(message: str) -> None:
    """Prints `config error: message` on stderr and exits with code 2."""
    print(f"config error: {message}", file=sys.stderr)
    sys.exit(2)


def describe_config_error(e: BaseException, argv) -> str:
    """One line for a flag-parsing error, naming the config field or variant at fault."""
    from hisd_jax import config as config_lib  # noqa: PLC0415

    cause, innermost = e, None
    while cause is not None:  # a ConfigError raised while the config file ran (bad `:k=v`)
        if isinstance(cause, config_lib.ConfigError):
            innermost = cause  # ml_collections re-raises it wrapped in a traceback dump
        cause = cause.__cause__ or cause.__context__
    if innermost is not None:
        return str(innermost).splitlines()[0]
    if isinstance(e, OSError):  # the config file could not be loaded
        return "--config: " + str(e).strip().splitlines()[-1].strip()
    if isinstance(e, SyntaxError):  # the config file does not parse
        where = f"{e.filename}, line {e.lineno}" if e.filename else "the config file"
        return f"--config: {where}: {type(e).__name__}: {e.msg}"
    if isinstance(e, (NameError, ImportError, ArithmeticError, AssertionError, LookupError)):
        return f"--config: the config file raised {type(e).__name__}: {e}".splitlines()[0]
    if isinstance(e, (AttributeError, KeyError)):  # an override of a field the config lacks
        key = str(e).strip("\"'")
        for arg in argv:
            path = arg.lstrip("-").split("=", 1)[0]
            if path.startswith("config.") and key in path.split("."):
                return f"--{path}: the config has no field {key!r}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def parse_config_flags(argv):
    """An `app.run` flags parser for commands with a `--config` file (main, sweep): a bad file,
    variant or field is one line, `config error: ...`, and exit code 2."""
    from absl import flags  # noqa: PLC0415

    from hisd_jax import config as config_lib  # noqa: PLC0415

    try:
        argv = flags.FLAGS(argv)
        flags.FLAGS.config.get("name")  # a config file that failed to load raises on first use
        return argv
    except (
        OSError,
        flags.Error,
        config_lib.ConfigError,
        AttributeError,
        KeyError,
        TypeError,
        ValueError,
        SyntaxError,  # the config file itself: a syntax or name error, a failed import, ...
        NameError,
        ImportError,
        ArithmeticError,
        AssertionError,
        LookupError,
    ) as e:
        config_error(describe_config_error(e, argv))


class _LibraryInfoFilter:
    """Drops INFO and DEBUG records that libraries (Orbax) log through absl: a few hundred
    lines a run that bury the progress bar and our own messages. Warnings and errors stay."""

    LIBRARIES = ("/orbax/",)

    def filter(self, record) -> bool:
        import logging  # noqa: PLC0415

        path = record.pathname.replace("\\", "/")
        return record.levelno >= logging.WARNING or not any(x in path for x in self.LIBRARIES)


def quiet_library_info() -> None:
    """Installs `_LibraryInfoFilter` on absl's logger (once) and raises JAX's backend-probe
    logger to WARNING."""
    from absl import logging as absl_logging  # noqa: PLC0415

    logger = absl_logging.get_absl_logger()
    if not any(isinstance(f, _LibraryInfoFilter) for f in logger.filters):
        logger.addFilter(_LibraryInfoFilter())
    import logging  # noqa: PLC0415

    # JAX's backend probe ("Unable to initialize backend 'tpu'...") on every CPU/GPU start:
    # an INFO line before a config error's one line
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
