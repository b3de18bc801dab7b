"""What a run directory already holds, checked before a stage writes anything there.

A run directory holds one run: the stage and task recorded in its ``config_resolved.yaml``. Re-running the same
stage on the same task there resumes it (the documented way to continue a run). Another stage, or another task
or env, would overwrite that run's ``config_resolved.yaml``, ``overrides.yaml``, ``summary.json`` and results,
and resume its checkpoints into a model that does not fit; a stage started from ``checkpoint=`` of another
training run (evaluating another model there) would overwrite the results of the first. :func:`check_prior_run`
refuses these in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import UserError

# stages that keep checkpoints in their run directory and honour resume=false (delete them, start fresh)
RESUMABLE = ("pretrain", "pipeline", "finetune", "image")
# what names a task's data: the env for policy tasks (or a robomimic file), the dataset for image tasks
_TASK_KEYS = ("name", "env", "demos.path", "dataset", "path")


def _select(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not hasattr(tree, "get"):
            return None
        tree = tree.get(part)
    return tree


def task_identity(task: Any) -> dict[str, str]:
    """The settings that say which task a run trained on: ``{"name": "pick_place", "env": "..."}``."""
    out = {}
    for key in _TASK_KEYS:
        value = _select(task, key)
        if value not in (None, "", "???"):
            out[key] = str(value)
    return out


def _same(key: str, a: str | None, b: str | None) -> bool:
    if a == b:
        return True
    if key.endswith("path") and a and b and os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return False


def _task_words(ident: dict[str, str]) -> str:
    extra = [ident[k] for k in _TASK_KEYS[1:] if k in ident]
    return f"task={ident.get('name', '?')}" + (f" ({', '.join(extra)})" if extra else "")


def recorded_run(run_dir: str | Path) -> dict[str, Any] | None:
    """The config a previous run wrote to ``run_dir/config_resolved.yaml`` (None: none, or not a run config)."""
    path = Path(run_dir) / "config_resolved.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        cfg = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("stage"), dict) or "name" not in cfg["stage"]:
        return None
    return cfg


def _checkpoint_source(path: Any) -> Path | None:
    """The training run a ``checkpoint=`` path belongs to (the folder above its ``checkpoints/``), so that two
    steps of one run count as one source; None when not given or not found (nothing then is compared)."""
    if path in (None, "", "None", "null"):
        return None
    from .checkpoint_load import resolve

    try:
        ckpt = resolve(str(path))
    except Exception:  # noqa: BLE001 - moved or deleted since: nothing to compare; the stage reports a bad path
        return None
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt


def check_prior_run(cfg: Any, run_dir: str | Path) -> None:
    """UserError when ``run_dir`` holds a run of another stage, or of the same stage on another task or env.

    The same stage and task pass (a re-run resumes); with ``resume=false`` a stage that keeps checkpoints may
    start fresh there on another task (its checkpoints are deleted, as that setting says)."""
    old = recorded_run(run_dir)
    if old is None:
        return
    stage, old_stage = str(cfg.stage.name), str(old["stage"]["name"])
    new_task, old_task = task_identity(cfg.get("task")), task_identity(old.get("task"))
    held = f"stage={old_stage} run of {_task_words(old_task)}"
    elsewhere = "give this run another hydra.run.dir=<new dir> (or leave it out for a new dated one)"
    if stage != old_stage:
        raise UserError(f"{run_dir} already holds a {held}; stage={stage} there would overwrite its "
                        f"config_resolved.yaml, summary.json and results: {elsewhere}")
    keys = [k for k in _TASK_KEYS if not _same(k, old_task.get(k), new_task.get(k))]
    old_src, new_src = _checkpoint_source(old.get("checkpoint")), _checkpoint_source(cfg.get("checkpoint"))
    if not keys and old_src and new_src and old_src != new_src:  # eval/finetune/align/reflow of another model
        if stage in RESUMABLE and not cfg.get("resume", True):
            return
        raise UserError(f"{run_dir} already holds a {held} from checkpoint={old['checkpoint']}, a checkpoint of "
                        f"another run than checkpoint={cfg.get('checkpoint')}; running there would overwrite its "
                        f"results: {elsewhere}" + (", or resume=false to delete its checkpoints and start fresh "
                                                   "there" if stage in RESUMABLE else ""))
    if not keys:
        return
    if stage in RESUMABLE and not cfg.get("resume", True):
        return  # resume=false: start fresh there (the stage deletes the old checkpoints and says so)
    if stage in RESUMABLE:
        elsewhere += ", or resume=false to delete its checkpoints and start fresh there"
    raise UserError(f"{run_dir} already holds a {held}, not of {_task_words(new_task)}; "
                    f"running there would mix the two runs: {elsewhere}")
