"""Settings renamed so that names say what they count: ``grad_steps`` (gradient steps) and ``denoise_steps``
(denoising steps K). Old names in an override, a task file or a saved checkpoint config get a pointer to the new
one (overrides, task files) or are migrated (checkpoints: :func:`migrate_saved_config`)."""

from __future__ import annotations

from typing import Any

# old key -> its new name, per place it can appear
RENAMED: dict[str, dict[str, str]] = {
    "pretrain": {"steps": "grad_steps"},
    "finetune": {"steps": "denoise_steps"},
    "eval": {"steps": "denoise_steps"},
    "align": {"steps": "grad_steps", "K": "denoise_steps", "eval_steps": "eval_denoise_steps"},
    "image": {"train_steps": "grad_steps"},
    "image.reflow": {"steps": "grad_steps"},
    "image.distill": {"steps": "grad_steps"},
    "image.classifier": {"steps": "grad_steps"},
    "image.eval": {"steps": "denoise_steps"},
    "image_align": {"steps": "grad_steps"},
    "task.eval": {"steps": "denoise_steps"},
    "task.finetune": {"steps": "denoise_steps"},
}

_ANY = {old: sorted({m[old] for m in RENAMED.values() if old in m}) for m in RENAMED.values() for old in m}


def hint(key: str, where: str | None = None) -> str:
    """`` (renamed: ...)`` for a key that was renamed (in ``where``, or anywhere when None), else ``""``."""
    new = [RENAMED[where][key]] if where in RENAMED and key in RENAMED[where] else _ANY.get(key, [])
    if not new:
        return ""
    meaning = {"grad_steps": "gradient steps", "denoise_steps": "denoising steps K",
               "eval_denoise_steps": "denoising steps K of the evaluation"}
    return " (renamed: " + " or ".join(f"{n}, {meaning[n]}" for n in new) + ")"


def unknown_with_hints(keys, where: str | None = None) -> str:
    """``['steps (renamed: grad_steps, gradient steps)', ...]`` for an error message."""
    return "[" + ", ".join(f"{k!r}{hint(k, where)}" for k in keys) + "]"


def migrate_saved_config(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``config.yaml`` with the settings blocks written before the renames (``train`` of
    pretraining, ``finetune``, ``align``) under their new names. Returns ``config`` (changed in place)."""
    for block, section in (("train", "pretrain"), ("finetune", "finetune"), ("align", "align")):
        d = config.get(block)
        if isinstance(d, dict):
            for old, new in RENAMED[section].items():
                if old in d and new not in d:
                    d[new] = d.pop(old)
    return config
