"""The schema of every stage config: the settings dataclasses themselves, registered in Hydra's ConfigStore.

Each ``configs/stage/<name>.yaml`` starts from ``/schema/<name>`` (its dataclass: every field, its type and its
default) and sets only what differs: interpolations of top-level keys (``seed``, ``device``) and the fields a task
may choose (``${task_or:finetune.clip_coef}``: the task's ``task.finetune.clip_coef`` where the task sets one,
else the dataclass default). A setting is defined once, in Python; Hydra checks types and names at composition,
so ``stage.clip_coef=abc`` or a misspelt key stops before anything runs.

    stage=pretrain -> PretrainStage (agents.pretrain.PretrainSettings)
    stage=finetune -> FinetuneStage (agents.finetune_config.FinetuneConfig + the runner's budget keys)
    stage=eval     -> EvalStage
    stage=align    -> AlignStage (agents.align_data.AlignConfig + agents.images.align.ImageAlignConfig)
    stage=reflow   -> ReflowStage (agents.policy_reflow.PolicyReflowConfig)
    stage=image    -> ImageStage (nested sections: reflow, distill, shortcut, eval, classifier)

``stage=pipeline`` nests the pretrain and finetune schemas.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .align_data import AlignConfig
from .finetune_config import FinetuneConfig
from .images.align import ImageAlignConfig
from .policy_reflow import PolicyReflowConfig
from .pretrain import PretrainSettings


@dataclass
class PretrainStage(PretrainSettings):
    name: str = "pretrain"


@dataclass
class FinetuneStage(FinetuneConfig):
    name: str = "finetune"
    total_env_steps: int = 200_000  # env steps (not chunks) of the whole run
    save_every: int = 10  # iterations between checkpoints


# the stage keys the fine-tuning runner reads itself (FinetuneConfig does not have them)
RUNNER_KEYS = tuple(f.name for f in dataclasses.fields(FinetuneStage)
                    if f.name not in {g.name for g in dataclasses.fields(FinetuneConfig)})


@dataclass
class EvalStage:
    """``stage=eval``: evaluate ``checkpoint=...`` at several numbers of denoising steps."""

    name: str = "eval"
    denoise_steps: list[int] = field(default_factory=lambda: [1, 2, 4])  # K values (the task's eval.denoise_steps)
    episodes: int = 30  # deterministic episodes per K
    num_envs: int = 4
    videos: int = 1  # episodes recorded per K (0: none)
    seed: int = 100_000  # seeds the eval envs and the flow's initial noise


# stage.image: ImageAlignConfig less the three keys image alignment takes from the stage (method) and the top level
# (seed, progress)
ImageAlignBlock = dataclasses.make_dataclass(
    "ImageAlignBlock", [(f.name, f.type, dataclasses.field(default=f.default)) for f in
                        dataclasses.fields(ImageAlignConfig) if f.name not in ("method", "seed", "progress")])


@dataclass
class AlignStage(AlignConfig):
    name: str = "align"
    image: ImageAlignBlock = field(default_factory=ImageAlignBlock)  # type: ignore[valid-type]  # image tasks only


@dataclass
class ReflowStage(PolicyReflowConfig):
    name: str = "reflow"


@dataclass
class ImageReflowSection:
    """``stage.image``'s ``reflow`` block: the 2-RF on couplings of the 1-RF (method=reflow)."""

    couplings: int = 20_000
    couplings_steps: int = 12  # teacher ODE steps per coupling; midpoint x 12 matches Euler x 100 on digits
    couplings_solver: str = "midpoint"
    grad_steps: int = 3000
    lr: float | None = None  # None: the stage's (likewise lr_schedule, loss, huber_c, time_sampler)
    lr_schedule: str | None = None
    loss: str | None = "pseudo_huber"  # Lee et al. 2024: pseudo-Huber + U-shaped t help few-step 2-RF
    huber_c: float | None = None  # None with pseudo_huber: 0.00054 * dim (Lee et al.)
    time_sampler: str | None = "u_shaped"


@dataclass
class ImageDistillSection:
    """K-step distillations of the 2-RF, initialized from it (``grad_steps: 0`` skips them)."""

    pairs: str = "reflow"  # reflow: the 1-RF couplings the 2-RF trained on; teacher: new couplings of the 2-RF
    couplings: int = 20_000  # pairs=teacher only
    couplings_steps: int = 4  # pairs=teacher only; the 2-RF is nearly straight: few steps reproduce its ODE
    couplings_solver: str = "midpoint"
    grad_steps: int = 3000
    k: Any = field(default_factory=lambda: [1, 2])  # an int or a list: one student per K (its K-step t grid)
    lr: float | None = None
    lr_schedule: str | None = None
    loss: str | None = "pseudo_huber"
    huber_c: float | None = None


