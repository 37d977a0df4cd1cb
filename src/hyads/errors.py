"""Exceptions that carry a user-facing message (the CLI prints them without a traceback)."""

from __future__ import annotations

from pathlib import Path


class HyADSError(Exception):
    """Base class: anything the user can fix (bad input, bad model file, bad option)."""


class ImageError(HyADSError):
    """An image or mask file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class DatasetError(HyADSError):
    """A folder that does not hold a usable dataset."""


class ModelFileError(HyADSError):
    """A model file that is missing, truncated, of an unknown format version, or inconsistent."""


class NotFittedError(HyADSError):
    """The estimator was used before `fit`."""
