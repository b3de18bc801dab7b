"""Checkpoints that never lose work: self-describing directories, written atomically, verified on load,
loaded without unpickling code; plus the run-directory lock, atomic file writes, Ctrl-C handling and seeding
that every training stage shares.

Layout of ``<run>/checkpoints/step_<N>/``::

    config.yaml           what to rebuild (policy spec, dims, horizons) + format version + library versions
    model.safetensors     policy parameters and buffers (the normalizer statistics are buffers)
    env_meta.json         the environment the policy was trained for
    training_state.pt     optimizer/scheduler/EMA/RNG/step for exact resume; tensors and plain containers
                          only, loaded with ``torch.load(weights_only=True)``
    extra/*.safetensors   further modules (EMA weights, noise network, critic, ...)
    manifest.json         size and sha256 of every file above (and a checksum of itself), verified on load

The save sequence (:func:`save_checkpoint`): write everything into a hidden temporary directory, hash it into
the manifest, fsync, rename it to a name not in use (``step_<N>``, or ``step_<N>-<k>`` when step N is saved
again), swap the ``last``/``best`` symbolic links with ``os.replace``, and only then remove the superseded copy
of the same step and prune. A process killed at any point leaves ``last`` pointing at a complete checkpoint
(at worst the previous one) plus temporaries, which :func:`open_checkpoints` removes at the next start.
Loading a run directory or a ``checkpoints/`` folder uses ``last`` and falls back to the newest intact
``step_*`` (one printed line) when ``last`` is dangling, missing or corrupt.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 2  # 2: manifest.json with checksums (version 1 checkpoints still load, unverified)
MANIFEST = "manifest.json"
TAGS = ("last", "best")
LOCK_FILE = ".lock"
_STEP_RE = re.compile(r"^step_(\d+)(?:-(\d+))?$")
_UMASK = os.umask(0)
os.umask(_UMASK)

# Test hook: called with the name of each point of the save sequence ("wrote model.safetensors", "renamed",
# "tagged last", ...). Tests make it kill the process there; None in normal use.
_fault_hook: Callable[[str], None] | None = None


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


def _fault(point: str) -> None:
    if _fault_hook is not None:
        _fault_hook(point)


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


# --- saving -------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import flowpolicy

    return {"flowpolicy": flowpolicy.__version__, "torch": torch.__version__}


def _state_for_safetensors(module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; contiguous clones are cheap at these sizes
    return {k: v.detach().cpu().contiguous().clone() for k, v in module_state.items()}


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 64


def _step_dirs(root: Path) -> list[tuple[int, int, Path]]:
    """``(step, copy, path)`` of the ``step_<N>`` / ``step_<N>-<k>`` directories in ``root``, oldest first."""
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and not p.is_symlink():
                out.append((int(m.group(1)), int(m.group(2) or 0), p))
    return sorted(out, key=lambda t: (t[0], t[1]))


def _tags(root: Path) -> dict[str, str]:
    return {t: os.readlink(root / t) for t in TAGS if (root / t).is_symlink()}


def _new_name(root: Path, step: int) -> str:
    """``step_<N>`` when step N has no directory yet, else ``step_<N>-<k>`` after the newest copy of it."""
    copies = [k for s, k, _ in _step_dirs(root) if s == step]
    base = f"step_{step:09d}"
    return base if not copies else f"{base}-{max(copies) + 1}"


def _remove_dir(path: Path) -> None:
    """Rename out of sight first (atomic), then delete: a crash mid-delete leaves a temporary, not a
    half-deleted ``step_*`` that looks like a checkpoint."""
    hidden = path.with_name(f".old_{path.name}_{os.getpid()}")
    try:
        os.rename(path, hidden)
    except OSError:
        hidden = path
    shutil.rmtree(hidden, ignore_errors=True)


def _point(link: Path, target_name: str) -> None:
    tmp_link = link.with_name(f".{link.name}.tmp{os.getpid()}")
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(target_name, tmp_link)
    os.replace(tmp_link, link)


def tag_checkpoint(ckpt: str | os.PathLike, tags: tuple[str, ...]) -> Path:
    """Point more tags (``last``, ``best``) at an existing checkpoint, without writing it again."""
    ckpt = Path(ckpt)
    for tag in tags:
        _point(ckpt.parent / tag, ckpt.name)
    _fsync_path(ckpt.parent)
    return ckpt


def _prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` step directories and every tagged one; remove the rest."""
    tagged = set(_tags(root).values())
    dirs = _step_dirs(root)
    for _, _, p in dirs[: max(len(dirs) - keep, 0)]:
        if p.name not in tagged:
            _remove_dir(p)


