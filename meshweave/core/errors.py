"""Errors shared by every layer (torch-free)."""


class ConfigError(ValueError):
    """A bad config: the message is one line naming the field, the value and the fix."""
