"""Alignment of flow policies with returns and preferences: Flow-DPO, Flow-RWR, and SFT on winners.

``python train.py stage=align checkpoint=<pretrained run or checkpoint> stage.method=dpo|rwr|sft``

The losses live in :mod:`flowpolicy.align`; this module builds the preference data
(:mod:`agents.align_data`, with the settings), runs the optimizer (:mod:`agents.align_train`), evaluates with
:mod:`agents.evaluate` before and after at K denoising steps, and writes the aligned checkpoint (same policy
spec; no ``policy_ema`` extra, so loading picks the aligned weights) and ``align.json``. It re-exports the
names of both modules.

Preference data (``source``):

- ``rollouts`` (default): from each of ``num_start_states`` start states (env seeds ``rollout_seed + i``, far
  from the evaluation seeds), the policy runs ``rollouts_per_state`` episodes that differ only in the flow's
  initial noise. Ranked by return, the best and the worst rollout of a state form a pair when their returns
  differ by more than ``min_return_gap`` (``pairing=all``: every ordered pair of the state). A trajectory is
  the sequence of (observation history, generated action chunk) of its policy calls.
- ``branches``: pairs from the same simulator state (:mod:`agents.align_branches`). At ``branch_points``
  states along a reference episode of each start state, the state is restored ``rollouts_per_state`` times by
  replaying the recorded actions; each copy samples its own chunk and runs on for ``branch_chunks`` chunks
  (None: to the end). The copies are ranked by their return from the branch on (or, with
  ``prefer=success``, every copy that succeeded is paired with every one that did not). Winner and loser
  chunks share their observation exactly.
- ``dataset``: the episodes of a demo file (``DemoDataset``, default: the task's demos) ranked by return; the
  k-th best is paired with the k-th worst. Chunks are the dataset's windows.
- ``labels``: pairs read from a JSON or CSV file that names episodes of the demo file (see
  :func:`read_preference_labels`).

Methods: ``dpo`` (Flow-DPO on trajectory pairs: each sample takes a chunk at the same relative position of the
winner and the loser with shared noise and time, and ``chunks_per_pair`` samples per pair are averaged inside
the sigmoid), ``rwr`` (flow matching on every chunk, weighted by exp(R / beta) of its trajectory's return R;
with rollouts a softmax within each start state), ``sft`` (plain flow matching on the winners' chunks: the
baseline Flow-DPO is compared against).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowpolicy import ShortcutFlow
from flowpolicy.policy import FlowPolicy

from .align_branches import preference_data  # noqa: F401 - agents.align API
from .align_data import (  # noqa: F401 - agents.align API
    METHODS,
    PAIRINGS,
    SOURCES,
    AlignConfig,
    Trajectory,
    collect_rollouts,
    dataset_trajectories,
    preference_pairs,
    read_preference_labels,
)
from .align_train import _Chunks, align_policy, trajectory_weights  # noqa: F401 - agents.align API
from .checkpoint import (
    StopOnInterrupt,
    TrainingInterrupted,
    atomic_write_json,
    save_checkpoint,
    seed_everything,
    stop_requested,
)
from .evaluate import evaluate_policy_steps, write_eval
from .policies import extra_modules, policy_config, policy_from_checkpoint
from .tasks import demos_for
from .tblog import Logger

# --- online rounds ------------------------------------------------------------------------------------------


def align_rounds(policy: FlowPolicy, cfg: AlignConfig, env_name: str, max_episode_steps: int | None,
                 dataset: str | None = None, logger: Logger | None = None, first: tuple | None = None,
                 on_round: Callable[[int, FlowPolicy, dict], None] | None = None
                 ) -> tuple[FlowPolicy, list[dict[str, Any]]]:
    """``cfg.rounds`` rounds of: preference data from the current policy, then alignment of that policy (its
    own frozen copy is DPO's reference in the round).

    Round r (from 0) collects on start states ``rollout_seed + r * num_start_states + i``, so no two rounds
    share a start state, and trains with seed ``seed + r``. ``first`` is round 0's (trajectories, pairs,
    description) when the caller has collected it already. ``on_round(r, policy, record)`` runs after every
    round (r from 1). Returns the last policy and one record per round: its data description, the training
    info and the loss history. A round stopped by Ctrl-C ends the loop (its record has ``stopped_at``; a
    Ctrl-C between rounds marks the last finished round so). A later round whose policy gives no pair for
    dpo/sft ends the loop before training: the last record says so under ``ended``. Scalars of round r are
    logged at steps ``r * grad_steps + i``.
    """
    current, records = policy, []
    for r in range(int(cfg.rounds)):
        rcfg = dataclasses.replace(cfg, rollout_seed=cfg.rollout_seed + r * cfg.num_start_states, seed=cfg.seed + r)
        if r == 0 and first is not None:
            trajs, pairs, desc = first
        else:
            if r > 0 and stop_requested():  # Ctrl-C between rounds: the stage saves the earlier rounds' policy
                records[-1]["stopped_at"] = int(cfg.grad_steps)
                break
            trajs, pairs, desc = preference_data(current, rcfg, env_name, max_episode_steps, dataset)
            if r > 0 and not pairs and cfg.method in ("dpo", "sft"):
                # every copy of the current policy agreed (e.g. all succeeded): no pair left to learn from
                records[-1]["ended"] = f"round {r + 1} found no preference pairs ({desc})"
                print(f"align: round {r + 1} found no preference pairs; the policy of round {r} is the result")
                break
        current, info = align_policy(current, trajs, pairs, rcfg, logger, step_offset=r * int(cfg.grad_steps))
        records.append({"round": r + 1, "preference_data": desc, **info})
        if on_round is not None:
            on_round(r + 1, current, records[-1])
        if "stopped_at" in info:
            break
    return current, records


# --- the stage ----------------------------------------------------------------------------------------------


def evaluate(policy: FlowPolicy, env_name: str, cfg: AlignConfig, max_episode_steps: int | None,
             label: str) -> list[dict[str, Any]]:
    """Deterministic evaluation at ``cfg.eval_denoise_steps`` (default [denoise_steps]) with agents.evaluate."""
    ks = cfg.eval_denoise_steps or [cfg.denoise_steps or policy.default_steps]
    return evaluate_policy_steps(policy, env_name, ks, episodes=cfg.eval_episodes, num_envs=cfg.eval_num_envs,
                                 seed=cfg.eval_seed, max_episode_steps=max_episode_steps, label=label)


def align_config(cfg) -> AlignConfig:
    """The checked settings of ``stage=align`` on a policy task (``stage`` less ``name`` and the image block;
    ``device`` and ``progress`` default to the top level's). A bad value raises ValueError naming it."""
    from omegaconf import DictConfig, OmegaConf

    stage = cfg.stage
    s = OmegaConf.to_container(stage, resolve=True) if isinstance(stage, DictConfig) else dict(stage)
    for key in ("name", "image"):
        s.pop(key, None)
    s.setdefault("device", cfg.get("device", "cpu"))
    s.setdefault("progress", bool(cfg.get("progress", True)))
    acfg = AlignConfig.from_dict(s)
    acfg.validate()
    return acfg


def check_alignable(policy, acfg: AlignConfig, checkpoint) -> None:
    """ValueError when ``acfg.method`` cannot align the policy of ``checkpoint`` (checked before any rollout)."""
    if not isinstance(policy, FlowPolicy):
        raise ValueError(f"{checkpoint}: alignment needs a flow policy (reflow or shortcut), got "
                         f"{policy.kind!r}")
    if acfg.method == "dpo" and isinstance(policy.flow, ShortcutFlow):
        raise ValueError(f"{checkpoint}: Flow-DPO trains the flow-matching velocity; a shortcut policy's "
                         "few-step jumps would not follow it. Align a reflow policy, or use method=rwr|sft")


def run_align_stage(cfg, run_dir: str | Path, checkpoint: str) -> dict[str, Any]:
    """``stage=align``: preference data, evaluation before, alignment, evaluation after, checkpoint, JSON.

    Image tasks (``task.kind=image``) go to :func:`agents.images.align.run_image_align` with a generator
    checkpoint. Returns a summary and writes ``align.json``, ``eval_before.*`` and ``eval_after.*`` in
    ``run_dir`` and the aligned checkpoint under ``run_dir/checkpoints``.
    """
    if cfg.task.get("kind", "policy") == "image":
        from .images.align import run_image_align

        return run_image_align(cfg, run_dir, checkpoint)
    acfg = align_config(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    seed_everything(acfg.seed)
    policy, ck = policy_from_checkpoint(checkpoint, device=acfg.device)
    check_alignable(policy, acfg, checkpoint)
    env_name = ck["env_meta"].get("name") or cfg.task.env
    max_steps = cfg.task.get("max_episode_steps")
    dataset = acfg.dataset
    if acfg.source != "rollouts" and not dataset:
        dataset = demos_for(cfg)
    trajs, pairs, data_desc = preference_data(policy, acfg, env_name, max_steps, dataset)
    evaluated = acfg.eval_episodes > 0
    before = evaluate(policy, env_name, acfg, max_steps, f"{policy.kind} (before)") if evaluated else []
    logger = Logger(run_dir / "tb" if cfg.get("logger", {}).get("name", "none") != "none" else None)
    try:
        t0 = time.perf_counter()
        with StopOnInterrupt("alignment"):
            aligned, records = align_rounds(policy, acfg, env_name, max_steps, dataset, logger,
                                            first=(trajs, pairs, data_desc))
        info = records[-1]
        steps_done = acfg.grad_steps * (len(records) - 1) + info.get("stopped_at", acfg.grad_steps)
        train_s = time.perf_counter() - t0
    finally:
        logger.close()
    spec = dict(ck["config"]["policy"])
    if acfg.denoise_steps:  # the aligned policy acts with the K it was aligned and evaluated at
        spec["default_steps"] = aligned.default_steps = int(acfg.denoise_steps)
    cfg_out = {**policy_config(aligned, spec), "stage": "align", "aligned_from": str(ck["path"]),
               "align": acfg.to_dict(), "preference_data": data_desc}
    if acfg.rounds > 1:
        cfg_out["preference_data_rounds"] = [rec["preference_data"] for rec in records]
    if "stopped_at" in info:  # Ctrl-C: save the policy as aligned so far, once, and stop
        n = steps_done
        path = save_checkpoint(run_dir / "checkpoints", n, {**cfg_out, "stopped_at_step": n}, aligned,
                               ck["env_meta"], {"step": n}, extra_modules(aligned), tags=("last",))
        atomic_write_json(run_dir / "align_history.json", _history(records), indent=None)
        raise TrainingInterrupted(f"stopped at step {n}; saved {path}")
    label = f"{policy.kind} ({acfg.method})"
    after = evaluate(aligned, env_name, acfg, max_steps, label) if evaluated else []
    path = save_checkpoint(run_dir / "checkpoints", steps_done, cfg_out, aligned, ck["env_meta"],
                           {"step": steps_done}, extra_modules(aligned), tags=("last",))
    md = []
    if before:
        md.append(write_eval(before, run_dir, "eval_before"))
        md.append(write_eval(after, run_dir, "eval_after"))
    summary = {"method": acfg.method, "checkpoint": str(path), "pretrained": str(ck["path"]), "env": env_name,
               "preference_data": data_desc,
               "train": {k: v for k, v in info.items() if k not in ("history", "preference_data", "round")},
               "rounds": [{k: v for k, v in rec.items() if k != "history"} for rec in records],
               "train_s": train_s, "eval_before": before, "eval_after": after,
               "wall_s": time.perf_counter() - t_start, "config": acfg.to_dict()}
    atomic_write_json(run_dir / "align.json", summary, default=str)
    atomic_write_json(run_dir / "align_history.json", _history(records), indent=None)
    summary["markdown"] = "\n\n".join(md)
    return summary


def _history(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The loss histories of all rounds, one list; each record says its round (a single round: as before)."""
    if len(records) == 1:
        return records[0]["history"]
    return [{"round": rec["round"], **h} for rec in records for h in rec["history"]]