def _hash_file(path: Path) -> tuple[str, int]:
    """sha256 and size of a file, fsyncing it on the way."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())
    return h.hexdigest(), path.stat().st_size


def _manifest_body(files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    canon = json.dumps(files, sort_keys=True, separators=(",", ":")).encode()
    return {"manifest_version": 1, "files": files, "self_sha256": hashlib.sha256(canon).hexdigest()}


def write_manifest(ckpt: str | os.PathLike) -> Path:
    """(Re)write ``manifest.json`` from the files now in ``ckpt`` (save_checkpoint does this)."""
    ckpt = Path(ckpt)
    files = {}
    for p in sorted(ckpt.rglob("*")):
        rel = p.relative_to(ckpt).as_posix()
        if p.is_file() and rel != MANIFEST:
            sha, size = _hash_file(p)
            files[rel] = {"sha256": sha, "bytes": size}
    path = ckpt / MANIFEST
    path.write_text(json.dumps(_manifest_body(files), indent=1, sort_keys=True) + "\n")
    _hash_file(path)
    return path


def _check_space(root: Path, step: int, need: int) -> None:
    free = shutil.disk_usage(root).free
    if free < need:
        raise CheckpointError(f"not enough disk space to save step {step} in {root}: about {need} bytes needed, "
                              f"{free} free; free some space or lower keep_last ({_intact_note(root)})")


def _intact_note(root: Path) -> str:
    last = root / "last"
    return f"{last} -> {os.readlink(last)} is unchanged" if last.is_symlink() else "no earlier checkpoint"


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    config: dict[str, Any],
    model: torch.nn.Module,
    env_meta: dict[str, Any] | None = None,
    training_state: dict[str, Any] | None = None,
    extra_modules: dict[str, torch.nn.Module | dict] | None = None,
    tags: tuple[str, ...] = ("last",),
    keep_last: int | None = 3,
) -> Path:
    """Write checkpoint ``step`` under ``root`` (see the module docstring for the sequence), point each tag
    (``last``, ``best``) at it and return its directory.

    The newest ``keep_last`` step directories and every tagged one are kept (``keep_last`` None or 0: all).
    Untagged older ones are pruned before writing (so saving a new step needs room for ``keep_last``
    checkpoints, not one more; re-saving a step keeps its old copy until the new one is in place) and after. A save that cannot finish (disk full, write error) raises :class:`CheckpointError`
    naming the directory; the previous ``last`` is untouched.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    step = int(step)
    model_state = _state_for_safetensors(model.state_dict())
    extras = {name: _state_for_safetensors(mod.state_dict() if isinstance(mod, torch.nn.Module) else mod)
              for name, mod in (extra_modules or {}).items()}
    cfg = {"format_version": FORMAT_VERSION, "versions": _versions(), "step": step, **config}
    _fault("start")
    if keep_last:  # make room first; a re-saved step replaces its old copy only after the swap
        _prune(root, keep_last - (0 if any(s == step for s, _, _ in _step_dirs(root)) else 1))
    _check_space(root, step, _tensor_bytes([model_state, extras, training_state]) + (1 << 20))
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_step_{step:09d}_", dir=root))
    current = "the directory"
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)

        def write(rel: str, writer: Callable[[Path], Any]) -> None:
            nonlocal current
            current = rel
            writer(tmp / rel)
            _fault(f"wrote {rel}")

        write("config.yaml", lambda p: p.write_text(yaml.safe_dump(_plain(cfg), sort_keys=False)))
        write("model.safetensors", lambda p: save_file(model_state, str(p)))
        write("env_meta.json", lambda p: p.write_text(json.dumps(env_meta or {}, indent=2)))
        if extras:
            (tmp / "extra").mkdir()
            for name, state in extras.items():
                write(f"extra/{name}.safetensors", lambda p, s=state: save_file(s, str(p)))
        if training_state is not None:
            write("training_state.pt", lambda p: torch.save(training_state, p))
        current = MANIFEST
        write_manifest(tmp)
        _fault(f"wrote {MANIFEST}")
        if extras:
            _fsync_path(tmp / "extra")
        _fsync_path(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, CheckpointError):
            space = "disk full: " if isinstance(err, OSError) and err.errno == errno.ENOSPC else ""
            raise CheckpointError(f"saving step {step} in {root} failed while writing {current}: {space}{err} "
                                  f"({_intact_note(root)})") from err
        raise
    final = root / _new_name(root, step)
    os.rename(tmp, final)
    _fsync_path(root)
    _fault("renamed")
    for tag in tags:
        _point(root / tag, final.name)
        _fault(f"tagged {tag}")
    _fsync_path(root)
    tagged = set(_tags(root).values())
    for s, _, p in _step_dirs(root):  # the superseded copy of this step, now that no tag points to it
        if s == step and p != final and p.name not in tagged:
            _remove_dir(p)
    _fault("removed superseded")
    if keep_last:
        _prune(root, keep_last)
    _fault("pruned")
    return final


