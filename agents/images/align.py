"""Reward alignment of image generators: a classifier reward, Flow-DPO / Flow-RWR / SFT fine-tuning, guidance.

``python train.py task=digits stage=align checkpoint=<run>/checkpoints/1rf stage.method=dpo|rwr|sft|guidance``

The reward is differentiable: r(x) = log p(target_class | x) under the frozen classifier of
:mod:`agents.images.classifier` (:class:`ClassifierReward`). Preference data are the generator's own samples:
``num_samples`` images from fixed noise, split into groups of ``group_size``; the best and the worst of each
group (by reward) form a (winner, loser) pair. Methods:

- ``dpo``: Flow-DPO (:func:`flowpolicy.align.flow_dpo_loss`) against the frozen starting generator;
- ``rwr``: Flow-RWR on all samples, weights exp(r / beta) normalized and clipped;
- ``sft``: flow matching on the winners only (the baseline Flow-DPO is compared against);
- ``guidance``: no training; :func:`flowpolicy.align.guided_sample` with weight ``guidance_weight``.

Every evaluation samples the same noise and reports the mean reward (``reward``), the mean log-probability
under a second classifier trained with another seed (``reward_heldout``: a check against images that only fool
the reward's own classifier), the fraction the held-out classifier labels as the target (``target_rate``), and
the Fréchet distance in the classifier's features to all real images (``fd``, the reference distribution) and
to the real images of the target class (``fd_target``), and the diversity within the target class in the
held-out classifier's features relative to real data (``diversity``, see :class:`ImageMetrics`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from flowpolicy import EMA, RectifiedFlow
from flowpolicy.align import flow_dpo_loss, flow_rwr_loss, guided_sample

from ..align_metrics import pairwise_diversity
from ..loop import History, NonFiniteGuard, ProgressBar, SupervisedLoop
from .classifier import FrechetScorer, ImageClassifier, load_or_train_classifier
from .data import ImageData, load_dataset
from .trainer import TrainedModel, eval_noise, image_grid, load_generator, save_checkpoint

METHODS = ("dpo", "rwr", "sft", "guidance")


class ClassifierReward:
    """r(images) = log p(target_class | images), shape (B,), differentiable w.r.t. the images (B, C, H, W).

    Images are not clamped, so guidance gets gradients everywhere; score final samples on clamped images.
    """

    def __init__(self, classifier: ImageClassifier, target_class: int) -> None:
        n = classifier.config["num_classes"]
        if not 0 <= int(target_class) < n:
            raise ValueError(f"target_class must be in [0, {n}), got {target_class}")
        self.classifier = classifier.eval()
        self.target_class = int(target_class)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.log_prob(images, self.target_class)


@dataclass
class ImageAlignConfig:
    """Settings of image alignment (``configs/stage/align.yaml``: ``method``, ``seed``, ``progress`` and the
    ``image`` block)."""

    method: str = "dpo"
    target_class: int = 0
    num_samples: int = 2000         # generated samples scored for preference data
    group_size: int = 4             # DPO/SFT pairs: best vs worst of each group
    sample_steps: int = 8           # Euler steps for preference samples and evaluation
    beta: float = 200.0
    beta_schedule: str = "constant"
    rwr_beta: float | None = None   # RWR temperature in reward units (None: the std of the rewards)
    rwr_max_weight: float | None = 20.0
    grad_steps: int = 300
    batch_size: int = 64            # pairs per DPO step; samples per RWR/SFT step
    lr: float = 3.0e-4
    grad_clip: float = 1.0
    guidance_weight: float = 0.5
    guidance_schedule: str = "constant"
    guidance_max_grad_norm: float | None = None
    eval_samples: int = 1000
    classifier_steps: int = 1500    # settings of the (cached) reward and held-out classifiers
    classifier_cache_dir: str | None = "data/classifiers"
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"stage.method must be one of {METHODS}, got {self.method!r}")
        if self.group_size < 2:
            raise ValueError(f"stage.image.group_size must be >= 2 to pick a winner and a loser, got {self.group_size}")
        if self.num_samples < self.group_size:
            raise ValueError(f"stage.image.num_samples={self.num_samples} gives no group of {self.group_size}")
        for name in ("sample_steps", "grad_steps", "batch_size", "eval_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"stage.image.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not self.beta > 0:
            raise ValueError(f"stage.image.lr and stage.image.beta must be positive, got lr={self.lr}, beta={self.beta}")


@torch.no_grad()
def generate(flow: RectifiedFlow, x0: torch.Tensor, steps: int, batch: int = 1000) -> torch.Tensor:
    """Images (N, C, H, W) on the CPU from noise x0: ``steps`` Euler steps of ``flow.net`` on its device."""
    dev = next(flow.net.parameters()).device
    return torch.cat([flow.sample(steps=steps, x0=x0[i : i + batch].to(dev)).cpu()
                      for i in range(0, x0.shape[0], batch)])


@torch.no_grad()
def score(reward, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Rewards (N,) of images clamped to [-1, 1] (what the images look like), on the CPU."""
    dev = next(reward.classifier.parameters()).device
    return torch.cat([reward(images[i : i + batch].clamp(-1, 1).to(dev)).cpu()
                      for i in range(0, len(images), batch)])


