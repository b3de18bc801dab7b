"""``stage=finetune``: ReinFlow PPO from a pretrained checkpoint, with TensorBoard, checkpoints and resume.

Checkpoints hold the fine-tuned policy (``model.safetensors``; no ``policy_ema`` extra, so loading picks the
fine-tuned weights), the noise network, and ``agent.state_dict()`` as training state. Re-running the same
command in the same run directory resumes from ``checkpoints/last`` at the iteration where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from envs.factory import make_vec_env

from .checkpoint import load_checkpoint, save_checkpoint
from .finetune import FinetuneConfig, ReinFlowPPO
from .policies import extra_modules, policy_config, policy_from_checkpoint
from .tblog import Logger

RUNNER_KEYS = ("name", "total_env_steps", "save_every")


def run_finetune_stage(cfg: DictConfig, run_dir: str | Path, checkpoint: str, stage_cfg) -> dict[str, Any]:
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    s = OmegaConf.to_container(stage_cfg, resolve=True) if isinstance(stage_cfg, DictConfig) else dict(stage_cfg)
    total = int(s.get("total_env_steps", 200_000))
    save_every = int(s.get("save_every", 10))
    if total < 1:
        raise ValueError(f"finetune total_env_steps must be >= 1, got {total}")
    fcfg = FinetuneConfig.from_dict({k: v for k, v in s.items() if k not in RUNNER_KEYS})
    policy, ck = policy_from_checkpoint(checkpoint, device=fcfg.device)
    if policy.kind not in ("reflow", "shortcut", "gaussian"):
        raise ValueError(f"{checkpoint}: cannot fine-tune a {policy.kind!r} policy")
    env_name = ck["env_meta"].get("name") or cfg.task.env
    max_steps = cfg.task.get("max_episode_steps")
    envs = make_vec_env(env_name, fcfg.num_envs, seed=fcfg.seed, obs_horizon=policy.obs_horizon,
                        action_horizon=policy.exec_horizon, max_episode_steps=max_steps)
    eval_envs = make_vec_env(env_name, fcfg.eval_num_envs, seed=fcfg.eval_seed, obs_horizon=policy.obs_horizon,
                             action_horizon=policy.exec_horizon, max_episode_steps=max_steps)
    agent = ReinFlowPPO(policy, envs, eval_envs, fcfg)
    spec = dict(ck["config"]["policy"])
    if policy.kind != "gaussian":
        spec["default_steps"] = fcfg.steps
    has_success = bool(ck["env_meta"].get("has_success"))
    state = {"best": -math.inf, "history": []}
    if (ckpt_dir / "last").exists():
        last = load_checkpoint(ckpt_dir / "last")
        agent.load_state_dict(last["training_state"]["agent"])
        state["best"] = float(last["training_state"]["best"])
        state["history"] = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").exists() else []

    def save(tags):
        extras = {**extra_modules(agent.policy)}
        if hasattr(agent.actor, "noise_net"):
            extras["noise_net"] = agent.actor.noise_net
        cfg_out = {**policy_config(agent.policy, spec), "stage": "finetune", "pretrained_from": str(ck["path"]),
                   "finetune": fcfg.to_dict(), "total_env_steps": total}
        save_checkpoint(ckpt_dir, agent.iteration, cfg_out, agent.policy, ck["env_meta"],
                        {"agent": agent.state_dict(), "best": state["best"]}, extras, tags=tags)
        (run_dir / "history.json").write_text(json.dumps(state["history"], indent=1))

    logger = Logger(run_dir / "tb" if cfg.logger.name != "none" else None)
    t0 = time.perf_counter()

    def callback(agent_, metrics):
        step = int(metrics.get("charts/env_steps", agent_.env_steps))
        logger.log(metrics, step)
        tags = []
        if "eval/return_mean" in metrics:
            score = metrics["eval/success_rate"] if has_success else metrics["eval/return_mean"]
            state["history"].append({"env_steps": step, "iteration": agent_.iteration,
                                     **{k: metrics[k] for k in metrics if k.startswith("eval/")}})
            if score > state["best"]:
                state["best"] = score
                tags.append("best")
        if agent_.iteration > 0 and (agent_.iteration % save_every == 0 or agent_.env_steps >= total or tags):
            save(("last", *tags))
        return True

    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        agent.learn(total, callback=callback, progress=bool(cfg.get("progress", True)))
        if agent.iteration > 0:
            save(("last",))
    finally:
        logger.close()
        envs.close()
        eval_envs.close()
    hist = state["history"]
    return {"checkpoint": str((ckpt_dir / "last").resolve()),
            "best": str((ckpt_dir / "best").resolve()) if (ckpt_dir / "best").exists() else None,
            "env_steps": agent.env_steps, "wall_s": time.perf_counter() - t0, "history": hist,
            "initial_eval": hist[0] if hist else None, "final_eval": hist[-1] if hist else None}