def _plain(obj):
    """OmegaConf/NumPy/Path values -> plain YAML-safe Python."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (Path, str)):
        return str(obj)  # also str subclasses such as torch's version string
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    return obj


# --- start of a run: temporaries, resume or fresh -----------------------------------------------------------


def clean_stale(root: str | os.PathLike) -> int:
    """Remove what interrupted saves left in ``root``: ``.tmp_step_*``/``.old_*`` directories, temporary tag
    links and ``.*.tmp`` files of :func:`atomic_write_bytes`. Only call it while holding the run lock (a live
    save of another process would lose its temporary). Returns the number of entries removed."""
    root = Path(root)
    if not root.is_dir():
        return 0
    removed, size = 0, 0
    for p in root.iterdir():
        n = p.name
        if p.is_symlink():
            if n.startswith(tuple(f".{t}.tmp" for t in TAGS)):
                p.unlink()
                removed += 1
        elif p.is_dir() and (n.startswith(".tmp_step_") or n.startswith(".old_")):
            size += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
        elif p.is_file() and n.startswith(".") and n.endswith(".tmp"):
            size += p.stat().st_size
            p.unlink()
            removed += 1
    if removed:
        say(f"removed {removed} temporaries ({size} bytes) left by an interrupted save in {root}")
    return removed


def open_checkpoints(root: str | os.PathLike, resume: bool = True, expect_kind: str | None = None
                     ) -> dict[str, Any] | None:
    """At the start of a training run, holding its :class:`RunLock`: clean temporaries, then return the
    checkpoint to resume from (:func:`load_checkpoint` of ``root`` with the fallback past a broken ``last``),
    or None when ``root`` holds no checkpoint. Prints ``resuming from <dir> (step N)``.

    ``resume=False`` starts fresh: existing checkpoints are deleted (one line says how many). With
    ``resume=True``, a folder whose checkpoints are all corrupt is an error, never a silent fresh start.
    """
    root = Path(root)
    clean_stale(root)
    clean_stale(root.parent)
    dirs, tags = _step_dirs(root), _tags(root)
    if not dirs and not tags:
        return None
    if not resume:
        say(f"resume=false: deleting the {len(dirs)} checkpoints in {root} (newest: "
            f"{dirs[-1][2].name if dirs else 'none'}) and starting fresh")
        for t in tags:
            (root / t).unlink()
        for _, _, p in dirs:
            _remove_dir(p)
        return None
    ck = _load_latest(root, expect_kind, repair=True)
    say(f"resuming from {ck['path']} (step {ck['config']['step']})")
    return ck


# --- loading ------------------------------------------------------------------------------------------------


def _is_root(p: Path) -> bool:
    """A ``checkpoints`` folder: holds step directories or a ``last`` tag."""
    return p.is_dir() and ((p / "last").is_symlink() or bool(_step_dirs(p)))


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a path to it, to a run directory, or to a ``checkpoints`` folder (its
    ``last``, else its newest ``step_*``). Cheap: nothing is verified (:func:`load_checkpoint` verifies)."""
    p = Path(path).expanduser()
    if not p.exists() and not p.is_symlink():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    if p.is_dir() and (p / "config.yaml").exists():
        return p.resolve()
    for root in (p.parent if p.is_symlink() and p.name == "last" else None, p, p / "checkpoints"):
        if root is not None and _is_root(root):
            if (root / "last" / "config.yaml").exists():
                return (root / "last").resolve()
            dirs = _step_dirs(root)
            if dirs:
                return dirs[-1][2].resolve()
    if p.is_file():
        _refuse_file(p)
    raise CheckpointError(f"{str(p)!r} is not a flowpolicy checkpoint (no config.yaml in it, in last/ or "
                          "in checkpoints/last/)")


