"""Errors a user can fix: bad input, missing or corrupt files, a run directory in use. The ``l2t`` command prints
these as one line (``l2t: error: ...``, exit code 2) and keeps tracebacks for real bugs (or ``--debug``).

Each class also derives from the built-in exception a caller would catch without knowing this module
(``ValueError`` for bad values, ``FileNotFoundError`` for missing files)."""

from __future__ import annotations


class L2TError(Exception):
    """Base class: an expected failure whose message says what is wrong and how to fix it."""


class InputError(L2TError, ValueError):
    """A value, option or file content that cannot be used (named in the message)."""


class MissingFileError(L2TError, FileNotFoundError):
    """A file or directory the run needs is absent (its path is in the message)."""


class CheckpointError(L2TError):
    """A checkpoint is incomplete or corrupt (the message names the file)."""


class RunDirLocked(L2TError):
    """Another live process is writing into the same run directory (the message names its pid)."""
