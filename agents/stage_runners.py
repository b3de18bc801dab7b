"""The runners of the single stages that :mod:`agents.stages` dispatches to (and re-exports): pretrain
(behavior cloning), eval (on the env a checkpoint was trained for, :func:`eval_target`), finetune and reflow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import UserError
from .evaluate import evaluate_policy_steps, write_eval
from .policies import policy_from_checkpoint
from .pretrain import PretrainConfig, Pretrainer
from .tasks import TaskData, _env_meta_for, demos_for, note, resolve_task


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def pretrain_config(cfg: DictConfig, stage_cfg, run_dir: Path, dataset: str, data: TaskData | None = None
                    ) -> PretrainConfig:
    s = _plain(stage_cfg)
    s.pop("name", None)
    extra = {"obs_keys": data.obs_keys} if data is not None and data.obs_keys else {}
    return PretrainConfig(dataset=dataset, env_name=data.env if data else cfg.task.env, run_dir=str(run_dir),
                          policy=_plain(cfg.policy), obs_horizon=int(cfg.task.obs_horizon),
                          action_horizon=int(cfg.task.action_horizon), exec_horizon=cfg.task.get("exec_horizon"),
                          max_episode_steps=cfg.task.get("max_episode_steps"), seed=int(cfg.seed), device=cfg.device,
                          progress=bool(cfg.progress), tensorboard=cfg.logger.name != "none", **extra, **s)


def run_pretrain(cfg: DictConfig, run_dir: Path, stage_cfg=None, data: TaskData | None = None) -> dict[str, Any]:
    data = data or resolve_task(cfg)
    dataset = demos_for(cfg, data)
    pc = pretrain_config(cfg, stage_cfg if stage_cfg is not None else cfg.stage, run_dir, dataset, data)
    t0 = time.perf_counter()
    result = Pretrainer(pc).run()
    result["wall_s"] = time.perf_counter() - t0
    result["dataset"] = dataset
    result["env"] = data.env
    return result


@dataclass
class EvalTarget:
    """The env a checkpoint is evaluated (or fine-tuned) on, and facts about it."""

    env: str
    max_episode_steps: int | None
    has_success: bool


def eval_target(cfg: DictConfig, checkpoint: str, policy=None, ck=None) -> EvalTarget:
    """The env stored with the checkpoint (a note when ``task.env`` names another), checked against the
    policy's observation and action sizes before the first rollout."""
    from envs.factory import parse_env_name

    if policy is None:
        policy, ck = policy_from_checkpoint(checkpoint, device="cpu")
    ck_env = ck["env_meta"].get("name")
    task_env = cfg.task.get("env")
    task_env = parse_env_name(task_env).canonical if task_env else None
    trained_steps = (ck["config"].get("train") or {}).get("max_episode_steps")
    if ck_env:
        env = ck_env
        same = task_env is not None and task_env.split("@")[0] == ck_env.split("@")[0]
        if task_env and not same:
            note(f"checkpoint {ck['path']} was trained on {ck_env}; evaluating on {ck_env}, not task.env={task_env}")
        max_steps = cfg.task.get("max_episode_steps") if same else (trained_steps or ck["env_meta"].get("max_episode_steps"))
    elif task_env:
        env, max_steps = task_env, cfg.task.get("max_episode_steps")
    else:
        raise UserError(f"checkpoint {ck['path']} names no env (env_meta.json) and task.env is not set; set task.env=...")
    meta = _env_meta_for(env, f"checkpoint {ck['path']}")
    for what, have, want in (("observation", policy.obs_dim, meta["obs_dim"]), ("action", policy.act_dim, meta["act_dim"])):
        if int(have) != int(want):
            raise UserError(f"checkpoint {ck['path']} expects {what}s of size {have} but env {env} has {want}; "
                            "evaluate or fine-tune it on the env it was trained on")
    return EvalTarget(env, None if max_steps is None else int(max_steps), bool(meta["has_success"]))


