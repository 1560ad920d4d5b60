"""Command-line helpers shared by the workdir commands (evaluate, export).

Every error a user can cause on the command line ends as one line, `prog: error: ...`, on
stderr and exit code 2 (no traceback, nothing written).
"""

import sys


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
