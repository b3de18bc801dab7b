"""Held-out image metrics: an evaluation split, an independent feature network, FD with its noise floor,
k-NN precision/recall/density/coverage and a nearest-training-image (memorisation) measure.

The setting (what :class:`HeldOutJudge` measures):

- :func:`heldout_split` splits a labelled dataset, stratified by class and seeded, into a *training* part (the
  generators and the feature network train on it) and an *evaluation* part that nothing trains on.
- The feature network (:class:`FeatureEncoder`) is a small CNN of its own architecture (ReLU, max pooling,
  32 features), trained on the training part's labels with its own seed. It shares neither weights, data
  split, seed nor architecture with the reward classifier of :mod:`agents.images.classifier` (which alignment
  uses), so a generator tuned against that classifier cannot fool this one by construction.
- Every score compares ``n`` samples with ``n`` real evaluation images. Draw ``d`` splits the evaluation part
  (2n images or more) into two disjoint halves with its own seed: a *reference* half and an *other* half.
  The FD of the generated samples to the reference half is reported beside the *floor* of that draw, the FD
  of the other real half to the same reference half: what a perfect generator would score with this many
  samples (FD has a positive bias that shrinks like 1/n). ``fd_excess = fd - floor`` is paired on the
  reference half, so that half's own noise largely cancels.
- ``precision``/``recall``/``density``/``coverage`` (:func:`flowpolicy.metrics.precision_recall_coverage`)
  are computed in the same features against the same reference half: low recall or coverage with high
  precision is mode dropping; precision far below the real half's is unrealistic samples.
- Memorisation: FD cannot see it (a generator that returns its training images scores the floor). The
  ``nn_ratio`` is the median pixel distance of the samples to their nearest training image divided by the
  same median for real evaluation images (about 1 for fresh real images, 0 for copies); ``copy_rate`` is the
  share of samples closer to a training image than the closest 5% of real evaluation images are (0.05 for
  fresh real images, 1 for copies).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowpolicy.metrics import nearest_distances, precision_recall_coverage

from ..loop import SupervisedLoop
from .classifier import accuracy, frechet_distance, gaussian_fit
from .data import ImageData


def heldout_split(data: ImageData, fraction: float = 0.4, seed: int = 0) -> tuple[ImageData, ImageData]:
    """(train, eval): ``round(fraction * n_c)`` images of each class c go to eval, the rest to train.

    Seeded and deterministic; the two parts are disjoint and together hold every image once. Names carry the
    split (``<name>-train<fraction>s<seed>``) so caches keyed by name never mix them.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"heldout fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    eval_idx = []
    for c in range(data.num_classes):
        idx = torch.nonzero(data.labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        eval_idx.append(idx[: int(round(fraction * idx.numel()))])
    mask = torch.zeros(len(data), dtype=torch.bool)
    mask[torch.cat(eval_idx)] = True
    if bool(mask.all()) or not bool(mask.any()):
        raise ValueError(f"heldout fraction {fraction} leaves an empty part of {len(data)} images")

    def part(m: torch.Tensor, tag: str) -> ImageData:
        name = f"{data.name}-{tag}{fraction:g}s{seed}"
        return ImageData(data.images[m], data.labels[m], data.num_classes, name, list(data.class_names))

    return part(~mask, "train"), part(mask, "eval")


class FeatureEncoder(nn.Module):
    """The evaluation feature network: (B, C, H, W) in [-1, 1] -> logits; ``features`` -> (B, feature_dim).

    Deliberately unlike :class:`agents.images.classifier.ImageClassifier` (SiLU, strided convolutions, 64
    features): ReLU, max pooling, a narrower body and 32 features.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, feature_dim: int = 32) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "width": width,
                       "feature_dim": feature_dim}
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * width, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def train_encoder(train: ImageData, steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, seed: int = 1,
                  width: int = 16, feature_dim: int = 32) -> tuple[FeatureEncoder, dict]:
    """Train a :class:`FeatureEncoder` on every image of ``train`` (labels; 1-pixel random shifts).

    Deterministic for a seed; the caller's global RNG state is left untouched. Returns (model in eval mode,
    frozen; info). Its accuracy is measured by the caller on data it did not train on.
    """
    if train.num_classes < 2:
        raise ValueError("the evaluation encoder needs labelled data (at least 2 classes)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        model = FeatureEncoder(train.image_shape[0], train.num_classes, width, feature_dim)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
        model.train()

        def loss_fn(i: int) -> tuple[torch.Tensor, dict]:
            idx = torch.randint(0, len(train), (batch_size,), generator=g)
            x = train.images[idx]
            pad = max(1, x.shape[-1] // 8)
            dx, dy = torch.randint(-pad, pad + 1, (2,), generator=g).tolist()
            return F.cross_entropy(model(torch.roll(x, shifts=(dy, dx), dims=(2, 3))), train.labels[idx]), {}

        SupervisedLoop(model.parameters(), opt, loss_fn, scheduler=sched).run(steps)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info = {"arch": "FeatureEncoder", **model.config, "steps": steps, "seed": seed,
            "train_images": len(train), "train_fingerprint": train.fingerprint()}
    return model, info


def load_or_train_encoder(train: ImageData, cache_dir: str | Path | None = None,
                          **settings) -> tuple[FeatureEncoder, dict]:
    """:func:`train_encoder`, cached under ``cache_dir`` by the training part's fingerprint and settings."""
    if cache_dir is None:
        return train_encoder(train, **settings)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    path = Path(cache_dir) / f"encoder-{train.name}-{train.fingerprint()}-{tag}.safetensors"
    if path.exists():
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        info = json.loads(meta["info"])
        model = FeatureEncoder(**json.loads(meta["model"]))
        model.load_state_dict(load_file(str(path)))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model, {**info, "cache": str(path), "cached": True}
    model, info = train_encoder(train, **settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"info": json.dumps(info), "model": json.dumps(model.config)})
    os.replace(tmp, path)
    return model, {**info, "cache": str(path), "cached": False}


