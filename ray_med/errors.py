"""The error types ray_med raises for bad input.

Everything a user can get wrong (a config key, a file path, a malformed record, a model
folder) raises a subclass of :class:`RayMedError` with a message meant to be read by a
person. Jobs catch exactly this type, print the message and exit non-zero; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
"""The exit code of a command that stopped on a user's mistake (after its one line)."""


class RayMedError(Exception):
    """Base class for errors caused by user input, reported without a traceback."""


class ConfigError(RayMedError):
    """A config file, key, value or override is wrong."""


class DataError(RayMedError):
    """A data file is missing, unreadable, or holds a malformed record."""


class ModelError(RayMedError):
    """A model preset, folder or hub id cannot be built or loaded."""