def _refuse_file(p: Path) -> None:
    head = p.read_bytes()[:2]
    if head[:1] == b"\x80" or p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".ckpt"):
        raise CheckpointError(f"{str(p)!r} looks like a pickle file; flowpolicy never unpickles checkpoints "
                              "(they may run arbitrary code). Give a checkpoint directory with model.safetensors")
    raise CheckpointError(f"{str(p)!r} is a file, not a flowpolicy checkpoint directory")


def _fallback_hint(ckpt: Path) -> str:
    return (f"give {ckpt.parent} (or the run directory) instead to fall back to the newest intact checkpoint, "
            f"or delete {ckpt.name}")


def verify_checkpoint(ckpt: str | os.PathLike) -> dict[str, Any] | None:
    """Check every file of ``ckpt`` against ``manifest.json``; returns the manifest's file table, or None
    for a checkpoint without a manifest (format 1). Raises :class:`CheckpointCorrupt` naming the file."""
    ckpt = Path(ckpt)
    mpath = ckpt / MANIFEST
    if not mpath.exists():
        return None
    hint = _fallback_hint(ckpt)
    try:
        body = json.loads(mpath.read_bytes().decode("utf-8"))
        files = body["files"]
        ok = _manifest_body(files)["self_sha256"] == body["self_sha256"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointCorrupt(f"{mpath}: damaged ({type(err).__name__}: {err}); {hint}") from err
    if not ok:
        raise CheckpointCorrupt(f"{mpath}: damaged (its own checksum does not match); {hint}")
    for rel, entry in files.items():
        f = ckpt / rel
        if not f.is_file():
            raise CheckpointCorrupt(f"{f}: missing (listed in {MANIFEST}); {hint}")
        sha, size = _hash_file(f)
        if size != entry["bytes"] or sha != entry["sha256"]:
            raise CheckpointCorrupt(f"{f}: corrupt (sha256/size differ from {MANIFEST}); {hint}")
    return files


def _load_dir(ckpt: Path, expect_kind: str | None) -> dict[str, Any]:
    """Verify and read one checkpoint directory."""
    hint = _fallback_hint(ckpt)
    files = verify_checkpoint(ckpt)
    cfg_file = ckpt / "config.yaml"
    if not cfg_file.exists():
        raise CheckpointCorrupt(f"{cfg_file}: missing; {hint}")
    try:
        config = yaml.safe_load(cfg_file.read_bytes().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointCorrupt(f"{cfg_file}: not valid YAML ({err}); {hint}") from err
    if not isinstance(config, dict) or "format_version" not in config:
        raise CheckpointError(f"{ckpt}: config.yaml is not a flowpolicy checkpoint config")
    if config["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{ckpt}: format version {config['format_version']} is newer than this "
                              f"flowpolicy ({FORMAT_VERSION}); upgrade flowpolicy")
    if files is None and config["format_version"] >= 2:
        raise CheckpointCorrupt(f"{ckpt / MANIFEST}: missing, so the checkpoint cannot be verified; {hint}")
    if expect_kind is not None:
        kind = config.get("policy", {}).get("kind")
        if kind != expect_kind:
            raise CheckpointError(f"{ckpt}: holds a {kind!r} policy, expected {expect_kind!r}")
    model_file = ckpt / "model.safetensors"
    if not model_file.exists():
        raise CheckpointCorrupt(f"{model_file}: missing (incomplete checkpoint); {hint}")

    def tensors(f: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(f))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointCorrupt(f"{f}: not a valid safetensors file ({err}); {hint}") from err

    model_state = tensors(model_file)
    if files is not None:
        extra_files = sorted(ckpt / rel for rel in files if rel.startswith("extra/") and rel.endswith(".safetensors"))
    else:
        extra_files = sorted((ckpt / "extra").glob("*.safetensors")) if (ckpt / "extra").is_dir() else []
    extras = {f.stem: tensors(f) for f in extra_files}
    training_state = None
    ts = ckpt / "training_state.pt"
    if ts.exists():
        try:
            training_state = torch.load(ts, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as err:
            raise CheckpointCorrupt(f"{ts}: refused to load (contains objects other than tensors and plain "
                                    f"containers): {err}") from err
        except Exception as err:  # EOFError, zip errors, ...: a damaged file
            raise CheckpointCorrupt(f"{ts}: damaged ({type(err).__name__}: {err}); {hint}") from err
    env_meta = {}
    if (ckpt / "env_meta.json").exists():
        try:
            env_meta = json.loads((ckpt / "env_meta.json").read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointCorrupt(f"{ckpt / 'env_meta.json'}: not valid JSON ({err}); {hint}") from err
    return {"path": ckpt.resolve(), "config": config, "model": model_state, "env_meta": env_meta,
            "extras": extras, "training_state": training_state}


def _load_latest(root: Path, expect_kind: str | None, repair: bool = False) -> dict[str, Any]:
    """``root/last``, else the newest intact ``step_*`` with one printed line saying why. ``repair`` (only
    with the run lock held): renames the corrupt directories to ``corrupt_<name>`` (out of the fallback and
    pruning order) and points ``last`` at the one used."""
    problems: list[str] = []
    bad: list[Path] = []
    tried: set[Path] = set()
    last = root / "last"
    if last.is_symlink():
        target = root / os.readlink(last)
        if target.is_dir():
            tried.add(target)
            try:
                return _load_dir(target, expect_kind)
            except CheckpointCorrupt as err:
                problems.append(f"{last} -> {target.name} is corrupt ({err})")
                bad.append(target)
        else:
            problems.append(f"{last} is dangling (-> {os.readlink(last)})")
    else:
        problems.append(f"{last} is missing")
    for _, _, p in reversed(_step_dirs(root)):
        if p in tried:
            continue
        try:
            ck = _load_dir(p, expect_kind)
        except CheckpointCorrupt as err:
            problems.append(f"{p.name} is corrupt ({err})")
            bad.append(p)
            continue
        moved = ""
        if repair:
            for b in bad:
                with contextlib.suppress(OSError):
                    os.rename(b, b.with_name(f"corrupt_{b.name}"))
            _point(last, p.name)
            moved = f" (corrupt ones renamed corrupt_step_*; last now -> {p.name})" if bad else \
                f" (last now -> {p.name})"
        say(f"checkpoint fallback: {'; '.join(problems)}; using the newest intact checkpoint {p}{moved}")
        return ck
    raise CheckpointError(f"{root}: no intact checkpoint to resume from ({'; '.join(problems) or 'none found'}); "
                          "restore one, or start fresh with resume=false (deletes them)")


def load_checkpoint(path: str | os.PathLike, expect_kind: str | None = None) -> dict[str, Any]:
    """Read and verify a checkpoint without executing code: returns config, model state, env meta, extras and
    training state (if present). ``expect_kind`` checks ``config['policy']['kind']`` and refuses another kind.

    A checkpoint directory is loaded as it is (a corrupt one raises :class:`CheckpointCorrupt` naming the
    file). A run directory, a ``checkpoints`` folder or its ``last`` link use ``last`` and fall back to the
    newest intact ``step_*`` when ``last`` is dangling, missing or corrupt (one printed line).
    """
    p = Path(path).expanduser()
    if not p.exists() and not p.is_symlink():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    if p.is_symlink() and p.name == "last" and _is_root(p.parent):
        return _load_latest(p.parent, expect_kind)
    if p.is_dir() and (p / "config.yaml").exists():
        return _load_dir(p, expect_kind)
    for root in (p, p / "checkpoints"):
        if _is_root(root):
            return _load_latest(root, expect_kind)
    return _load_dir(resolve(p), expect_kind)


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
