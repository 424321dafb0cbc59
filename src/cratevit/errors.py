"""The errors that mean "the user asked for something that cannot be done"; the CLI prints them as one line.

Both subclass :class:`ValueError`, so code written against the first release (``except ValueError``) still
catches them. Anything else that escapes a command is a bug and keeps its traceback. This module imports only
the standard library, so every layer (``models/`` included) may raise these.
"""

from __future__ import annotations

import importlib.util

__all__ = ["CheckpointError", "CratevitWarning", "UserError", "require"]


class UserError(ValueError):
    """A mistake the user can fix (a bad option, path, size or value); the message names the problem and the fix."""


class CheckpointError(UserError):
    """A checkpoint file that cannot be used; the message names the problem and the fix."""


class CratevitWarning(UserWarning):
    """Something the user should know (non-finite weights, a skipped file); the CLI prints it as one line."""


def require(module: str, extra: str, what: str) -> None:
    """Raise a one-line :class:`UserError` naming the optional extra to install when ``module`` is missing."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs the {module} package, which is not installed: pip install 'cratevit[{extra}]'")
