"""Errors shared by every layer (imported by the bottom layers, so it imports nothing)."""


class ConfigError(ValueError):
    """An invalid config or command line; the message is one line naming the field."""


class WorkdirError(RuntimeError):
    """A workdir none of whose checkpoints can be restored; the message is one line."""
