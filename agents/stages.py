"""The stages that ``train.py`` runs, as plain functions of a composed config and a run directory.

pretrain: collect demos if missing, behavior cloning, evaluation at the task's K list.
eval:     evaluate ``checkpoint=...`` at ``stage.denoise_steps``; JSON + Markdown + videos.
finetune: ReinFlow PPO from ``checkpoint=...`` (a pretrained flow policy).
pipeline: pretrain -> eval -> finetune -> eval, the embedded default job.
reflow:   2-rectified flow + 1-step distillation of a pretrained ReFlow policy.
align:    Flow-DPO / Flow-RWR / SFT-on-winners from ``checkpoint=...`` (policies or image generators).
image:    image generation with the same flow core (agents.images).

This module checks the config and dispatches; the runners of single stages (pretrain, eval, finetune, reflow)
live in :mod:`agents.stage_runners` and are re-exported here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from envs.collect import DEFAULT_EXPERT_STEPS, check_collect_settings

from . import distributed
from .checkpoint import RunLock, TrainingInterrupted, atomic_write_json, atomic_write_text
from .errors import UserError, check_top_level
from .policies import policy_from_checkpoint
from .pretrain import PretrainConfig, Pretrainer
from .prior_run import check_prior_run
from .renamed import hint, unknown_with_hints
from .stage_checks import check_checkpoint_fit, check_run_dir, check_stage_settings
from .stage_runners import (  # noqa: F401 - agents.stages API
    EvalTarget,
    _plain,
    eval_target,
    finetune_table,
    pretrain_config,
    run_eval,
    run_finetune,
    run_pretrain,
    run_reflow,
)
from .tasks import TaskData, _env_meta_for, demos_for, note, resolve_task  # noqa: F401 - agents.stages API
from .tblog import import_wandb, start_wandb

STAGES = ("pipeline", "pretrain", "finetune", "eval", "align", "image", "reflow")
CHECKPOINT_STAGES = ("eval", "finetune", "align", "reflow")
DEMO_KEYS = ("noise", "seed", "quality", "expert_steps", "min_expert_return")


def validate_config(cfg: DictConfig) -> None:
    """Clear errors (UserError) for invalid values and budgets before anything runs."""
    if cfg.stage.name not in STAGES:
        raise UserError(f"unknown stage {cfg.stage.name!r}; choose from {STAGES}")
    check_top_level(cfg)
    kind = cfg.task.get("kind", "policy")
    if cfg.stage.name == "image" and kind != "image":
        raise UserError(f"stage=image needs an image task such as task=digits (task={cfg.task.name} is a {kind} "
                        "task: train it with stage=pretrain or the default pipeline)")
    if kind == "image" and cfg.stage.name not in ("image", "align"):
        raise UserError(f"task={cfg.task.name} is an image task: use stage=image (stage={cfg.stage.name} needs a "
                        "policy task such as task=pick_place)")
    dev = str(cfg.get("device", "cpu"))
    if dev.startswith("cuda") and not torch.cuda.is_available():
        why = ("this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible")
        raise UserError(f"device={dev} but {why} (torch {torch.__version__}); use device=cpu, or install a CUDA "
                        "build of torch on a machine with a GPU")
    if dev not in ("cpu",) and not dev.startswith(("cuda", "mps")):
        raise UserError(f"device={dev!r} is not a torch device; use device=cpu or device=cuda")
    task = cfg.task
    if task.get("kind", "policy") == "policy":
        if OmegaConf.is_missing(task, "env"):
            raise UserError(f"task={task.name} needs task.env=<env>, e.g. "
                            + ("metaworld/door-open-v3" if task.name == "metaworld" else "HalfCheetah-v5"))
        if task.get("demos") is not None and OmegaConf.is_missing(task.demos, "path"):
            raise UserError(f"task={task.name} needs task.demos.path=<robomimic low-dim HDF5 file>")
        for key in ("obs_horizon", "action_horizon"):
            if int(task[key]) < 1:
                raise UserError(f"task.{key} must be >= 1, got {task[key]}")
        ex = task.get("exec_horizon")
        if ex is not None and not 1 <= int(ex) <= int(task.action_horizon):
            raise UserError(f"task.exec_horizon must be in [1, task.action_horizon={task.action_horizon}], got {ex}")
        if "steps" in task.eval and "denoise_steps" not in task.eval:
            raise UserError(f"task={task.name}: task.eval.steps{hint('steps', 'task.eval')}")
        steps = task.eval.denoise_steps
        if any(int(k) < 1 for k in steps):
            raise UserError(f"task.eval.denoise_steps must be positive, got {list(steps)}")
        for key in ("episodes", "num_envs"):
            if int(task.eval[key]) < 1:
                raise UserError(f"task.eval.{key} must be >= 1, got {task.eval[key]}")
        if cfg.policy.kind == "shortcut":
            from flowpolicy.policy import is_power_of_two

            bad = [int(k) for k in steps if not is_power_of_two(int(k))]
            if bad:
                raise UserError(f"shortcut policies sample with power-of-two K; task.eval.denoise_steps has {bad}")
        if task.get("max_episode_steps") is not None and int(task.max_episode_steps) < 1:
            raise UserError(f"task.max_episode_steps must be >= 1, got {task.max_episode_steps}")
        d = task.get("demos")
        if d is not None and not d.get("path"):  # the settings of the demos to collect (before an expert trains)
            names = {"num_demos": "task.demos.num", **{k: f"task.demos.{k}" for k in DEMO_KEYS}}
            try:
                check_collect_settings(d.num, d.get("noise"), d.get("seed", 0), d.get("quality", "expert"),
                                       d.get("expert_steps") or DEFAULT_EXPERT_STEPS,
                                       min_expert_return=d.get("min_expert_return"), names=names)
            except ValueError as err:
                raise UserError(str(err)) from err
    if cfg.get("logger") is not None and cfg.logger.get("name") == "wandb":
        try:
            import_wandb()
        except ImportError as err:
            raise UserError(str(err)) from err
    name = cfg.stage.name
    if name in CHECKPOINT_STAGES and not cfg.get("checkpoint"):
        raise UserError(f"stage={name} needs checkpoint=<checkpoint dir or run dir>")
    if name not in CHECKPOINT_STAGES and cfg.get("checkpoint") and int(os.environ.get("RANK", "0")) == 0:
        note(f"stage={name} trains from scratch and does not read checkpoint={cfg.checkpoint} (it is ignored; "
             f"the stages that start from a checkpoint: {', '.join(CHECKPOINT_STAGES)})")
    if name == "eval":  # its own episodes, num_envs, videos and seed (defaults: task.eval's and 100000)
        s = cfg.stage
        if any(int(k) < 1 for k in s.get("denoise_steps") or []):
            raise UserError(f"stage.denoise_steps must be positive, got {list(s.denoise_steps)}")
        for key, least in (("episodes", 1), ("num_envs", 1), ("videos", 0)):
            if s.get(key) is None or int(s[key]) < least:
                raise UserError(f"stage.{key} must be >= {least}, got {s.get(key)}")
    # budgets: checked here so that a bad fine-tuning budget fails before pretraining runs
    if name in ("pretrain", "pipeline"):
        s = _plain(cfg.stage.pretrain if name == "pipeline" else cfg.stage)
        s.pop("name", None)
        prefix = "stage.pretrain" if name == "pipeline" else "stage"
        try:
            PretrainConfig(dataset="", env_name="", run_dir="", policy=_plain(cfg.policy), **s).validate()
        except TypeError as err:
            raise UserError(f"{prefix}: {err}") from err
        except ValueError as err:
            raise UserError(f"{str(err).replace('pretrain.', prefix + '.')}") from err
    for key in ("grad_clip", "image.grad_clip") if name in ("image", "reflow", "align") else ():
        g = OmegaConf.select(cfg.stage, key, default=None)  # pretrain's: PretrainConfig.validate above
        if g is not None and not float(g) >= 0:  # a negative max-norm would flip the gradients
            raise UserError(f"stage.{key} must be >= 0 (the max gradient norm; 0: no clipping), got {g}")
    if task.get("finetune") is not None:  # a task file's fine-tuning defaults: only settings that exist
        from .config_schema import task_choosable, unknown_task_keys

        bad = unknown_task_keys(task.finetune, "finetune")
        if bad:
            raise UserError(f"task={task.name}: task.finetune has unknown settings "
                            f"{unknown_with_hints(bad, 'task.finetune')} (not fields of "
                            "agents.finetune_config.FinetuneConfig; see configs/stage/finetune.yaml)")
        ignored = sorted(set(task.finetune) - task_choosable("finetune"))
        if ignored:
            raise UserError(f"task={task.name}: task.finetune sets {ignored}, which configs/stage/finetune.yaml "
                            "does not take from the task (set them with stage.X=..., or forward them there)")
    ft = None
    if name == "finetune":
        ft, prefix = cfg.stage, "stage"
    elif name == "pipeline" and cfg.stage.get("finetune") is not None and cfg.stage.get("run_finetune", True):
        ft, prefix = cfg.stage.finetune, "stage.finetune"
    if ft is not None:
        for key in ("total_env_steps", "num_envs", "n_steps", "denoise_steps"):
            if ft.get(key) is not None and int(ft[key]) < 1:
                raise UserError(f"{prefix}.{key} must be >= 1, got {ft[key]}")
        from .config_schema import RUNNER_KEYS
        from .finetune import FinetuneConfig

        if name == "pipeline" and ft.get("denoise_steps") is not None:  # the policy it pretrains fine-tunes at K
            from .stage_checks import check_shortcut_steps

            check_shortcut_steps(str(cfg.policy.kind), [ft.denoise_steps], f"{prefix}.denoise_steps",
                                 "policy=shortcut trains")
        try:
            FinetuneConfig.from_dict({k: v for k, v in _plain(ft).items() if k not in RUNNER_KEYS})
        except (TypeError, ValueError) as err:
            raise UserError(f"{prefix}: {err}") from err
    check_stage_settings(cfg)  # align, reflow, image: their runners' checks, before anything is written


def _prechecks(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Everything that can fail on bad input, done before anything is written or trained: the task's data, the
    checkpoint (missing, corrupt, or not usable as the stage is set: agents.stage_checks) and what the run
    directory holds."""
    name = cfg.stage.name
    pre: dict[str, Any] = {}
    if name in ("pretrain", "pipeline"):
        pre["data"] = resolve_task(cfg)
    if name == "align" and cfg.task.get("kind", "policy") == "image":
        from .images import load_generator

        load_generator(cfg.checkpoint, "cpu")  # an image generator, not a policy
    elif name in CHECKPOINT_STAGES:  # a missing or corrupt checkpoint fails here
        policy, ck = policy_from_checkpoint(cfg.checkpoint, expect_kind="reflow" if name == "reflow" else None,
                                            device="cpu")
        if name in ("eval", "finetune"):
            pre["target"] = eval_target(cfg, cfg.checkpoint, policy, ck)
        check_checkpoint_fit(cfg, policy, ck)
    check_run_dir(cfg, run_dir)
    return pre


