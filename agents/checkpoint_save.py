"""Checkpoint format and saving: step-directory names, the ``last``/``best`` tags, the manifest and
:func:`save_checkpoint` (the layout and the save sequence: see :mod:`agents.checkpoint`, which re-exports
all of it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from .runfiles import _UMASK, CheckpointError, _fsync_path

FORMAT_VERSION = 2  # 2: manifest.json with checksums (version 1 checkpoints still load, unverified)
MANIFEST = "manifest.json"
TAGS = ("last", "best")
_STEP_RE = re.compile(r"^step_(\d+)(?:-(\d+))?$")

# Test hook: called with the name of each point of the save sequence ("wrote model.safetensors", "renamed",
# "tagged last", ...). Tests make it kill the process there; None in normal use.
_fault_hook: Callable[[str], None] | None = None


def _fault(point: str) -> None:
    if _fault_hook is not None:
        _fault_hook(point)


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
                              f"{free} free; free some space, e.g. old step_* directories of {root} ({_intact_note(root)})")


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
