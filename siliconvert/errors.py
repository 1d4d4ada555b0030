"""Error types. Each one is a kind of problem the user can fix; the CLI prints it as one line.

Exit codes are a contract: 2 for bad input or usage, 1 for a failed gate.
"""

from __future__ import annotations

import reprlib
from pathlib import Path


class SiliconvertError(Exception):
    """A problem the user can act on. `where` names the file (or hub id) at fault."""

    exit_code = 2

    def __init__(self, message: str, where: str | Path | None = None):
        super().__init__(message)
        self.message = message
        self.where = str(where) if where is not None else None

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class RecipeError(SiliconvertError):
    """The recipe file is malformed or asks for something that does not exist."""


class CheckpointError(SiliconvertError):
    """The source checkpoint is missing, unreadable, inconsistent or unsafe."""


class UnsupportedArchitectureError(CheckpointError):
    """config.json names an architecture no family in the registry describes."""


class RuntimeMissingError(SiliconvertError):
    """A runtime needed to build or run an artifact is not installed here."""


class ArtifactError(SiliconvertError):
    """An artifact on disk is unreadable, or its runtime refused it."""


class NotAnArtifact(ArtifactError):
    """A path no format claims (it may be a checkpoint): unlike a damaged artifact, worth reading as another kind."""


class OutputError(SiliconvertError):
    """The output folder cannot be written (permissions, full disk)."""


class GateFailed(SiliconvertError):
    """One or more artifacts failed a recipe threshold: the release stops."""

    exit_code = 1


def short(value: object) -> str:
    """repr() cut to a readable length: names and values in messages come from files that may be hostile
    (a 100 MB tensor name, a recipe value built from YAML aliases a billion items deep)."""
    return _SHORT.repr(value)


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
