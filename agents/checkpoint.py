"""Checkpoints: self-describing directories, written atomically, loaded without unpickling code.

Layout of ``<run>/checkpoints/step_<N>/``::

    config.yaml           what to rebuild (policy spec, dims, horizons) + format version + library versions
    model.safetensors     policy parameters and buffers (the normalizer statistics are buffers)
    env_meta.json         the environment the policy was trained for
    training_state.pt     optimizer/scheduler/EMA/RNG/step for exact resume; tensors and plain containers
                          only, loaded with ``torch.load(weights_only=True)``
    extra/*.safetensors   further modules (EMA weights, noise network, critic, ...)

``checkpoints/last`` and ``checkpoints/best`` are symbolic links swapped atomically with ``os.replace``; a
process killed during a save leaves a stray temporary directory, never a broken ``last``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, of another kind, or not a flowpolicy checkpoint."""


def _versions() -> dict[str, str]:
    import flowpolicy

    return {"flowpolicy": flowpolicy.__version__, "torch": torch.__version__}


def _state_for_safetensors(module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; contiguous clones are cheap at these sizes
    return {k: v.detach().cpu().contiguous().clone() for k, v in module_state.items()}


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
    """Write ``root/step_<step>`` atomically, then point each tag (``last``, ``best``) at it.

    Returns the checkpoint directory. Older ``step_*`` directories beyond ``keep_last`` are removed unless a
    tag points to them.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_step_{step:09d}_", dir=root))
    try:
        cfg = {"format_version": FORMAT_VERSION, "versions": _versions(), "step": int(step), **config}
        (tmp / "config.yaml").write_text(yaml.safe_dump(_plain(cfg), sort_keys=False))
        save_file(_state_for_safetensors(model.state_dict()), str(tmp / "model.safetensors"))
        (tmp / "env_meta.json").write_text(json.dumps(env_meta or {}, indent=2))
        if extra_modules:
            (tmp / "extra").mkdir()
            for name, mod in extra_modules.items():
                state = mod.state_dict() if isinstance(mod, torch.nn.Module) else mod
                save_file(_state_for_safetensors(state), str(tmp / "extra" / f"{name}.safetensors"))
        if training_state is not None:
            torch.save(training_state, tmp / "training_state.pt")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for tag in tags:
        _point(root / tag, final.name)
    _prune(root, keep_last)
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


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _point(link: Path, target_name: str) -> None:
    tmp_link = link.with_name(f".{link.name}.tmp{os.getpid()}")
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(target_name, tmp_link)
    os.replace(tmp_link, link)


def _prune(root: Path, keep_last: int | None) -> None:
    if not keep_last:
        return
    tagged = {os.readlink(p) for p in root.iterdir() if p.is_symlink()}
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for p in steps[:-keep_last]:
        if p.name not in tagged:
            shutil.rmtree(p, ignore_errors=True)


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a path to it, to a run directory, or to a ``checkpoints`` folder (uses last)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    for cand in (p, p / "last", p / "checkpoints" / "last"):
        if cand.is_dir() and (cand / "config.yaml").exists():
            return cand.resolve()
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


def load_checkpoint(path: str | os.PathLike, expect_kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint without executing code: returns config, model state, env meta, extras and training
    state (if present). ``expect_kind`` checks ``config['policy']['kind']`` and refuses another kind."""
    ckpt = resolve(path)
    try:
        config = yaml.safe_load((ckpt / "config.yaml").read_text())
    except yaml.YAMLError as err:
        raise CheckpointError(f"{ckpt / 'config.yaml'}: not valid YAML ({err})") from err
    if not isinstance(config, dict) or "format_version" not in config:
        raise CheckpointError(f"{ckpt}: config.yaml is not a flowpolicy checkpoint config")
    if config["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{ckpt}: format version {config['format_version']} is newer than this "
                              f"flowpolicy ({FORMAT_VERSION}); upgrade flowpolicy")
    if expect_kind is not None:
        kind = config.get("policy", {}).get("kind")
        if kind != expect_kind:
            raise CheckpointError(f"{ckpt}: holds a {kind!r} policy, expected {expect_kind!r}")
    model_file = ckpt / "model.safetensors"
    if not model_file.exists():
        raise CheckpointError(f"{ckpt}: model.safetensors is missing (incomplete checkpoint)")
    try:
        model_state = load_file(str(model_file))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{model_file}: not a valid safetensors file ({err})") from err
    extras = {}
    if (ckpt / "extra").is_dir():
        for f in sorted((ckpt / "extra").glob("*.safetensors")):
            extras[f.stem] = load_file(str(f))
    training_state = None
    ts = ckpt / "training_state.pt"
    if ts.exists():
        try:
            training_state = torch.load(ts, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{ts}: refused to load (contains objects other than tensors and plain "
                                  f"containers): {err}") from err
    env_meta = json.loads((ckpt / "env_meta.json").read_text()) if (ckpt / "env_meta.json").exists() else {}
    return {"path": ckpt, "config": config, "model": model_state, "env_meta": env_meta, "extras": extras,
            "training_state": training_state}


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
