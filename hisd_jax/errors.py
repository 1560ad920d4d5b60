"""Errors shared by every layer (imported by the bottom layers, so it imports nothing)."""


class ConfigError(ValueError):
    """An invalid config or command line; the message is one line naming the field."""


class WorkdirError(RuntimeError):
    """A workdir none of whose checkpoints can be restored; the message is one line."""


class DataError(ConfigError):
    """A data set whose contents are invalid (a label outside its task's classes, ...); the
    message is one line naming the data set, split, task and first bad position. A ConfigError,
    so every entry point reports it the same way (one line, exit code 2, workdir untouched)."""
