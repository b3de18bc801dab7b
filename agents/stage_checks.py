"""The checks of single stages that :mod:`agents.stages` runs before it writes anything into the run directory.

:func:`check_stage_settings` (from ``validate_config``): the settings of ``stage=align|reflow|image`` that
their runners would refuse (or, for the image stage, silently accept) only after ``config_resolved.yaml`` and
``overrides.yaml`` were written: step counts, learning rates and the like.

:func:`check_checkpoint_fit` (from ``_prechecks``): what only the checkpoint tells: a shortcut policy evaluated
or fine-tuned at a K that is not a power of two, Flow-DPO asked of a shortcut policy, an image generator that
is not one.

:func:`check_run_dir` (from ``_prechecks``): what the run directory holds that the stage would refuse part way
(an image run there that finished its models with another seed or other settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .errors import UserError


def _image_task(cfg: DictConfig) -> bool:
    return cfg.task.get("kind", "policy") == "image"


def check_stage_settings(cfg: DictConfig) -> None:
    """UserError for a bad setting of ``stage=align``, ``reflow`` or ``image`` (the runners' own checks, run
    here before any work)."""
    name = cfg.stage.name
    if name == "image":
        from .images.trainer import check_stage

        check_stage(cfg.stage)
    elif name == "reflow":
        from .stage_runners import reflow_config

        reflow_config(cfg.stage)
    elif name == "align":
        try:
            if _image_task(cfg):
                from .images.align import image_align_config

                image_align_config(cfg)
            else:
                from .align import align_config

                align_config(cfg)
        except UserError:
            raise
        except TypeError as err:
            raise UserError(f"stage: {err}") from err
        except ValueError as err:
            raise UserError(str(err)) from err


def check_shortcut_steps(kind: str, steps, key: str, source: str = "the checkpoint holds") -> None:
    """UserError when a ``kind`` policy (from its checkpoint) would sample at a K in ``steps`` it cannot: shortcut
    policies sample with power-of-two K only (validate_config checks ``task.eval.denoise_steps`` likewise)."""
    if kind != "shortcut":
        return
    from flowpolicy.policy import is_power_of_two

    bad = [int(k) for k in steps if not is_power_of_two(int(k))]
    if bad:
        raise UserError(f"{source} a shortcut policy, which samples with power-of-two K; {key} has "
                        f"{bad}")


def check_checkpoint_fit(cfg: DictConfig, policy: Any, ck: dict[str, Any]) -> None:
    """UserError when the stage cannot use ``checkpoint=`` (``policy``, loaded with its checkpoint ``ck``) as
    set: checked before any rollout and before the run directory is written."""
    name, stage = cfg.stage.name, cfg.stage
    kind = str(getattr(policy, "kind", None) or (ck["config"].get("policy") or {}).get("kind"))
    if name == "eval":
        steps = stage.get("denoise_steps") or cfg.task.eval.denoise_steps
        key = "stage.denoise_steps" if stage.get("denoise_steps") else "task.eval.denoise_steps"
        check_shortcut_steps(kind, steps, key)
    elif name == "finetune" and stage.get("denoise_steps") is not None:
        check_shortcut_steps(kind, [stage.denoise_steps], "stage.denoise_steps")
    elif name == "align":
        from .align import align_config, check_alignable

        try:
            check_alignable(policy, align_config(cfg), cfg.checkpoint)
        except UserError:
            raise
        except ValueError as err:
            raise UserError(str(err)) from err


def check_run_dir(cfg: DictConfig, run_dir: str | Path) -> None:
    """UserError when ``run_dir`` holds what the stage would refuse only after it began (image models finished
    there with another seed, method or settings, which a resumed run would not reuse)."""
    if cfg.stage.name == "image":
        from .images.trainer import check_resume

        check_resume(cfg, run_dir)
