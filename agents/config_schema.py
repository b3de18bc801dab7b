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

``stage=pipeline`` nests the pretrain and finetune schemas; ``stage=image`` keeps its own nested YAML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

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
    steps: list[int] = field(default_factory=lambda: [1, 2, 4])  # denoising steps K (the task's eval.steps)
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


SCHEMAS = {"pretrain": PretrainStage, "finetune": FinetuneStage, "eval": EvalStage, "align": AlignStage,
           "reflow": ReflowStage}


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


def unknown_task_keys(task_section, section: str) -> list[str]:
    """Keys of a task's ``finetune:`` (or other) block that ``stage=<section>`` does not have (typos)."""
    names = {f.name for f in dataclasses.fields(SCHEMAS[section])}
    return sorted(k for k in task_section if k not in names)