def run_eval(cfg: DictConfig, run_dir: Path, checkpoint: str, steps=None, name: str = "eval", label: str = "",
             target: EvalTarget | None = None, settings=None) -> dict:
    """Evaluate ``checkpoint`` at ``steps`` (default ``settings.denoise_steps``). ``settings`` holds ``episodes``,
    ``num_envs``, ``videos`` and optionally ``seed`` (of the eval envs and the sampler); it is ``task.eval``
    unless given (``stage=eval`` gives its own stage config, whose defaults are ``task.eval``'s)."""
    policy, ckpt = policy_from_checkpoint(checkpoint, device=cfg.device)
    target = target or eval_target(cfg, checkpoint, policy, ckpt)
    e = settings if settings is not None else cfg.task.eval
    seed = {"seed": int(e.seed)} if e.get("seed") is not None else {}  # else evaluate_policy_steps' default
    steps = list(steps or e.get("denoise_steps") or cfg.task.eval.denoise_steps)
    rows = evaluate_policy_steps(policy, target.env, steps, episodes=int(e.episodes),
                                 num_envs=int(e.num_envs), max_episode_steps=target.max_episode_steps,
                                 videos=int(e.get("videos", 0)), out_dir=run_dir, label=label,
                                 has_success=target.has_success, video_prefix=name, progress=bool(cfg.progress),
                                 **seed)
    md = write_eval(rows, run_dir, name)
    return {"rows": rows, "markdown": md}


def finetune_table(ft: dict[str, Any], env: str, has_success: bool) -> str:
    """Markdown before/after table of a fine-tuning run (its first and last evaluations)."""
    lines = ["| policy | env | env_steps | return_mean | return_std | success_rate |", "|---|---|---|---|---|---|"]
    for label, h in (("before (pretrained)", ft.get("initial_eval")), ("after (fine-tuned)", ft.get("final_eval"))):
        if not h:
            continue
        succ = h.get("eval/success_rate")
        lines.append(f"| {label} | {env} | {h.get('env_steps', '')} | {h.get('eval/return_mean', float('nan')):.2f} | "
                     f"{h.get('eval/return_std', float('nan')):.2f} | "
                     f"{'' if succ is None or not has_success else f'{succ:.2f}'} |")
    if len(lines) == 2:
        return "no evaluation during fine-tuning (stage.eval_every=0): evaluate with stage=eval checkpoint=<run dir>"
    return "\n".join(lines)


def run_finetune(cfg: DictConfig, run_dir: Path, checkpoint: str, stage_cfg=None) -> dict[str, Any]:
    from .finetune_stage import run_finetune_stage

    return run_finetune_stage(cfg, run_dir, checkpoint, stage_cfg if stage_cfg is not None else cfg.stage)


def reflow_config(stage_cfg):
    """The checked :class:`~agents.policy_reflow.PolicyReflowConfig` of ``stage=reflow`` (UserError naming the
    stage key, e.g. ``stage.reflow_steps must be >= 1``)."""
    from .policy_reflow import PolicyReflowConfig

    s = _plain(stage_cfg)
    s.pop("name", None)
    try:
        rcfg = PolicyReflowConfig(**s)
        rcfg.validate()
    except TypeError as err:
        raise UserError(f"stage: {err}") from err
    except ValueError as err:
        msg = str(err)
        raise UserError("stage." + msg[len("reflow."):] if msg.startswith("reflow.") else msg) from err
    return rcfg


def run_reflow(cfg: DictConfig, run_dir: Path, checkpoint: str) -> dict[str, Any]:
    """2-RF + 1-step distillation of a pretrained ReFlow policy; saves both as ordinary checkpoints."""
    from .policy_reflow import (
        dataset_observations,
        rectify_policy,
        save_reflow_checkpoint,
    )

    rcfg = reflow_config(cfg.stage)
    policy, ck = policy_from_checkpoint(checkpoint, expect_kind="reflow", device=cfg.device)
    dataset = ck["config"].get("train", {}).get("dataset") or demos_for(cfg)
    # the observation keys the policy was pretrained on (a robomimic file's chosen keys, in their order)
    train = ck["config"].get("train", {})
    obs_keys = train.get("obs_keys") or (list(cfg.task.obs_keys) if cfg.task.get("obs_keys") else None)
    obs = dataset_observations(dataset, policy.obs_horizon, obs_keys=obs_keys)
    res = rectify_policy(policy, obs, rcfg)
    spec = ck["config"]["policy"]
    out = {"info": res.info, "rectified": str(save_reflow_checkpoint(
        res.rectified, spec, run_dir / "rectified" / "checkpoints", rcfg.reflow_steps, env_meta=ck["env_meta"],
        extra_config={"from": str(ck["path"])}))}
    out["distilled"] = str(save_reflow_checkpoint(
        res.distilled, spec, run_dir / "distilled" / "checkpoints", rcfg.distill_steps, distilled_steps=1,
        env_meta=ck["env_meta"], extra_config={"from": str(ck["path"])})) if res.distilled is not None else None
    return out
