"""Velocity networks. Every network has ``forward(x, t, cond=None, d=None) -> velocity shaped like x``.

- x: the state being transported, (B, *shape): action chunks (B, Ta, Da), points (B, D), images (B, C, H, W)
- t: (B,) flow time in [0, 1] (0 noise, 1 data)
- cond: (B, Dc) condition features (e.g. flattened observation history), or None
- d: (B,) step size for shortcut models (embedded through log2(1/d)), or None
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """Maps a scalar per sample (B,) to (B, dim) sin/cos features; ``scale`` stretches [0, 1] inputs."""

    def __init__(self, dim: int, scale: float = 1000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"SinusoidalEmbedding dim must be even, got {dim}")
        self.dim = dim
        self.scale = scale
        # follows .to(dtype) of the model (not saved): the output has the dtype of the layers that read it
        self.register_buffer("_dtype_probe", torch.zeros(()), persistent=False)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=s.device, dtype=torch.float32) / half)
        arg = self.scale * s.float()[:, None] * freqs[None]
        return torch.cat([arg.sin(), arg.cos()], dim=-1).to(self._dtype_probe.dtype)


class _Conditioning(nn.Module):
    """Embeds (t, cond, d) into one vector of size ``dim`` shared by all blocks."""

    def __init__(self, dim: int, cond_dim: int, step_input: bool) -> None:
        super().__init__()
        self.t_embed = nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.cond_embed = nn.Linear(cond_dim, dim) if cond_dim > 0 else None
        # shortcut step size: log2(1/d) in [0, ~10]; a small scale keeps the sinusoid informative
        self.d_embed = (
            nn.Sequential(SinusoidalEmbedding(dim, scale=10.0), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            if step_input
            else None
        )
        self.cond_dim = cond_dim

    def forward(self, t: torch.Tensor, cond: torch.Tensor | None, d: torch.Tensor | None) -> torch.Tensor:
        h = self.t_embed(t)
        if self.cond_embed is not None:
            if cond is None:
                raise ValueError(f"network expects a condition of dim {self.cond_dim}, got None")
            h = h + self.cond_embed(cond.reshape(cond.shape[0], -1))
        if self.d_embed is not None:
            if d is None:
                raise ValueError("network was built with step_input=True (shortcut model) and needs d")
            h = h + self.d_embed(torch.log2(1.0 / d.clamp_min(1e-6)))
        return h


class ResidualBlock(nn.Module):
    """LayerNorm -> FiLM(emb) -> SiLU -> Linear -> SiLU -> Linear, added to the input."""

    def __init__(self, dim: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.film = nn.Linear(emb_dim, 2 * dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.forward_film(h, self.film(emb))

    def forward_film(self, h: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        """The block given ``film = self.film(emb)`` (lets a caller compute the FiLM terms its own way)."""
        scale, shift = film.chunk(2, dim=-1)
        z = self.norm(h) * (1 + scale) + shift
        z = self.fc2(self.dropout(F.silu(self.fc1(F.silu(z)))))
        return h + z


class MLPVelocity(nn.Module):
    """Residual MLP velocity field over flattened x, conditioned on time, condition and step size.

    Args:
        x_shape: shape of one sample, e.g. (Ta, Da) or (2,).
        cond_dim: flattened condition size (0 for unconditional).
        hidden: width; depth: number of residual blocks.
        step_input: also take the step size d (shortcut models).
    """

    def __init__(
        self,
        x_shape: tuple[int, ...],
        cond_dim: int = 0,
        hidden: int = 256,
        depth: int = 3,
        emb_dim: int = 128,
        step_input: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.x_shape = tuple(x_shape)
        self.x_dim = int(math.prod(self.x_shape))
        self.step_input = step_input
        self.cond_dim = cond_dim
        self.embed = _Conditioning(emb_dim, cond_dim, step_input)
        self.inp = nn.Linear(self.x_dim + emb_dim, hidden)
        self.blocks = nn.ModuleList([ResidualBlock(hidden, emb_dim, dropout) for _ in range(depth)])
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, self.x_dim)

    def forward(self, x, t, cond=None, d=None):
        return self.forward_emb(x, self.embed(t, cond, d))

    def forward_grid(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                     d: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity at K time points for each of B samples: x (B, K, *x_shape), t (K,), cond (B, Dc), d (K,).

        Equals ``forward`` on the B * K rows (x[b, k], t[k], cond[b], d[k]) up to float rounding, for less work:
        every linear map of the conditioning embedding (the input layer's and each block's FiLM) is split into
        a per-step part (K rows: time and step size) and a per-sample part (B rows: the condition), so it runs
        on K + B rows instead of K * B. Used to recompute a K-step chain's log-prob in fine-tuning.
        """
        b, k = x.shape[:2]
        emb = self.embed
        step = emb.t_embed(t)  # (K, E)
        if emb.d_embed is not None:
            if d is None:
                raise ValueError("network was built with step_input=True (shortcut model) and needs d")
            step = step + emb.d_embed(torch.log2(1.0 / d.clamp_min(1e-6)))
        if emb.cond_embed is not None:
            if cond is None:
                raise ValueError(f"network expects a condition of dim {emb.cond_dim}, got None")
            sample = emb.cond_embed(cond.reshape(b, -1))  # (B, E)
        else:
            sample = step.new_zeros(b, step.shape[-1])

        def split(layer: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            # W (step[k] + sample[b]) + bias, as a (B, K, out) sum of a (B, 1, out) and a (1, K, out) term
            return F.linear(sample, weight, bias)[:, None] + F.linear(step, weight)[None]

        w_x, w_e = self.inp.weight[:, : self.x_dim], self.inp.weight[:, self.x_dim:]
        h = F.linear(x.reshape(b, k, -1), w_x) + split(self.inp, w_e, self.inp.bias)
        for block in self.blocks:
            h = block.forward_film(h, split(block.film, block.film.weight, block.film.bias))
        return self.out(F.silu(self.out_norm(h))).reshape(x.shape)

    def forward_emb(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The network after the conditioning: ``forward(x, t, cond, d) == forward_emb(x, embed(t, cond, d))``.
        Lets a K-step sampler embed what does not change between steps once (:mod:`flowpolicy.fast`)."""
        h = self.inp(torch.cat([x.reshape(x.shape[0], -1), emb], dim=-1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h))).reshape(x.shape)


class _ConvBlock1d(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 3, padding=1)
        self.norm1 = nn.GroupNorm(min(groups, cout), cout)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.conv2 = nn.Conv1d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = F.mish(self.norm1(self.conv1(x)))
        scale, shift = self.film(emb).unsqueeze(-1).chunk(2, dim=1)
        h = h * (1 + scale) + shift
        h = F.mish(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class ConvUNet1D(nn.Module):
    """1-D temporal conv U-Net over action chunks (B, Ta, Da), FiLM-conditioned (diffusion-policy style).

    Ta must be divisible by 2 ** (len(channels) - 1).
    """

    def __init__(
        self,
        x_shape: tuple[int, int],
        cond_dim: int = 0,
        channels: tuple[int, ...] = (64, 128),
        emb_dim: int = 128,
        step_input: bool = False,
    ) -> None:
        super().__init__()
        ta, da = x_shape
        factor = 2 ** (len(channels) - 1)
        if ta % factor:
            raise ValueError(f"ConvUNet1D: horizon {ta} must be divisible by {factor} for channels {channels}")
        self.x_shape = (ta, da)
        self.step_input = step_input
        self.cond_dim = cond_dim
        self.embed = _Conditioning(emb_dim, cond_dim, step_input)
        self.down = nn.ModuleList()
        cin = da
        for i, c in enumerate(channels):
            self.down.append(_ConvBlock1d(cin, c, emb_dim))
            cin = c
            if i < len(channels) - 1:
                self.down.append(nn.Conv1d(c, c, 3, stride=2, padding=1))
        self.mid = _ConvBlock1d(cin, cin, emb_dim)
        self.up = nn.ModuleList()
        for c in reversed(channels[:-1]):
            self.up.append(nn.ConvTranspose1d(cin, c, 4, stride=2, padding=1))
            self.up.append(_ConvBlock1d(2 * c, c, emb_dim))
            cin = c
        self.out = nn.Conv1d(cin, da, 1)

    def forward(self, x, t, cond=None, d=None):
        emb = self.embed(t, cond, d)
        h = x.transpose(1, 2)  # (B, Da, Ta)
        skips = []
        for layer in self.down:
            if isinstance(layer, _ConvBlock1d):
                h = layer(h, emb)
                skips.append(h)
            else:
                h = layer(h)
        h = self.mid(h, emb)
        skips.pop()  # the deepest block's output feeds mid directly
        for layer in self.up:
            if isinstance(layer, _ConvBlock1d):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.out(h).transpose(1, 2)


class _ConvBlock2d(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class ImageUNet(nn.Module):
    """Small image U-Net for (B, C, H, W); H and W divisible by 2 ** (len(channels) - 1).

    ``cond_dim`` > 0 adds a class/feature condition (e.g. a one-hot label).
    """

    def __init__(
        self,
        x_shape: tuple[int, int, int],
        cond_dim: int = 0,
        channels: tuple[int, ...] = (32, 64),
        emb_dim: int = 128,
        step_input: bool = False,
    ) -> None:
        super().__init__()
        c_in, h, w = x_shape
        factor = 2 ** (len(channels) - 1)
        if h % factor or w % factor:
            raise ValueError(f"ImageUNet: image {h}x{w} must be divisible by {factor} for channels {channels}")
        self.x_shape = tuple(x_shape)
        self.step_input = step_input
        self.cond_dim = cond_dim
        self.embed = _Conditioning(emb_dim, cond_dim, step_input)
        self.inp = nn.Conv2d(c_in, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        cin = channels[0]
        for i, c in enumerate(channels):
            self.down.append(_ConvBlock2d(cin, c, emb_dim))
            cin = c
            if i < len(channels) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = _ConvBlock2d(cin, cin, emb_dim)
        self.up = nn.ModuleList()
        for c in reversed(channels[:-1]):
            self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
            self.up.append(_ConvBlock2d(cin + c, c, emb_dim))
            cin = c
        self.out = nn.Sequential(nn.GroupNorm(min(8, cin), cin), nn.SiLU(), nn.Conv2d(cin, c_in, 3, padding=1))

    def forward(self, x, t, cond=None, d=None):
        emb = self.embed(t, cond, d)
        h = self.inp(x)
        skips = []
        for layer in self.down:
            if isinstance(layer, _ConvBlock2d):
                h = layer(h, emb)
                skips.append(h)
            else:
                h = layer(h)
        h = self.mid(h, emb)
        skips.pop()
        for layer in self.up:
            if isinstance(layer, _ConvBlock2d):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.out(h)


NETWORKS = {"mlp": MLPVelocity, "unet1d": ConvUNet1D, "unet2d": ImageUNet}


def make_network(kind: str, x_shape, cond_dim: int = 0, step_input: bool = False, **kwargs) -> nn.Module:
    """Build a velocity network by name: ``mlp``, ``unet1d`` (action chunks) or ``unet2d`` (images)."""
    if kind not in NETWORKS:
        raise ValueError(f"unknown network {kind!r}; choose from {sorted(NETWORKS)}")
    return NETWORKS[kind](tuple(x_shape), cond_dim=cond_dim, step_input=step_input, **kwargs)
