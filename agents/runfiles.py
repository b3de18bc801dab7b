"""Run-directory files that every training stage shares: the checkpoint errors, :func:`say`, atomic file
writes, :func:`read_json`, the run-directory lock, Ctrl-C handling, seeding and the global RNG state.
:mod:`agents.checkpoint` re-exports all of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import torch

LOCK_FILE = ".lock"
_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, of another kind, or not a flowpolicy checkpoint."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint's files do not match its manifest or cannot be parsed: loading falls back past it."""


class RunLockedError(CheckpointError):
    """Another live process holds the run directory's lock."""


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after Ctrl-C once the stage has saved (message: ``stopped at step N; saved <dir>``)."""


def say(msg: str) -> None:
    """One line on stderr (progress bars share it), flushed at once."""
    print(msg, file=sys.stderr, flush=True)


# --- atomic files -------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    """fsync a file or directory (directories: so that renames in them survive a power cut)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees either the old file or the new one.

    A hidden temporary file in the same directory is written, fsynced and renamed over ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_path(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` for text: every file a run writes (history, summaries, eval tables,
    resolved config) goes through here."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> Path:
    """``json.dumps(obj, indent=2, **dump_kwargs)`` written atomically."""
    dump_kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


_MISSING = object()


def read_json(path: str | os.PathLike, default: Any = _MISSING) -> Any:
    """Parse a JSON file the run wrote; a damaged file is an error that names it (``default`` if absent)."""
    path = Path(path)
    if not path.exists() and default is not _MISSING:
        return default
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointCorrupt(f"{path}: damaged, not valid JSON ({err}); restore or delete it") from err


# --- the run-directory lock ---------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(fd: int) -> tuple[int, str] | None:
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        return (int(text[0]), text[1] if len(text) > 1 else "?") if text else None
    except (OSError, ValueError):
        return None


_HELD: dict[str, list] = {}  # lock path -> [fd, holders in this process]


def _release_held(key: str) -> None:
    entry = _HELD.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.ftruncate(entry[0], 0)  # empty: released cleanly (a PID left in the file means a crash)
        os.close(entry[0])


class RunLock:
    """An exclusive lock on a run directory (``<run_dir>/.lock``, holding ``<pid> <host>``).

    Held with ``flock``, so the kernel releases it when the holder dies, however it dies: a lock left by a dead
    process is taken over (one printed line), a live holder makes :meth:`acquire` raise
    :class:`RunLockedError` naming its PID. Without ``flock`` support (some network file systems) the PID
    in the file decides. Re-entrant within one process (a stage and the trainer it runs may both lock).
    Use as a context manager or ``acquire()``/``release()``; garbage collection releases it too.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def acquire(self) -> RunLock:
        if self.held:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in _HELD:
            _HELD[key][1] += 1
        else:
            _HELD[key] = [self._lock_file(), 1]
        self._finalizer = weakref.finalize(self, _release_held, key)
        return self

    def _lock_file(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            self._refuse(holder)
        except (OSError, ImportError):  # no flock here: the PID written in the file decides
            holder = _read_holder(fd)
            if holder and holder[0] != os.getpid() and holder[1] == socket.gethostname() and _pid_alive(holder[0]):
                os.close(fd)
                self._refuse(holder)
        previous = _read_holder(fd)
        if previous and previous[0] != os.getpid():
            say(f"{self.path}: took over the stale lock of process {previous[0]} on {previous[1]}, which is no "
                "longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        return fd

    def _refuse(self, holder: tuple[int, str] | None) -> None:
        who = f"process {holder[0]} on {holder[1]}" if holder else "another process"
        raise RunLockedError(f"run directory {self.run_dir} is in use by {who} (lock {self.path}); wait for it "
                             "to finish or stop it, or use another run directory")

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --- Ctrl-C and seeds ---------------------------------------------------------------------------------------

_ACTIVE_STOPS: list[StopOnInterrupt] = []


class StopOnInterrupt:
    """While active, the first Ctrl-C (SIGINT) only sets :attr:`requested`: the training loop finishes its
    step or iteration, saves once and raises :class:`TrainingInterrupted`. A second Ctrl-C raises
    ``KeyboardInterrupt`` at once (the previous checkpoint stays intact). Outside the main thread it only
    tracks :func:`stop_requested` (signals go to the main thread)."""

    def __init__(self, what: str = "training") -> None:
        self.what = what
        self.requested = False
        self._old: Any = None
        self._installed = False

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt("second Ctrl-C: stopped without saving")
        self.requested = True
        say(f"\nCtrl-C: {self.what} stops at the next step boundary and saves (Ctrl-C again: stop without saving)")

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        _ACTIVE_STOPS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._old)
            self._installed = False
        with contextlib.suppress(ValueError):
            _ACTIVE_STOPS.remove(self)


def stop_requested() -> bool:
    """True when Ctrl-C was pressed inside an active :class:`StopOnInterrupt` (inner loops poll this)."""
    return any(s.requested for s in _ACTIVE_STOPS)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device) from ``seed``."""
    import random

    import numpy as np

    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device's default generator
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --- RNG state ----------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Torch and NumPy global RNG states as tensors/plain values (safe for weights_only loading)."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype("int64")), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), None))
