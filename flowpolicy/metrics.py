"""Sample distances between point clouds (B, D): RBF-kernel MMD, sliced Wasserstein-2 and k-NN
precision, recall, density and coverage."""

from __future__ import annotations

import torch


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0)) -> float:
    """Biased MMD^2 estimate with a sum of RBF kernels exp(-||a - b||^2 / (2 h^2)); 0 for equal samples."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    k = sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)
    n = x.shape[0]
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced W2 distance over random unit directions (fixed seed, so deterministic). Needs len(x) == len(y)."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ dirs, dim=0)
    py, _ = torch.sort(y @ dirs, dim=0)
    return float((px - py).pow(2).mean().sqrt())


def _kth_neighbour_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of x (N, D) to its k-th nearest other row (N,)."""
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be in [1, {x.shape[0] - 1}] for {x.shape[0]} points, got {k}")
    d = torch.cdist(x, x)
    # column 0 of the sorted distances is the point itself (0)
    return d.sort(dim=1).values[:, k]


def precision_recall_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """k-NN manifold measures of a generated sample ``fake`` (M, D) against a real sample ``real`` (N, D).

    Each point's ball reaches its k-th nearest neighbour in its own set.

    - ``precision``: share of fake points inside some real ball (fidelity; Kynkäänniemi et al. 2019);
    - ``recall``: share of real points inside some fake ball (diversity; same paper);
    - ``density``: mean number of real balls holding a fake point, divided by k (about 1 for a sample of the
      real distribution, above 1 when samples crowd dense regions; Naeem et al. 2020);
    - ``coverage``: share of real balls holding at least one fake point (mode dropping lowers it; same paper).

    A copy of the real sample scores precision = recall = coverage = 1. Distances are Euclidean in float64.
    """
    real = real.reshape(real.shape[0], -1).double()
    fake = fake.reshape(fake.shape[0], -1).double()
    r_real, r_fake = _kth_neighbour_radius(real, k), _kth_neighbour_radius(fake, k)
    d = torch.cdist(fake, real)  # (M, N)
    inside_real = d <= r_real[None, :]   # fake i inside real ball j
    inside_fake = d <= r_fake[:, None]   # real j inside fake ball i
    return {"precision": float(inside_real.any(dim=1).double().mean()),
            "recall": float(inside_fake.any(dim=0).double().mean()),
            "density": float(inside_real.double().sum(dim=1).mean() / k),
            "coverage": float((d.min(dim=0).values <= r_real).double().mean())}


def nearest_distances(x: torch.Tensor, ref: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """Euclidean distance (N,) from each row of x (N, ...) to its nearest row of ref (R, ...), float64."""
    x, ref = x.reshape(x.shape[0], -1).double(), ref.reshape(ref.shape[0], -1).double()
    return torch.cat([torch.cdist(x[i : i + batch], ref).min(dim=1).values
                      for i in range(0, x.shape[0], batch)])
