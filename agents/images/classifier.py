"""A small CNN classifier for image quality (Fréchet distance of its features) and as a differentiable reward.

Quality metric (an FID analogue sized for small datasets): fit a Gaussian N(mu, S) to the classifier's
penultimate features of real images and another to those of generated images; the Fréchet distance between
them is

    FD = ||mu_r - mu_g||^2 + tr(S_r) + tr(S_g) - 2 tr((S_r^{1/2} S_g S_r^{1/2})^{1/2}).

The matrix square root is taken of the symmetric positive semi-definite form S_r^{1/2} S_g S_r^{1/2} by
eigen-decomposition (eigenvalues clipped at 0), which is stable where the general ``sqrtm(S_r S_g)`` can turn
complex. FD is 0 for identical Gaussians; it has a positive bias that shrinks like 1/N, so compare values
computed from the same number of samples.

The classifier is trained on the dataset's labels (seeded, deterministic) and cached under ``data/``, keyed
by the dataset's fingerprint and the training settings. A dataset with a single class (an unlabelled image
folder) has nothing to classify; the network then learns to predict which of four rotations was applied
(Gidaris et al. 2018), which still gives features that see shapes.
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

from ..loop import SupervisedLoop
from .data import ImageData


class ImageClassifier(nn.Module):
    """CNN over (B, C, H, W) images in [-1, 1] -> logits (B, num_classes); ``features`` -> (B, feature_dim)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "width": width,
                       "feature_dim": feature_dim}
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images (B, C, H, W)."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.head(self.body(images))

    def log_prob(self, images: torch.Tensor, target_class: int | torch.Tensor) -> torch.Tensor:
        """log p(target_class | image), shape (B,), differentiable w.r.t. ``images`` (a reward for alignment).

        ``target_class``: one int for the whole batch or a (B,) tensor of class indices.
        """
        logp = F.log_softmax(self(images), dim=-1)
        target = torch.as_tensor(target_class, device=images.device, dtype=torch.long)
        if target.ndim == 0:
            target = target.expand(images.shape[0])
        return logp.gather(1, target[:, None]).squeeze(1)


def _rotation_task(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image in 4 rotations (4N, C, H, W) with the rotation index as its label (4N,)."""
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4).repeat_interleave(images.shape[0])
    return rotated, labels


@torch.no_grad()
def accuracy(model: ImageClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 1024) -> float:
    """Fraction of ``images`` (N, C, H, W) whose argmax logit equals ``labels`` (N,)."""
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch):
        correct += int((model(images[i : i + batch]).argmax(-1) == labels[i : i + batch]).sum())
    return correct / max(1, images.shape[0])


def train_classifier(
    data: ImageData,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    holdout: float = 0.2,
    width: int = 32,
    feature_dim: int = 64,
) -> tuple[ImageClassifier, dict]:
    """Train on a seeded (1 - holdout) split; returns the model (eval mode) and info with ``holdout_accuracy``.

    Deterministic for a given seed (the caller's global RNG state is left untouched). With a single class the
    task is rotation prediction (see the module docstring); ``info["task"]`` says which.
    """
    images, labels = data.images, data.labels
    task = "labels"
    num_classes = data.num_classes
    if num_classes < 2:
        images, labels = _rotation_task(images)
        task, num_classes = "rotation", 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(images.shape[0], generator=g)
        n_hold = int(round(holdout * images.shape[0]))
        hold, train = perm[:n_hold], perm[n_hold:]
        if train.numel() == 0:
            raise ValueError(f"train_classifier: no training images left after holdout={holdout}")
        model = ImageClassifier(data.image_shape[0], num_classes, width, feature_dim)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
        model.train()

        def loss_fn(i: int) -> tuple[torch.Tensor, dict]:
            idx = train[torch.randint(0, train.numel(), (batch_size,), generator=g)]
            x = images[idx]
            # small random shifts (1 pixel per 8) against overfitting the few thousand training images
            pad = max(1, x.shape[-1] // 8)
            dx, dy = torch.randint(-pad, pad + 1, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            return F.cross_entropy(model(x), labels[idx]), {}

        SupervisedLoop(model.parameters(), opt, loss_fn, scheduler=sched).run(steps)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    acc = accuracy(model, images[hold], labels[hold]) if n_hold else float("nan")
    return model, {"task": task, "holdout_accuracy": acc, "steps": steps, "seed": seed}


def load_or_train_classifier(
    data: ImageData, cache_dir: str | Path | None = "data/classifiers", **train_kwargs
) -> tuple[ImageClassifier, dict]:
    """The cached classifier for ``data`` (keyed by name, fingerprint and settings), trained once if missing.

    ``cache_dir=None`` trains without caching. The cache is written atomically (temp file, then rename).
    """
    settings = {"steps": 1500, "batch_size": 128, "lr": 2e-3, "seed": 0, "holdout": 0.2, "width": 32,
                "feature_dim": 64}
    unknown = set(train_kwargs) - set(settings)
    if unknown:
        raise TypeError(f"unknown classifier settings {sorted(unknown)}")
    settings.update(train_kwargs)
    if cache_dir is None:
        return train_classifier(data, **settings)
    from safetensors.torch import load_file, save_file

    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    path = Path(cache_dir) / f"{data.name}-{data.fingerprint()}-{tag}.safetensors"
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        info = json.loads(meta["info"])
        model = ImageClassifier(**json.loads(meta["model"]))
        model.load_state_dict(load_file(str(path)))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model, {**info, "cache": str(path), "cached": True}
    model, info = train_classifier(data, **settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"info": json.dumps(info), "model": json.dumps(model.config), "dataset": data.name})
    os.replace(tmp, path)
    return model, {**info, "cache": str(path), "cached": False}


def gaussian_fit(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and covariance (F, F) in float64 of features (N, F); N >= 2."""
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"gaussian_fit needs features shaped (N >= 2, F), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, s1) and N(mu2, s2); see the module docstring."""
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


class FrechetScorer:
    """FD of image batches against a fixed real reference, in the classifier's feature space.

    Args:
        classifier: trained ``ImageClassifier`` (frozen).
        reference: real images (N, C, H, W) in [-1, 1] whose feature Gaussian is the reference.
    """

    def __init__(self, classifier: ImageClassifier, reference: torch.Tensor, batch: int = 1024) -> None:
        self.classifier = classifier.eval()
        self.batch = batch
        self.mu, self.sigma = gaussian_fit(self.features(reference))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, feature_dim) on the CPU; computed on the classifier's device."""
        dev = next(self.classifier.parameters()).device
        return torch.cat([self.classifier.features(images[i : i + self.batch].to(dev)).cpu()
                          for i in range(0, images.shape[0], self.batch)])

    def __call__(self, images: torch.Tensor) -> float:
        """FD of ``images`` (N, C, H, W) in [-1, 1] to the reference; NaN/inf samples give inf."""
        if not bool(torch.isfinite(images).all()):
            return float("inf")
        mu, sigma = gaussian_fit(self.features(images.clamp(-1.0, 1.0)))
        return frechet_distance(self.mu, self.sigma, mu, sigma)
