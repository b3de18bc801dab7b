"""Behavior-cloning pretraining of flow (ReFlow, Shortcut) and Gaussian policies on a robomimic HDF5 file.

``Pretrainer(cfg).run()``: AdamW with cosine decay, EMA weights for evaluation, validation loss, periodic
rollout evaluation at the policy's default K, tqdm progress, TensorBoard scalars (``train/loss``, ``train/lr``,
``val/loss``, ``eval/return_mean``, ``eval/success_rate``), checkpoints ``last`` and ``best`` (by success rate,
else return) with the full training state for exact resume. The run directory is locked while the trainer
lives (:class:`agents.checkpoint.RunLock`); a re-run resumes from ``last`` (or the newest intact checkpoint)
and prints ``resuming from <dir> (step N)``. A non-finite loss stops training with an error naming the step
and the last verified checkpoint; Ctrl-C finishes the step, saves once and raises :class:`TrainingInterrupted`
(``stopped at step N; saved <dir>``).

Under ``torchrun`` (see :mod:`agents.distributed`) the trainer is data-parallel: every rank draws the same
global batch of ``batch_size`` windows and the same noise, keeps its ``batch_size / world_size`` rows, and
DistributedDataParallel averages the gradients, so N ranks make the update one process makes with the whole
batch. Rank 0 alone validates, evaluates, logs, shows progress, holds the run lock and writes checkpoints;
every rank resumes from the checkpoint rank 0 opened.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.dataset import DemoDataset
from envs.hdf5 import read_meta
from flowpolicy import EMA
from flowpolicy import rng as frng
from flowpolicy.policy import BasePolicy

from . import distributed
from .checkpoint import (
    RunLock,
    StopOnInterrupt,
    TrainingInterrupted,
    load_checkpoint,
    open_checkpoints,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    tag_checkpoint,
)
from .errors import check_at_least, check_positive
from .evaluate import rollout_episodes
from .loop import (
    Callback,
    EMAUpdate,
    LogScalars,
    NonFiniteGuard,
    Periodic,
    ProgressBar,
    ShortcutTarget,
    Step,
    StopOnCtrlC,
    SupervisedLoop,
    every,
)
from .policies import build_policy, extra_modules, policy_config, stats_pair, validate_spec
from .tblog import Logger


@dataclass
class PretrainSettings:
    """The settings a user tunes (``stage=pretrain``; the schema of ``configs/stage/pretrain.yaml``)."""

    grad_steps: int = 3000  # gradient steps
    batch_size: int = 256  # the global batch (split evenly across torchrun processes)
    lr: float = 1e-3  # AdamW, cosine decay
    weight_decay: float = 1e-6
    grad_clip: float = 1.0  # max gradient norm (0: no clipping)
    ema_decay: float = 0.995  # EMA of the weights; evaluation and checkpoints use the EMA policy
    val_every: int = 500  # steps between validation losses
    eval_every: int = 1500  # steps between rollout evaluations (0: never)
    eval_episodes: int = 10
    eval_num_envs: int = 4
    save_every: int = 500  # steps between checkpoints
    resume: bool = True  # False: delete the run's checkpoints and start fresh (True: resume when there are any)


@dataclass(kw_only=True)
class PretrainConfig(PretrainSettings):
    """Everything pretraining needs: the settings plus what the task and the run decide. ``policy`` is the
    policy spec (see agents.policies)."""

    dataset: str
    env_name: str
    run_dir: str
    policy: dict = field(default_factory=lambda: {"kind": "reflow"})
    obs_horizon: int = 1
    action_horizon: int = 4
    exec_horizon: int | None = None
    max_episode_steps: int | None = None
    obs_keys: list[str] | None = None  # obs/<key> arrays of the demo file, in order (None: all low-dim, sorted)
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    tensorboard: bool = True

    def validate(self) -> None:
        check_at_least({name: getattr(self, name) for name in ("grad_steps", "batch_size", "obs_horizon",
                        "action_horizon", "val_every", "save_every")}, 1, "pretrain.")
        if self.eval_every < 0 or self.eval_episodes < 0:
            raise ValueError("pretrain.eval_every and eval_episodes must be >= 0")
        check_positive({"lr": self.lr}, "pretrain.")
        if not self.grad_clip >= 0:  # a negative max-norm flips the gradients
            raise ValueError(f"pretrain.grad_clip must be >= 0 (the max gradient norm; 0: no clipping), got "
                             f"{self.grad_clip}")
        if self.exec_horizon is not None and not 1 <= self.exec_horizon <= self.action_horizon:
            raise ValueError(f"exec_horizon must be in [1, action_horizon={self.action_horizon}], got "
                             f"{self.exec_horizon}")
        validate_spec(self.policy)


__all__ = ["PretrainConfig", "PretrainSettings", "Pretrainer", "TrainingInterrupted"]


class _Loss(torch.nn.Module):
    """The policy's loss as a module's forward, so that DistributedDataParallel can wrap it."""

    def __init__(self, policy: BasePolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, batch, generator=None):
        return self.policy.loss(batch, generator=generator)


class Pretrainer:
    def __init__(self, cfg: PretrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.dist = distributed.info()
        if cfg.batch_size % self.dist.world_size:
            raise ValueError(f"pretrain.batch_size={cfg.batch_size} must be divisible by the number of processes "
                             f"({self.dist.world_size}): it is the global batch, split evenly across ranks")
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        seed_everything(cfg.seed)
        self.train_ds = DemoDataset(cfg.dataset, cfg.obs_horizon, cfg.action_horizon, filter_key="train",
                                    split_seed=cfg.seed, obs_keys=cfg.obs_keys)
        try:
            self.valid_ds = DemoDataset(cfg.dataset, cfg.obs_horizon, cfg.action_horizon, filter_key="valid",
                                        split_seed=cfg.seed, obs_keys=cfg.obs_keys)
        except Exception:  # noqa: BLE001 - a file without validation demos still trains
            self.valid_ds = None
        meta = read_meta(cfg.dataset)
        self.env_meta = meta.get("env", {"name": cfg.env_name})
        self._check_dims()
        stats = self.train_ds.stats()
        self.policy: BasePolicy = build_policy(
            cfg.policy, self.train_ds.obs_dim, self.train_ds.act_dim, cfg.obs_horizon, cfg.action_horizon,
            cfg.exec_horizon, stats_pair(stats["obs"]), stats_pair(stats["action"])).to(cfg.device)
        self.ema = EMA(self.policy, decay=cfg.ema_decay)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.grad_steps) / cfg.grad_steps)))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.best = -math.inf
        self._stop_now = False  # Ctrl-C seen (on any rank) during the current step
        self.verified: Path | None = None  # the newest checkpoint written (hashed) or loaded (verified)
        self._saved_step: int | None = None  # step of self.verified
        self._tensors = _materialize(self.train_ds)
        self._valid = _materialize(self.valid_ds) if self.valid_ds is not None and len(self.valid_ds) else None
        # the run lock: rank 0 only (released at the end of run(), or when garbage collected)
        self._lock = RunLock(self.run_dir).acquire() if self.dist.is_main else None
        try:
            ck = None
            if self.dist.is_main:
                ck = open_checkpoints(self.ckpt_dir, resume=cfg.resume, expect_kind=cfg.policy["kind"])
            path = distributed.broadcast_object(None if ck is None else str(ck["path"]))
            if ck is None and path is not None:  # the other ranks load what rank 0 opened
                ck = load_checkpoint(path, expect_kind=cfg.policy["kind"])
            if ck is not None:
                self._restore(ck)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        self._loss = _Loss(self.policy)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            dev = torch.device(cfg.device)
            self._loss = DistributedDataParallel(self._loss, device_ids=[dev.index] if dev.type == "cuda" else None)

    def _check_dims(self) -> None:
        """The dataset must fit the environment the policy will act in (checked against the real env)."""
        from envs.factory import env_meta

        env = env_meta(self.cfg.env_name)
        for key, got in (("obs_dim", self.train_ds.obs_dim), ("act_dim", self.train_ds.act_dim)):
            if int(env[key]) != got:
                raise ValueError(f"{self.cfg.dataset}: dataset {key}={got} but env {self.cfg.env_name} has "
                                 f"{env[key]}; the dataset was made for {self.env_meta.get('name', 'another env')}")
        if self.env_meta.get("name") != env["name"] or "obs_dim" not in self.env_meta:  # files of other tools
            self.env_meta = env

    # --- checkpoints -------------------------------------------------------------------------------------
    def training_state(self) -> dict[str, Any]:
        return {"step": self.step, "best": self.best, "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "ema_updates": self.ema.num_updates,
                "generator": self.gen.get_state(), "rng": rng_state(),
                "shortcut_ema_updates": getattr(getattr(self.policy, "flow", None), "ema", self.ema).num_updates}

    def save(self, tags=("last",)) -> Path:
        """Save this step (or only add ``tags`` when this step is already saved: the state is the same)."""
        if self._saved_step == self.step and self.verified is not None and self.verified.is_dir():
            return tag_checkpoint(self.verified, tuple(tags))
        cfg = {**policy_config(self.policy, self.cfg.policy), "stage": "pretrain",
               "train": dataclasses.asdict(self.cfg)}
        extras = {"policy_ema": self.ema.model, **extra_modules(self.policy)}
        self.verified = save_checkpoint(self.ckpt_dir, self.step, cfg, self.policy, self.env_meta,
                                        self.training_state(), extras, tags=tags)
        self._saved_step = self.step
        return self.verified

    def load(self, path) -> None:
        """Restore the full training state from a checkpoint (a run directory falls back past a broken last)."""
        self._restore(load_checkpoint(path, expect_kind=self.cfg.policy["kind"]))

    def _restore(self, ck: dict[str, Any]) -> None:
        self.policy.load_state_dict(ck["model"])
        self.ema.model.load_state_dict(ck["extras"]["policy_ema"])
        ts = ck["training_state"]
        if "shortcut_ema" in ck["extras"]:
            self.policy.flow.ema.model.load_state_dict(ck["extras"]["shortcut_ema"])
            self.policy.flow.ema.num_updates = int(ts["shortcut_ema_updates"])
        self.step, self.best = int(ts["step"]), float(ts["best"])
        self.opt.load_state_dict(ts["optimizer"])
        self.sched.load_state_dict(ts["scheduler"])
        self.ema.num_updates = int(ts["ema_updates"])
        self.gen.set_state(ts["generator"])
        set_rng_state(ts["rng"])
        self.verified, self._saved_step = Path(ck["path"]), self.step

    def _last_good(self) -> str:
        if self.verified is None:
            return "no checkpoint has been saved yet"
        return f"the last verified checkpoint is {self.verified} (step {self._saved_step})"

    # --- training ----------------------------------------------------------------------------------------
    def _batch(self) -> dict[str, torch.Tensor]:
        """This rank's rows of the global batch (every rank draws the same ``batch_size`` indices)."""
        idx = torch.randint(0, self._tensors["obs"].shape[0], (self.cfg.batch_size,), generator=self.gen)
        start, stop = distributed.shard_range(self.cfg.batch_size)
        idx = idx[start:stop]
        return {k: v[idx].to(self.cfg.device) for k, v in self._tensors.items()}

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        if self._valid is None:
            return None
        g = torch.Generator().manual_seed(12345)  # fixed noise so the curve is comparable across steps
        n = self._valid["obs"].shape[0]
        losses = []
        for i in range(0, n, 1024):
            batch = {k: v[i:i + 1024].to(self.cfg.device) for k, v in self._valid.items()}
            loss, _ = self.ema.model.loss(batch, generator=g)
            losses.append(float(loss) * batch["obs"].shape[0])
        return sum(losses) / n

    def evaluate(self) -> dict[str, float]:
        r = rollout_episodes(self.ema.model, self.cfg.env_name, self.cfg.eval_episodes, None,
                             self.cfg.eval_num_envs, seed=10_000 + self.step,
                             max_episode_steps=self.cfg.max_episode_steps)
        return {"eval/return_mean": float(np.mean(r["returns"])), "eval/success_rate": float(np.mean(r["successes"])),
                "eval/length_mean": float(np.mean(r["lengths"]))}

    def _loss_fn(self, index: int) -> tuple[torch.Tensor, dict]:
        self.policy.train()
        with frng.shard(self.dist.rank, self.dist.world_size):
            return self._loss(self._batch(), generator=self.gen)

    def _sync(self, stop: StopOnInterrupt) -> Callback:
        """Reads Ctrl-C once per step; under DDP also the global mean loss and "any rank saw Ctrl-C", in one
        all-reduce."""
        trainer = self

        class Sync(Callback):
            def on_loss(self, s: Step) -> None:
                trainer._stop_now = stop.requested
                if trainer.dist.enabled:
                    red = distributed.all_reduce_sum(
                        torch.stack([s.loss.detach().float().cpu(), torch.tensor(float(trainer._stop_now))]))
                    s.value, trainer._stop_now = red[0] / trainer.dist.world_size, bool(red[1] > 0)

            def on_step_end(self, s: Step) -> None:
                trainer.step = s.done

        return Sync()

    def _callbacks(self, stop: StopOnInterrupt, logger: Logger, metrics: dict) -> list[Callback]:
        cfg, main = self.cfg, self.dist.is_main
        cbs = [self._sync(stop),
               NonFiniteGuard(lambda s: f"non-finite loss ({float(s.value)}) at pretraining step {s.index}; "
                                        f"{self._last_good()}",
                              lambda s: f"non-finite gradient at pretraining step {s.index}; {self._last_good()}"),
               EMAUpdate(self.ema, self.policy), ShortcutTarget(getattr(self.policy, "flow", None)),
               ProgressBar(cfg.grad_steps, f"pretrain {cfg.policy['kind']}", initial=self.step,
                           disable=not (cfg.progress and main)),
               LogScalars(logger, lambda s: {"train/loss": float(s.value), "train/lr": self.sched.get_last_lr()[0],
                                             "train/grad_norm": float(s.grad_norm),
                                             **{f"train/{k}": v for k, v in s.info.items()}}, every(50))]
        if not main:  # validation, evaluation and checkpoints are rank 0's
            def stopped(s: Step) -> None:
                raise TrainingInterrupted(f"stopped at step {s.done} (rank {self.dist.rank}); rank 0 saved the "
                                          "checkpoint")

            return [*cbs, StopOnCtrlC(lambda: self._stop_now, stopped)]

        def validate(s: Step) -> None:
            v = self.validation_loss()
            if v is not None:
                logger.log({"val/loss": v}, s.done)
                metrics["val/loss"] = v

        def evaluate(s: Step) -> None:
            m = self.evaluate()
            logger.log(m, s.done)
            metrics.update(m)
            score = m["eval/success_rate"] if self.env_meta.get("has_success") else m["eval/return_mean"]
            if score > self.best:
                self.best = score
                s.tags.append("best")

        def stopped(s: Step) -> None:
            raise TrainingInterrupted(f"stopped at step {s.done}; saved {self.save(('last',))}")

        return [*cbs, Periodic(validate, every(cfg.val_every, cfg.grad_steps)),
                Periodic(evaluate, lambda s: bool(cfg.eval_every and cfg.eval_episodes)
                         and every(cfg.eval_every, cfg.grad_steps)(s)),
                Periodic(lambda s: self.save(tuple(s.tags)),
                         lambda s: every(cfg.save_every, cfg.grad_steps)(s) or len(s.tags) > 1),
                StopOnCtrlC(lambda: self._stop_now, stopped)]

    def run(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.dist.is_main
        logger = Logger(self.run_dir / "tb" if cfg.tensorboard and main else None)
        last_metrics: dict[str, float] = {}
        stop = StopOnInterrupt("pretraining").__enter__()  # Ctrl-C: finish the current step, save, then stop
        if self._lock is not None:
            self._lock.acquire()
        try:
            SupervisedLoop(self.policy.parameters(), self.opt, self._loss_fn, scheduler=self.sched,
                           grad_clip=cfg.grad_clip, callbacks=self._callbacks(stop, logger, last_metrics),
                           ).run(cfg.grad_steps, start=self.step)
            if main and not (self.ckpt_dir / "best").exists():
                self.save(("last", "best"))
        finally:
            stop.__exit__()
            logger.close()
            if self._lock is not None:
                self._lock.release()
        return {"checkpoint": str((self.ckpt_dir / "last").resolve()), "best": str((self.ckpt_dir / "best").resolve()),
                "step": self.step, **last_metrics}


def _materialize(ds) -> dict[str, torch.Tensor]:
    """All (obs history, action chunk) windows of a dataset as two tensors (datasets here are small)."""
    items = [ds[i] for i in range(len(ds))]
    return {"obs": torch.stack([it["obs"] for it in items]), "action": torch.stack([it["action"] for it in items])}
