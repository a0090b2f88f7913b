"""Exception types that the command line turns into one readable line."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: a path, a file, a config value.

    The CLI prints ``error: <message>`` and exits with code 2, without a traceback.
    """


class DataError(UserError):
    """A dataset file is missing, unreadable or wrongly encoded."""


class ConfigError(UserError):
    """A config key is unknown or a value has the wrong type."""


class CheckpointError(UserError):
    """A checkpoint cannot be loaded safely or does not fit the requested model."""


class NumericalFault(RuntimeError):
    """Training met too many consecutive non-finite losses."""
