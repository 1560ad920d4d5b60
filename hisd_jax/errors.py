"""Errors shared by every layer (imported by the bottom layers, so it imports nothing)."""


class ConfigError(ValueError):
    """An invalid config or command line; the message is one line naming the field."""