def _write_config(cfg: DictConfig, run_dir: Path) -> None:
    atomic_write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - not under Hydra (tests, Python API)
        return
    atomic_write_text(run_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run ``cfg.stage.name`` in ``run_dir``; returns a summary and writes ``summary.json`` there.

    Config values, budgets, demo files, checkpoints and env fit are all checked before the run directory is
    touched: a run that fails on bad input writes nothing (an existing run directory keeps its files)."""
    validate_config(cfg)
    check_prior_run(cfg, run_dir)  # another stage's or task's run there: refused before anything is written
    torch.set_num_threads(int(cfg.get("threads", 2)))
    if distributed.launched():
        return _run_distributed(cfg, Path(run_dir))
    pre = _prechecks(cfg, run_dir)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):  # one process per run directory, every stage (the trainers' own locks re-enter)
        wandb_run = start_wandb(cfg.get("logger"), run_dir, _plain(cfg))  # None unless logger=wandb
        try:
            return _run_locked(cfg, run_dir, pre)
        finally:
            if wandb_run is not None:
                wandb_run.finish()


DISTRIBUTED_STAGES = ("pretrain", "finetune", "image")


def _run_distributed(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """``torchrun --nproc_per_node=N train.py stage=pretrain|finetune|image ...`` (see agents.distributed).

    Rank 0 checks the inputs (and collects missing demos), owns the run directory, trains with the others,
    then evaluates and writes the results alone.
    """
    name = cfg.stage.name
    if name not in DISTRIBUTED_STAGES:
        raise UserError(f"stage={name} runs in one process (launch it with python train.py); under torchrun "
                        f"the data-parallel stages are: {', '.join(DISTRIBUTED_STAGES)}")
    # rank 0 may collect demos first (minutes): the others wait in init, under the collective timeout
    rank = int(os.environ.get("RANK", "0"))
    shared = None
    if rank == 0:
        pre = _prechecks(cfg, run_dir)
        dataset = demos_for(cfg, pre["data"]) if name == "pretrain" else None
        shared = (str(run_dir), dataset, pre)
    device = str(cfg.get("device", "cpu"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if name == "image" and int(cfg.stage.batch_size) % world:  # every rank stops here, before any collective
        raise UserError(f"stage.batch_size={cfg.stage.batch_size} must be divisible by the number of processes "
                        f"({world}): it is the global batch, split evenly across ranks")
    d = distributed.init(device)
    ok = False
    try:
        main_dir, dataset, pre = distributed.broadcast_object(shared)
        run_dir = Path(main_dir)  # train.py gives the other ranks a scratch directory, removed at their exit
        if d.device_differs(device):
            cfg = OmegaConf.merge(cfg, {"device": distributed.device_for(device)})

        def train() -> dict[str, Any]:
            if name == "pretrain":
                pc = pretrain_config(cfg, cfg.stage, run_dir, dataset, pre["data"])
                t0 = time.perf_counter()
                res = Pretrainer(pc).run()
                res.update(wall_s=time.perf_counter() - t0, dataset=dataset, env=pre["data"].env)
                return res
            if name == "image":
                from .images import run as run_image

                return run_image(cfg, run_dir)
            return run_finetune(cfg, run_dir, cfg.checkpoint)

        if not d.is_main:
            try:
                train()
            except TrainingInterrupted:
                ok = True  # Ctrl-C: wait in the closing barrier until rank 0 has saved, then stop
                raise
            ok = True
            return {"stage": name, "rank": d.rank, "run_dir": str(run_dir)}
        run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(run_dir):
            _write_config(cfg, run_dir)
            out: dict[str, Any] = {"stage": name, "run_dir": str(run_dir), "rank": 0}
            try:
                out[name] = {**train(), "world_size": d.world_size}
            except TrainingInterrupted:
                ok = True  # saved: meet the others in the closing barrier
                raise
            if name == "image":
                out.update(out.pop(name))  # the single-process layout: the image summary at the top level
            elif name == "pretrain":
                out["eval"] = run_eval(cfg, run_dir, out[name]["best"], label=f"{cfg.policy.kind} (BC)")
            else:
                out["finetune_table"] = {"markdown": finetune_table(out[name], pre["target"].env,
                                                                    pre["target"].has_success)}
            atomic_write_json(run_dir / "summary.json", _jsonable(out))
            ok = True
            return out
    finally:
        distributed.shutdown(wait=ok)


def _run_locked(cfg: DictConfig, run_dir: Path, pre: dict[str, Any]) -> dict[str, Any]:
    _write_config(cfg, run_dir)
    name = cfg.stage.name
    out: dict[str, Any] = {"stage": name, "run_dir": str(run_dir)}
    if name == "image":
        from .images import run as run_image

        out.update(run_image(cfg, run_dir))
    elif name == "pretrain":
        out["pretrain"] = run_pretrain(cfg, run_dir, data=pre["data"])
        out["eval"] = run_eval(cfg, run_dir, out["pretrain"]["best"], label=f"{cfg.policy.kind} (BC)")
    elif name == "eval":
        out["eval"] = run_eval(cfg, run_dir, cfg.checkpoint, cfg.stage.get("denoise_steps"), target=pre["target"],
                               settings=cfg.stage)
    elif name == "finetune":
        out["finetune"] = run_finetune(cfg, run_dir, cfg.checkpoint)
        out["finetune_table"] = {"markdown": finetune_table(out["finetune"], pre["target"].env,
                                                            pre["target"].has_success)}
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
        out["pretrain"] = run_pretrain(cfg, run_dir / "pretrain", cfg.stage.pretrain, data=pre["data"])
        out["eval"] = run_eval(cfg, run_dir, out["pretrain"]["best"], name="eval_pretrained",
                               label=f"{cfg.policy.kind} (BC)")
        if cfg.stage.get("finetune") is not None and cfg.stage.get("run_finetune", True):
            ft = run_finetune(cfg, run_dir / "finetune", out["pretrain"]["best"], cfg.stage.finetune)
            out["finetune"] = ft
            out["eval_finetuned"] = run_eval(cfg, run_dir, ft["checkpoint"], steps=[int(cfg.stage.finetune.denoise_steps)],
                                             name="eval_finetuned", label=f"{cfg.policy.kind} (ReinFlow)")
    atomic_write_json(run_dir / "summary.json", _jsonable(out))
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if k != "markdown"}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