@dataclass
class ImageShortcutSection:
    max_level: int = 7  # finest step 1/128
    sc_fraction: float = 0.25  # share of each batch trained for self-consistency


@dataclass
class ImageEvalSection:
    denoise_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 128])  # Euler K; shortcut: powers of 2
    samples: int = 1000
    fd: bool = True  # Frechet distance in the features of the classifier below
    straightness_samples: int = 500
    straightness_steps: int = 32


@dataclass
class ImageClassifierSection:
    """The FD feature network, cached under ``cache_dir`` keyed by dataset and settings."""

    grad_steps: int = 1500
    seed: int = 0
    cache_dir: str | None = "data/classifiers"


@dataclass
class ImageStage:
    """``stage=image``: image generation with the shared flow core (agents.images)."""

    name: str = "image"
    method: str = "rf"  # rf | reflow (1-RF -> 2-RF -> distilled 2-RF) | shortcut
    grad_steps: int = 4000  # 1-RF or shortcut gradient steps
    batch_size: int = 128
    lr: float = 1.0e-3
    lr_schedule: str = "cosine"  # constant | cosine (decay to 0 over each training section)
    ema_decay: float = 0.999  # EMA of the weights; every sample uses the EMA network
    grad_clip: float = 1.0
    loss: str = "mse"  # mse | pseudo_huber (then set huber_c; Lee et al. use 0.00054 * dim)
    huber_c: float | None = None
    time_sampler: str = "uniform"  # uniform | logit_normal | mode | u_shaped
    net: dict[str, Any] = field(default_factory=lambda: {"kind": "unet2d", "channels": [32, 64], "emb_dim": 128})
    reflow: ImageReflowSection = field(default_factory=ImageReflowSection)
    distill: ImageDistillSection = field(default_factory=ImageDistillSection)
    shortcut: ImageShortcutSection = field(default_factory=ImageShortcutSection)
    eval: ImageEvalSection = field(default_factory=ImageEvalSection)
    classifier: ImageClassifierSection = field(default_factory=ImageClassifierSection)
    checkpoint: bool = True
    grid_cols: int = 16
    log_every: int = 50
    progress: bool | None = None  # None: the top-level ``progress``


SCHEMAS = {"pretrain": PretrainStage, "finetune": FinetuneStage, "eval": EvalStage, "align": AlignStage,
           "reflow": ReflowStage, "image": ImageStage}


def schema_default(section: str, key: str):
    """The dataclass default of ``stage=<section>``'s field ``key``."""
    f = {f.name: f for f in dataclasses.fields(SCHEMAS[section])}.get(key)
    if f is None:
        raise KeyError(f"{key!r} is not a setting of stage={section} (agents/config_schema.py)")
    if f.default is not dataclasses.MISSING:
        return list(f.default) if isinstance(f.default, tuple) else f.default
    return f.default_factory()  # type: ignore[misc]


_UNSET = object()


def task_or(path: str, *, _root_):
    """``${task_or:finetune.clip_coef}``: ``task.finetune.clip_coef`` where the task sets it, else the default."""
    from omegaconf import OmegaConf

    section, _, key = path.partition(".")
    value = OmegaConf.select(_root_, f"task.{path}", default=_UNSET)
    return schema_default(section, key) if value is _UNSET else value


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (group ``schema``) and the ``task_or`` resolver; idempotent."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(group="schema", name=name, node=node)
    if not OmegaConf.has_resolver("task_or"):
        OmegaConf.register_new_resolver("task_or", task_or)


def task_choosable(section: str) -> set[str]:
    """The settings of ``stage=<section>`` a task may choose: those its YAML reads with ``${task_or:...}``."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "configs" / "stage" / f"{section}.yaml").read_text()
    return set(re.findall(r"\$\{task_or:" + section + r"\.(\w+)\}", text))


def unknown_task_keys(task_section, section: str) -> list[str]:
    """Keys of a task's ``finetune:`` (or other) block that ``stage=<section>`` does not have (typos)."""
    names = {f.name for f in dataclasses.fields(SCHEMAS[section])}
    return sorted(k for k in task_section if k not in names)
