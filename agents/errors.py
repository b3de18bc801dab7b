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


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_bool(value, key: str) -> bool:
    """``key``'s value as a bool, strictly: true/false, 1/0, yes/no (any case); anything else is a UserError."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise UserError(f"{key}={value} is not a boolean; use {key}=true or {key}=false (also 1/0, yes/no)")


def parse_int(value, key: str, least: int | None = None) -> int:
    """``key``'s value as an int (a UserError naming the key for ``abc``, ``1.5`` or one below ``least``)."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = int(value) if isinstance(value, (int, float)) else int(str(value).strip())
    except (TypeError, ValueError):
        raise UserError(f"{key}={value} is not an integer") from None
    if least is not None and number < least:
        raise UserError(f"{key} must be >= {least}, got {number}")
    return number


def check_at_least(values, least: int = 1, prefix: str = "") -> None:
    """UserError ``<prefix><name> must be >= <least>, got <v>`` for the first step count or budget in
    ``values`` (a mapping name -> value; None values are skipped: "not set") below ``least``."""
    for name, v in values.items():
        if v is not None and int(v) < least:
            raise UserError(f"{prefix}{name} must be >= {least}, got {v}")


def check_positive(values, prefix: str = "") -> None:
    """UserError ``<prefix><name> must be positive, got <v>`` for the first learning rate (or other scale) in
    ``values`` that is not > 0 (NaN included); None values are skipped ("not set": a fallback applies)."""
    for name, v in values.items():
        if v is not None and not float(v) > 0:
            raise UserError(f"{prefix}{name} must be positive, got {v}")


def check_top_level(cfg) -> None:
    """Parse the top-level settings train.py reads itself, in place: the booleans strictly (``debug=no`` is
    false, ``debug=abc`` an error) and ``seed``/``threads`` as integers naming the key when they are not."""
    from omegaconf import open_dict

    with open_dict(cfg):
        for key in ("debug", "progress", "resume"):
            if cfg.get(key) is not None:
                cfg[key] = parse_bool(cfg[key], key)
        if cfg.get("seed") is not None:
            cfg.seed = parse_int(cfg.seed, "seed")
        if cfg.get("threads") is not None:
            cfg.threads = parse_int(cfg.threads, "threads", least=1)


def debug_wanted(debug) -> bool:
    """``debug``'s value as train.py's error handler reads it: only a true value (a bad one counts as false)."""
    return debug is True or str(debug).strip().lower() in _TRUE


def full_traceback_wanted(debug: bool = False) -> bool:
    return debug_wanted(debug) or os.environ.get("HYDRA_FULL_ERROR") == "1"
