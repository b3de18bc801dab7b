"""The stages that ``train.py`` runs, as plain functions of a composed config and a run directory.

pretrain: collect demos if missing, behavior cloning, evaluation at the task's K list.
eval:     evaluate ``checkpoint=...`` at ``stage.steps``; JSON + Markdown + videos.
finetune: ReinFlow PPO from ``checkpoint=...`` (a pretrained flow policy).
pipeline: pretrain -> eval -> finetune -> eval, the embedded default job.
reflow:   2-rectified flow + 1-step distillation of a pretrained ReFlow policy.
align:    Flow-DPO / Flow-RWR / SFT-on-winners from ``checkpoint=...`` (policies or image generators).
image:    image generation with the same flow core (agents.images).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from envs.collect import ensure_demos

from .evaluate import evaluate_policy_steps, write_eval
from .policies import policy_from_checkpoint
from .pretrain import PretrainConfig, Pretrainer

STAGES = ("pipeline", "pretrain", "finetune", "eval", "align", "image", "reflow")


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def validate_config(cfg: DictConfig) -> None:
    """Clear errors for invalid values before anything runs."""
    if cfg.stage.name not in STAGES:
        raise ValueError(f"unknown stage {cfg.stage.name!r}; choose from {STAGES}")
    task = cfg.task
    if task.get("kind", "policy") == "policy":
        for key in ("obs_horizon", "action_horizon"):
            if int(task[key]) < 1:
                raise ValueError(f"task.{key} must be >= 1, got {task[key]}")
        ex = task.get("exec_horizon")
        if ex is not None and not 1 <= int(ex) <= int(task.action_horizon):
            raise ValueError(f"task.exec_horizon must be in [1, task.action_horizon={task.action_horizon}], got {ex}")
        steps = task.eval.steps
        if any(int(k) < 1 for k in steps):
            raise ValueError(f"task.eval.steps must be positive, got {list(steps)}")
        if cfg.policy.kind == "shortcut":
            from flowpolicy.policy import is_power_of_two

            bad = [int(k) for k in steps if not is_power_of_two(int(k))]
            if bad:
                raise ValueError(f"shortcut policies sample with power-of-two K; task.eval.steps has {bad}")
    if cfg.stage.name in ("eval", "finetune", "align", "reflow") and not cfg.get("checkpoint"):
        raise ValueError(f"stage={cfg.stage.name} needs checkpoint=<checkpoint dir or run dir>")


def demos_for(cfg: DictConfig) -> str:
    """The task's demo file: ``task.demos.path`` if given (must exist), else collected/cached."""
    d = cfg.task.demos
    if d.get("path"):
        p = Path(d.path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"task.demos.path={str(p)!r} does not exist")
        return str(p)
    return str(ensure_demos(cfg.task.env, num_demos=int(d.num), noise=d.get("noise"), seed=int(d.seed),
                            quality=d.get("quality", "expert"), data_dir=cfg.get("data_dir"),
                            progress=bool(cfg.progress)))


def pretrain_config(cfg: DictConfig, stage_cfg, run_dir: Path, dataset: str) -> PretrainConfig:
    s = _plain(stage_cfg)
    s.pop("name", None)
    return PretrainConfig(dataset=dataset, env_name=cfg.task.env, run_dir=str(run_dir), policy=_plain(cfg.policy),
                          obs_horizon=int(cfg.task.obs_horizon), action_horizon=int(cfg.task.action_horizon),
                          exec_horizon=cfg.task.get("exec_horizon"), max_episode_steps=cfg.task.get("max_episode_steps"),
                          seed=int(cfg.seed), device=cfg.device, progress=bool(cfg.progress),
                          tensorboard=cfg.logger.name != "none", **s)


def run_pretrain(cfg: DictConfig, run_dir: Path, stage_cfg=None) -> dict[str, Any]:
    dataset = demos_for(cfg)
    pc = pretrain_config(cfg, stage_cfg if stage_cfg is not None else cfg.stage, run_dir, dataset)
    t0 = time.perf_counter()
    result = Pretrainer(pc).run()
    result["wall_s"] = time.perf_counter() - t0
    result["dataset"] = dataset
    return result


def run_eval(cfg: DictConfig, run_dir: Path, checkpoint: str, steps=None, name: str = "eval", label: str = "") -> dict:
    policy, ckpt = policy_from_checkpoint(checkpoint, device=cfg.device)
    env_name = ckpt["env_meta"].get("name") or cfg.task.env
    e = cfg.task.eval
    rows = evaluate_policy_steps(policy, env_name, list(steps or e.steps), episodes=int(e.episodes),
                                 num_envs=int(e.num_envs), max_episode_steps=cfg.task.get("max_episode_steps"),
                                 videos=int(e.get("videos", 0)), out_dir=run_dir, label=label)
    md = write_eval(rows, run_dir, name)
    return {"rows": rows, "markdown": md}