def group_pairs(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(winner, loser) indices: best and worst reward of each consecutive group of ``group_size`` samples."""
    n = (rewards.shape[0] // group_size) * group_size
    r = rewards[:n].reshape(-1, group_size)
    base = torch.arange(r.shape[0]) * group_size
    return base + r.argmax(dim=1), base + r.argmin(dim=1)


def align_generator(flow: RectifiedFlow, images: torch.Tensor, rewards: torch.Tensor, cfg: ImageAlignConfig,
                    ) -> tuple[RectifiedFlow, dict[str, Any]]:
    """Fine-tune a copy of ``flow`` on its own samples ``images`` (N, C, H, W) scored ``rewards`` (N,).

    DPO's reference is the frozen ``flow.net``. Returns (aligned flow in eval mode, info).
    """
    if cfg.method == "guidance":
        raise ValueError("guidance does not train; sample with flowpolicy.align.guided_sample")
    aligned = copy.deepcopy(flow)
    net = aligned.net.train()
    for p in net.parameters():
        p.requires_grad_(True)
    ref_net = copy.deepcopy(flow.net).eval()
    for p in ref_net.parameters():
        p.requires_grad_(False)
    dev = next(net.parameters()).device
    images, rewards = images.to(dev), rewards.to(dev)
    winners, losers = group_pairs(rewards.cpu(), cfg.group_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    rwr_beta = cfg.rwr_beta or max(float(rewards.std()), 1e-6)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)

    def loss_fn(step: int) -> tuple[torch.Tensor, dict]:
        if cfg.method == "dpo":
            k = torch.randint(0, len(winners), (cfg.batch_size,), generator=gen)
            x_w, x_l = images[winners[k].to(dev)], images[losers[k].to(dev)]
            return flow_dpo_loss(aligned, ref_net, x_w, x_l, beta=cfg.beta, beta_schedule=cfg.beta_schedule,
                                 generator=gen)
        if cfg.method == "rwr":
            idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen).to(dev)
            return flow_rwr_loss(aligned, images[idx], rewards[idx], beta=rwr_beta, max_weight=cfg.rwr_max_weight,
                                 generator=gen)
        idx = winners[torch.randint(0, len(winners), (cfg.batch_size,), generator=gen)].to(dev)
        return aligned.loss(images[idx], generator=gen)

    record = History(lambda s: {"loss": float(s.value), **s.info})
    SupervisedLoop(net.parameters(), opt, loss_fn, grad_clip=cfg.grad_clip, callbacks=[
        NonFiniteGuard(lambda s: f"image align {cfg.method}: non-finite loss at step {s.index}; lower lr or beta"),
        record, ProgressBar(cfg.grad_steps, f"align {cfg.method}", disable=not cfg.progress),
    ]).run(cfg.grad_steps)
    history = record.records
    net.eval()
    last = history[-20:]
    final = {k: sum(h[k] for h in last) / len(last) for k in last[-1]}
    return aligned, {"pairs": int(len(winners)), "rwr_beta": rwr_beta if cfg.method == "rwr" else None,
                     "final": final, "history": history}


class ImageMetrics:
    """Mean reward, held-out reward, target rate, FD (to all real images and to the target class) and the
    diversity within the target class.

    ``diversity``: the mean pairwise distance, in the held-out classifier's features, between the samples that
    classifier labels as the target class, divided by the same number for the real images of that class (1:
    as varied as real data; well below 1: collapsed onto few modes). NaN with fewer than 2 such samples.
    """

    def __init__(self, data: ImageData, reward: ClassifierReward, heldout: ClassifierReward) -> None:
        self.reward, self.heldout = reward, heldout
        target = data.images[data.labels == reward.target_class]
        self.fd_all = FrechetScorer(reward.classifier, data.images)
        self.fd_target = FrechetScorer(reward.classifier, target)
        self.judge = FrechetScorer(heldout.classifier, target)   # its features() embed for diversity
        self.real_diversity = pairwise_diversity(self.judge.features(target))

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        images = images.detach().cpu()
        held = score(self.heldout, images)
        with torch.no_grad():
            dev = next(self.heldout.classifier.parameters()).device
            pred = self.heldout.classifier(images.clamp(-1, 1).to(dev)).argmax(dim=1).cpu()
        is_target = pred == self.heldout.target_class
        picked = images[is_target].clamp(-1, 1)
        div = pairwise_diversity(self.judge.features(picked)) if len(picked) >= 2 else float("nan")
        return {"reward": float(score(self.reward, images).mean()), "reward_heldout": float(held.mean()),
                "target_rate": float(is_target.float().mean()),
                "fd": self.fd_all(images), "fd_target": self.fd_target(images),
                "diversity": div / self.real_diversity}


def classifier_rewards(data: ImageData, target_class: int, steps: int, cache_dir: str | Path | None,
                       seed: int = 0) -> tuple[ClassifierReward, ClassifierReward, dict[str, Any]]:
    """The reward (classifier seed ``seed``) and the held-out reward (seed ``seed + 1``), both cached."""
    clf, info = load_or_train_classifier(data, cache_dir=cache_dir, steps=steps, seed=seed)
    held, hinfo = load_or_train_classifier(data, cache_dir=cache_dir, steps=steps, seed=seed + 1)
    return (ClassifierReward(clf, target_class), ClassifierReward(held, target_class),
            {"reward_classifier": info, "heldout_classifier": hinfo})


def _launch_path(p: str) -> Path:
    """A relative path against the directory ``train.py`` was launched from (Hydra may change the cwd)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import to_absolute_path

    return Path(to_absolute_path(p)) if HydraConfig.initialized() else Path(p)


def image_align_config(cfg) -> ImageAlignConfig:
    """The checked settings of ``stage=align`` on an image task: ``method`` from the stage, ``seed`` and
    ``progress`` from the top level, the rest from ``stage.image`` (``agents.stages`` checks them before any
    work; a bad value raises ValueError naming it)."""
    stage = cfg.stage
    block = OmegaConf.to_container(stage.image, resolve=True) if stage.get("image") is not None else {}
    known = {f.name for f in dataclasses.fields(ImageAlignConfig)}
    unknown = sorted(set(block) - known)
    if unknown:
        raise ValueError(f"unknown stage.image settings {unknown}; known: {sorted(known)}")
    settings = {"method": str(stage.get("method", "dpo")), "seed": int(cfg.get("seed", 0)),
                "progress": bool(cfg.get("progress", True)), **block}
    acfg = ImageAlignConfig(**settings)
    acfg.validate()
    return acfg


def run_image_align(cfg, run_dir: str | Path, checkpoint: str) -> dict[str, Any]:
    """``stage=align`` on an image task: align the generator in ``checkpoint`` (from ``stage=image``).

    Writes ``align.json``, ``samples/align.png`` (before / after rows on the same noise) and, for the trained
    methods, ``checkpoints/aligned_<method>`` (loadable by :func:`agents.images.trainer.load_generator`).
    """
    acfg = image_align_config(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    device = str(cfg.get("device", "cpu"))
    flow, gcfg = load_generator(checkpoint, device)
    task = cfg.task
    data = load_dataset(str(task.dataset), task.get("path"), task.get("image_size"),
                        int(task.get("channels", 3)))
    if tuple(data.image_shape) != tuple(flow.x_shape):
        raise ValueError(f"{checkpoint}: generator makes images {flow.x_shape} but the task's are "
                         f"{data.image_shape}")
    cache = _launch_path(acfg.classifier_cache_dir) if acfg.classifier_cache_dir else None
    reward, heldout, cinfo = classifier_rewards(data, acfg.target_class, acfg.classifier_steps, cache)
    reward.classifier.to(device)
    heldout.classifier.to(device)
    metrics = ImageMetrics(data, reward, heldout)
    x0_eval = eval_noise(acfg.eval_samples, data.image_shape, acfg.seed + 12345)
    before_images = generate(flow, x0_eval, acfg.sample_steps)
    before = metrics(before_images)
    out: dict[str, Any] = {"method": acfg.method, "generator": str(checkpoint), "classifiers": cinfo,
                           "config": dataclasses.asdict(acfg), "before": before}
    if acfg.method == "guidance":
        t0 = time.perf_counter()
        after_images = guided_sample(flow, reward, acfg.guidance_weight, steps=acfg.sample_steps,
                                     x0=x0_eval.to(device), schedule=acfg.guidance_schedule,
                                     max_grad_norm=acfg.guidance_max_grad_norm).detach().cpu()
        out["sample_s"] = time.perf_counter() - t0
    else:
        x0_pref = eval_noise(acfg.num_samples, data.image_shape, acfg.seed + 777)
        images = generate(flow, x0_pref, acfg.sample_steps)
        rewards = score(reward, images)
        t0 = time.perf_counter()
        aligned, info = align_generator(flow, images, rewards, acfg)
        out["train_s"] = time.perf_counter() - t0
        out["train"] = {k: v for k, v in info.items() if k != "history"}
        after_images = generate(aligned, x0_eval, acfg.sample_steps)
        # EMA(net) right after training is a copy of the aligned weights: the checkpoint's sampling weights
        model = TrainedModel(f"aligned_{acfg.method}", aligned, EMA(aligned.net),
                             OmegaConf.to_container(gcfg.flow))
        extra = {k: OmegaConf.to_container(gcfg[k]) for k in ("data",) if k in gcfg}
        extra.update({"method": f"align_{acfg.method}", "aligned_from": str(checkpoint),
                      "align": dataclasses.asdict(acfg)})
        out["checkpoint"] = str(save_checkpoint(model, run_dir / "checkpoints" / model.name, extra))
    out["after"] = metrics(after_images)
    png = run_dir / "samples" / "align.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    image_grid([before_images[:16], after_images[:16]]).save(png)
    out["samples"] = str(png)
    out["wall_s"] = time.perf_counter() - t_start
    (run_dir / "align.json").write_text(json.dumps(out, indent=2, default=str))
    return out