@torch.no_grad()
def encode(model: nn.Module, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Features (N, F) of images (N, C, H, W) clamped to [-1, 1], on the CPU."""
    dev = next(model.parameters()).device
    return torch.cat([model.features(images[i : i + batch].clamp(-1.0, 1.0).to(dev)).cpu()
                      for i in range(0, images.shape[0], batch)])


def fd_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets (N, F) and (M, F)."""
    return frechet_distance(*gaussian_fit(a), *gaussian_fit(b))


class HeldOutJudge:
    """Scores generated images against a held-out real split; see the module docstring.

    Args:
        encoder: the frozen feature network (``features(images) -> (N, F)``).
        train: the images the generators trained on (for the memorisation measures).
        evaluation: the held-out real images; needs at least ``2 * n``.
        n: samples per score (generated and real alike).
        k: neighbourhood size of precision/recall/density/coverage.
        splits_per_draw: each draw scores against this many random splits and averages (the floor likewise).
        split_seed: split ``i`` of the held-out images is seeded ``split_seed + i``; draw ``d`` uses splits
            ``d * splits_per_draw`` to ``(d + 1) * splits_per_draw - 1``.
    """

    def __init__(self, encoder: nn.Module, train: torch.Tensor, evaluation: torch.Tensor, n: int, k: int = 5,
                 splits_per_draw: int = 4, split_seed: int = 0) -> None:
        if evaluation.shape[0] < 2 * n:
            raise ValueError(f"the floor needs 2 x {n} held-out images, only {evaluation.shape[0]} are held "
                             "out")
        if splits_per_draw < 1:
            raise ValueError(f"splits_per_draw must be >= 1, got {splits_per_draw}")
        self.encoder, self.n, self.k = encoder.eval(), int(n), int(k)
        self.splits_per_draw, self.split_seed = int(splits_per_draw), int(split_seed)
        self.train, self.evaluation = train, evaluation
        self.eval_features = encode(encoder, evaluation)
        real_nn = nearest_distances(evaluation, train)
        self.real_nn_median = float(real_nn.median())
        self.copy_threshold = float(torch.quantile(real_nn, 0.05))
        self._splits: dict[int, dict] = {}

    def split(self, index: int) -> dict:
        """Split ``index`` of the held-out images: disjoint halves ``ref`` and ``other`` (n indices each), the
        reference Gaussian and the floor (FD of the other half to the reference half)."""
        if index not in self._splits:
            g = torch.Generator().manual_seed(self.split_seed + index)
            perm = torch.randperm(self.evaluation.shape[0], generator=g)
            ref, other = perm[: self.n], perm[self.n : 2 * self.n]
            fit = gaussian_fit(self.eval_features[ref])
            floor = frechet_distance(*fit, *gaussian_fit(self.eval_features[other]))
            self._splits[index] = {"ref": ref, "other": other, "fit": fit, "floor": floor}
        return self._splits[index]

    def _indices(self, draw: int) -> range:
        return range(draw * self.splits_per_draw, (draw + 1) * self.splits_per_draw)

    def floor(self, draw: int) -> float:
        """Draw ``draw``'s floor: the mean over its ``splits_per_draw`` splits."""
        return float(np.mean([self.split(i)["floor"] for i in self._indices(draw)]))

    def floors(self, draws: int) -> list[float]:
        """The floor of draws 0 .. draws - 1 (its spread over random splits)."""
        return [self.floor(d) for d in range(draws)]

    def score(self, images: torch.Tensor, draw: int) -> dict[str, float]:
        """Scores of ``n`` images (N, C, H, W) in [-1, 1] against draw ``draw``'s reference halves.

        Returns fd, floor, fd_excess (= fd - floor, paired split by split), precision, recall, density,
        coverage (each a mean over the draw's splits), nn_ratio and copy_rate. Non-finite images give fd = inf
        and NaN for the rest.
        """
        if images.shape[0] != self.n:
            raise ValueError(f"score {self.n} images at a time (the floor's sample size), got "
                             f"{images.shape[0]}")
        floor = self.floor(draw)
        if not bool(torch.isfinite(images).all()):
            nan = float("nan")
            return {"fd": float("inf"), "floor": floor, "fd_excess": float("inf"), "precision": nan,
                    "recall": nan, "density": nan, "coverage": nan, "nn_ratio": nan, "copy_rate": nan}
        images = images.clamp(-1.0, 1.0)
        feats = encode(self.encoder, images)
        fit = gaussian_fit(feats)
        per_split = []
        for i in self._indices(draw):
            s = self.split(i)
            per_split.append({"fd": frechet_distance(*s["fit"], *fit),
                              **precision_recall_coverage(self.eval_features[s["ref"]], feats, self.k)})
        out = {key: float(np.mean([p[key] for p in per_split])) for key in per_split[0]}
        nn_dist = nearest_distances(images, self.train)
        return {"fd": out["fd"], "floor": floor, "fd_excess": out["fd"] - floor,
                **{key: out[key] for key in ("precision", "recall", "density", "coverage")},
                "nn_ratio": float(nn_dist.median()) / self.real_nn_median,
                "copy_rate": float((nn_dist < self.copy_threshold).double().mean())}

    def score_real(self, draw: int) -> dict[str, float]:
        """Fresh real images scored like a generated sample: in each of the draw's splits, the other half
        against its reference half (so fd = floor and fd_excess = 0 by construction; precision, recall,
        density and coverage are what a perfect generator would score). Averaged over the draw's splits."""
        per_split = []
        for i in self._indices(draw):
            s = self.split(i)
            other = self.evaluation[s["other"]]
            nn_dist = nearest_distances(other, self.train)
            per_split.append({"fd": s["floor"], "floor": s["floor"], "fd_excess": 0.0,
                              **precision_recall_coverage(self.eval_features[s["ref"]],
                                                          self.eval_features[s["other"]], self.k),
                              "nn_ratio": float(nn_dist.median()) / self.real_nn_median,
                              "copy_rate": float((nn_dist < self.copy_threshold).double().mean())})
        return {key: float(np.mean([p[key] for p in per_split])) for key in per_split[0]}


def accuracy_on(model: nn.Module, data: ImageData) -> float:
    """Classification accuracy of ``model`` on ``data`` (e.g. the encoder on the held-out split)."""
    return accuracy(model, data.images, data.labels)


__all__ = ["FeatureEncoder", "HeldOutJudge", "accuracy_on", "encode", "fd_features", "heldout_split",
           "load_or_train_encoder", "train_encoder"]
