"""Exception types users can catch and act on.

Every message names the file, key or module, what was expected and what was found, so the
command line can print it without a traceback.
"""
from __future__ import annotations


class LokrDiffusionError(ValueError):
    """Base class: bad input that the user can fix."""


class AdapterFileError(LokrDiffusionError):
    """An adapter file (or state dict) cannot be read, or does not fit the model."""


class ConfigError(LokrDiffusionError):
    """A training or network setting is unknown, of the wrong type, or impossible."""


class DatasetError(LokrDiffusionError):
    """A dataset folder, metadata file or caption cannot be used."""


class ModelError(LokrDiffusionError):
    """A base model cannot be loaded or its family cannot be determined."""


class OutputError(LokrDiffusionError, OSError):
    """A file could not be written (disk full, no permission); earlier files are untouched."""


class CheckpointError(LokrDiffusionError):
    """A training checkpoint cannot be resumed from: damaged, not made by this trainer, or made
    for another config (the message names what differs)."""


class OutputLockedError(OutputError):
    """Another run holds the output folder's lock file; the message names the holder."""
