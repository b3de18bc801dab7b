"""``stage=finetune``: ReinFlow PPO from a pretrained checkpoint, with TensorBoard, checkpoints and resume.

Checkpoints hold the fine-tuned policy (``model.safetensors``; no ``policy_ema`` extra, so loading picks the
fine-tuned weights), the noise network, and ``agent.state_dict()`` plus the evaluation history as training
state. Re-running the same command in the same run directory resumes from ``checkpoints/last`` (or the newest
intact checkpoint) at the iteration where it stopped and prints ``resuming from <dir> (step N)``; ``resume=false``
deletes the run's checkpoints and starts fresh. The run directory is locked while the stage runs.

Every source of randomness is seeded from ``stage.seed`` (torch's global RNG, which initializes the critic and
the noise network, NumPy, the envs), so two fresh runs with the same seed give identical weights. Ctrl-C finishes
the current iteration, saves once and raises :class:`TrainingInterrupted` (``stopped at step N; saved <dir>``,
N = iterations); resuming from there gives the same weights as not stopping.

Under ``torchrun`` each process steps ``num_envs / N`` of the training envs (env seeds as in one process) and
the update and the evaluation are data-parallel (see :class:`agents.finetune.ReinFlowPPO`); rank 0 alone logs,
holds the run lock and writes checkpoints, and every process resumes from the checkpoint rank 0 opened.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from envs.factory import make_vec_env

from . import distributed
from .checkpoint import (
    RunLock,
    StopOnInterrupt,
    TrainingInterrupted,
    atomic_write_json,
    load_checkpoint,
    open_checkpoints,
    read_json,
    save_checkpoint,
    seed_everything,
    tag_checkpoint,
)
from .config_schema import RUNNER_KEYS
from .finetune import FinetuneConfig, ReinFlowPPO
from .policies import extra_modules, policy_config, policy_from_checkpoint
from .tblog import Logger


def run_finetune_stage(cfg: DictConfig, run_dir: str | Path, checkpoint: str, stage_cfg) -> dict[str, Any]:
    run_dir = Path(run_dir)
    s = OmegaConf.to_container(stage_cfg, resolve=True) if isinstance(stage_cfg, DictConfig) else dict(stage_cfg)
    total = int(s.get("total_env_steps", 200_000))
    save_every = int(s.get("save_every", 10))
    if total < 1:
        raise ValueError(f"finetune total_env_steps must be >= 1, got {total}")
    fcfg = FinetuneConfig.from_dict({k: v for k, v in s.items() if k not in RUNNER_KEYS})
    world = distributed.info().world_size
    for key in ("num_envs", "eval_num_envs"):
        if getattr(fcfg, key) % world:
            raise ValueError(f"finetune {key}={getattr(fcfg, key)} must be divisible by the number of processes "
                             f"({world})")
    if not distributed.info().is_main:
        return _run(cfg, run_dir, checkpoint, fcfg, total, save_every)
    with RunLock(run_dir):
        return _run(cfg, run_dir, checkpoint, fcfg, total, save_every)


def _run(cfg, run_dir: Path, checkpoint: str, fcfg: FinetuneConfig, total: int, save_every: int) -> dict[str, Any]:
    ckpt_dir = run_dir / "checkpoints"
    seed_everything(fcfg.seed)  # before anything draws: the critic and noise network initialize from it
    policy, ck = policy_from_checkpoint(checkpoint, device=fcfg.device)
    if policy.kind not in ("reflow", "shortcut", "gaussian"):
        raise ValueError(f"{checkpoint}: cannot fine-tune a {policy.kind!r} policy")
    env_name = ck["env_meta"].get("name") or cfg.task.env
    max_steps = cfg.task.get("max_episode_steps")
    d = distributed.info()
    env_kw = fcfg.train_env_kwargs()
    if env_kw and not ck["env_meta"].get("has_success"):
        raise ValueError(f"finetune terminate_on_success / success_reward need an env with a success signal "
                         f"(Meta-World, robosuite); {env_name} has none")
    envs = make_vec_env(env_name, fcfg.num_envs // d.world_size, seed=fcfg.seed, asynchronous=fcfg.async_envs,
                        obs_horizon=policy.obs_horizon,
                        action_horizon=policy.exec_horizon, max_episode_steps=max_steps, **env_kw)
    eval_envs = make_vec_env(env_name, fcfg.eval_num_envs // d.world_size, seed=fcfg.eval_seed,
                             obs_horizon=policy.obs_horizon, action_horizon=policy.exec_horizon,
                             max_episode_steps=max_steps)  # data-parallel: each process runs its share
    try:
        return _train(cfg, run_dir, ckpt_dir, ck, fcfg, total, save_every, ReinFlowPPO(policy, envs, eval_envs, fcfg))
    finally:
        envs.close()
        eval_envs.close()


def _train(cfg, run_dir: Path, ckpt_dir: Path, ck: dict, fcfg: FinetuneConfig, total: int, save_every: int,
           agent: ReinFlowPPO) -> dict[str, Any]:
    spec = dict(ck["config"]["policy"])
    if agent.policy.kind != "gaussian":
        spec["default_steps"] = fcfg.denoise_steps
        spec["init_noise_scale"] = fcfg.init_noise_scale  # evaluated from the initial noise it was tuned with
    has_success = bool(ck["env_meta"].get("has_success"))
    state: dict[str, Any] = {"best": -math.inf, "history": [], "saved": None}  # saved: (iteration, dir)
    main = distributed.info().is_main
    last = open_checkpoints(ckpt_dir, resume=bool(cfg.get("resume", True))) if main else None
    path = distributed.broadcast_object(None if last is None else str(last["path"]))
    if last is None and path is not None:  # the other processes resume from what rank 0 opened
        last = load_checkpoint(path)
    if last is not None:
        ts = last["training_state"]
        agent.load_state_dict(ts["agent"])
        state["best"] = float(ts["best"])
        state["history"] = ts["history"] if "history" in ts else read_json(run_dir / "history.json", default=[])
        state["saved"] = (agent.iteration, Path(last["path"]))

    def save(tags) -> Path:
        """Save this iteration (once: a second call only adds tags; the state has not changed)."""
        if state["saved"] is not None and state["saved"][0] == agent.iteration and state["saved"][1].is_dir():
            return tag_checkpoint(state["saved"][1], tuple(tags))
        extras = {**extra_modules(agent.policy)}
        if hasattr(agent.actor, "noise_net"):
            extras["noise_net"] = agent.actor.noise_net
        cfg_out = {**policy_config(agent.policy, spec), "stage": "finetune", "pretrained_from": str(ck["path"]),
                   "finetune": fcfg.to_dict(), "total_env_steps": total}
        path = save_checkpoint(ckpt_dir, agent.iteration, cfg_out, agent.policy, ck["env_meta"],
                               {"agent": agent.state_dict(), "best": state["best"], "history": state["history"]},
                               extras, tags=tags)
        state["saved"] = (agent.iteration, path)
        atomic_write_json(run_dir / "history.json", state["history"], indent=1)
        return path

    logger = Logger(run_dir / "tb" if cfg.logger.name != "none" and main else None)
    t0 = time.perf_counter()
    stop = StopOnInterrupt("fine-tuning")

    def callback(agent_, metrics):
        if not main:  # rank 0 logs, evaluates and saves; a Ctrl-C here still stops every process
            return not stop.requested
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
        return not stop.requested  # Ctrl-C: stop here, at an iteration boundary

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with stop:
            try:
                agent.learn(total, callback=callback, progress=bool(cfg.get("progress", True)) and main)
            except FloatingPointError as err:
                saved = state.get("saved")
                where = (f"the last checkpoint saved and verified is {saved[1]} (iteration {saved[0]})" if saved
                         else f"no checkpoint was saved in this run; resume from {ckpt_dir}/last if any")
                raise FloatingPointError(f"{err}; {where}") from err
        if distributed.any_rank(stop.requested):
            if agent.iteration == 0:
                raise TrainingInterrupted("stopped at step 0; nothing saved (no iteration had finished)")
            if not main:
                raise TrainingInterrupted(f"stopped at step {agent.iteration}; rank 0 saved the checkpoint")
            path = save(("last",))
            raise TrainingInterrupted(f"stopped at step {agent.iteration}; saved {path}")
        if agent.iteration > 0 and main:
            save(("last",))
    finally:
        logger.close()
    hist = state["history"]
    return {"checkpoint": str((ckpt_dir / "last").resolve()),
            "best": str((ckpt_dir / "best").resolve()) if (ckpt_dir / "best").exists() else None,
            "env_steps": agent.env_steps, "wall_s": time.perf_counter() - t0, "history": hist,
            "initial_eval": hist[0] if hist else None, "final_eval": hist[-1] if hist else None}
