"""The start of a run and loading: remove what interrupted saves left, resume or start fresh
(:func:`open_checkpoints`), find (:func:`resolve`), verify and load checkpoints without unpickling code.
:mod:`agents.checkpoint` re-exports all of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from .checkpoint_save import (
    FORMAT_VERSION,
    MANIFEST,
    TAGS,
    _hash_file,
    _manifest_body,
    _point,
    _remove_dir,
    _step_dirs,
    _tags,
)
from .renamed import migrate_saved_config
from .runfiles import CheckpointCorrupt, CheckpointError, say

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
    parts = [f"checkpoint={p / s} (the {what} policy)" for s, what in (("finetune", "fine-tuned"),
             ("pretrain", "pretrained")) if (p / s / "checkpoints").is_dir()]
    if parts:  # a stage=pipeline run: one checkpoint folder per stage
        raise CheckpointError(f"{str(p)!r} is a pipeline run directory with no checkpoint of its own: give "
                              + " or ".join(parts))
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
    migrate_saved_config(config)  # settings saved under names from before the grad_steps/denoise_steps renames
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
