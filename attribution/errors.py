"""The project's error types: every failure meant for the user raises one of these.

The CLI and the app turn any `AttributionError` into a plain message (exit code 2 on the command
line) and never show a traceback for it.
"""

from __future__ import annotations


class AttributionError(ValueError):
    """A failure whose message is written for the user: what is wrong and what to do."""


class DataError(AttributionError):
    """Bad input data; the message names the file and what is wrong with it."""


class ModelError(AttributionError):
    """A model folder that cannot be loaded or is not supported."""


class ConfigError(AttributionError):
    """A setting out of range or an unknown choice (method, measurement, store type, ...)."""


class IndexLoadError(AttributionError):
    """An index folder that is unfinished, damaged or built for another model or data."""