def run_finetune(cfg: DictConfig, run_dir: Path, checkpoint: str, stage_cfg=None) -> dict[str, Any]:
    from .finetune_stage import run_finetune_stage

    return run_finetune_stage(cfg, run_dir, checkpoint, stage_cfg if stage_cfg is not None else cfg.stage)


def run_reflow(cfg: DictConfig, run_dir: Path, checkpoint: str) -> dict[str, Any]:
    """2-RF + 1-step distillation of a pretrained ReFlow policy; saves both as ordinary checkpoints."""
    from .policy_reflow import (
        PolicyReflowConfig,
        dataset_observations,
        rectify_policy,
        save_reflow_checkpoint,
    )

    policy, ck = policy_from_checkpoint(checkpoint, expect_kind="reflow", device=cfg.device)
    dataset = ck["config"].get("train", {}).get("dataset") or demos_for(cfg)
    s = _plain(cfg.stage)
    s.pop("name", None)
    rcfg = PolicyReflowConfig(**s, seed=int(cfg.seed), progress=bool(cfg.progress))
    obs = dataset_observations(dataset, policy.obs_horizon)
    res = rectify_policy(policy, obs, rcfg)
    spec = ck["config"]["policy"]
    out = {"info": res.info, "rectified": str(save_reflow_checkpoint(
        res.rectified, spec, run_dir / "rectified" / "checkpoints", rcfg.reflow_steps, env_meta=ck["env_meta"],
        extra_config={"from": str(ck["path"])}))}
    out["distilled"] = str(save_reflow_checkpoint(
        res.distilled, spec, run_dir / "distilled" / "checkpoints", rcfg.distill_steps, distilled_steps=1,
        env_meta=ck["env_meta"], extra_config={"from": str(ck["path"])})) if res.distilled is not None else None
    return out


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run ``cfg.stage.name`` in ``run_dir``; returns a summary and writes ``summary.json`` there."""
    validate_config(cfg)
    torch.set_num_threads(int(cfg.get("threads", 2)))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    name = cfg.stage.name
    out: dict[str, Any] = {"stage": name, "run_dir": str(run_dir)}
    if name == "image":
        from .images import run as run_image

        out.update(run_image(cfg))
    elif name == "pretrain":
        out["pretrain"] = run_pretrain(cfg, run_dir)
        out["eval"] = run_eval(cfg, run_dir, out["pretrain"]["best"], label=f"{cfg.policy.kind} (BC)")
    elif name == "eval":
        steps = cfg.stage.get("steps")
        out["eval"] = run_eval(cfg, run_dir, cfg.checkpoint, steps)
    elif name == "finetune":
        out["finetune"] = run_finetune(cfg, run_dir, cfg.checkpoint)
    elif name == "reflow":
        out["reflow"] = run_reflow(cfg, run_dir, cfg.checkpoint)
        out["eval"] = {"rows": [], "markdown": ""}
        for label, ck in (("2-ReFlow", out["reflow"]["rectified"]), ("2-ReFlow distilled", out["reflow"]["distilled"])):
            if ck:
                ev = run_eval(cfg, run_dir, ck, name=f"eval_{label.replace(' ', '_')}", label=label)
                out["eval"]["rows"] += ev["rows"]
                out["eval"]["markdown"] += ev["markdown"] + "\n"
    elif name == "align":
        from .align import run_align_stage

        out["align"] = run_align_stage(cfg, run_dir, cfg.checkpoint)
    elif name == "pipeline":
        out["pretrain"] = run_pretrain(cfg, run_dir / "pretrain", cfg.stage.pretrain)
        out["eval"] = run_eval(cfg, run_dir, out["pretrain"]["best"], name="eval_pretrained",
                               label=f"{cfg.policy.kind} (BC)")
        if cfg.stage.get("finetune") is not None and cfg.stage.get("run_finetune", True):
            ft = run_finetune(cfg, run_dir / "finetune", out["pretrain"]["best"], cfg.stage.finetune)
            out["finetune"] = ft
            out["eval_finetuned"] = run_eval(cfg, run_dir, ft["checkpoint"], steps=[int(cfg.stage.finetune.steps)],
                                             name="eval_finetuned", label=f"{cfg.policy.kind} (ReinFlow)")
    (run_dir / "summary.json").write_text(json.dumps(_jsonable(out), indent=2))
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if k != "markdown"}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
