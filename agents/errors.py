"""User errors: bad input that ``train.py`` reports as one line (``error: ...``) and exit code 2.

Raise :class:`UserError` for a mistake the user can fix (a wrong path, key, value or file), with a message
that says what is wrong, which file or config key, and what to do. It subclasses ValueError, so code and
tests that expect a ValueError for invalid values keep working. :class:`envs.hdf5.DatasetError` (a bad demo
file) and :class:`agents.checkpoint.CheckpointError` (a bad checkpoint) are user errors too.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# our own packages: a ValueError raised by a deliberate check in them is a user error (a bad value)
_OWN = tuple(str(ROOT / d) + os.sep for d in ("agents", "envs", "flowpolicy"))
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A mistake in the user's input, with a message that says what to do."""


def _user_error_types() -> tuple[type, ...]:
    from envs.hdf5 import DatasetError

    from .checkpoint import CheckpointError

    return (UserError, DatasetError, CheckpointError)


def is_user_error(err: BaseException) -> bool:
    """True for the errors a user can fix: UserError, DatasetError, CheckpointError, and ValueError /
    FileNotFoundError / NotImplementedError raised by a check in this project's own code (not by a library)."""
    if isinstance(err, _user_error_types()):
        return True
    if isinstance(err, (ValueError, FileNotFoundError, NotImplementedError)) and err.__traceback__ is not None:
        last = traceback.extract_tb(err.__traceback__)[-1].filename
        return os.path.abspath(last).startswith(_OWN)
    return False


def one_line(err: BaseException) -> str:
    """``error: <message>`` on one line (a multi-line message is joined with '; ')."""
    msg = str(err).strip() or type(err).__name__
    if isinstance(err, FileNotFoundError) and err.filename and str(err.filename) not in msg:
        msg = f"{msg}: {err.filename}"
    parts = [p.strip() for p in msg.splitlines() if p.strip()]
    return "error: " + "; ".join(parts)


def full_traceback_wanted(debug: bool = False) -> bool:
    return bool(debug) or os.environ.get("HYDRA_FULL_ERROR") == "1"
