"""rectified-flow-pytorch as the image benchmark's peer (bench/images.py), in two forms:

- ``PeerModel`` (``peer_1rf``): the package's loss and Euler sampler on OUR U-Net, with our optimizer, batches,
  clipping and EMA: an ablation that isolates the loss and the sampler.
- ``PeerOwnModel`` (``peer_own``): the package end to end: its own ``Unet``, its own ``Trainer`` (Adam at its
  default learning rate, its gradient-norm clip, its EMA from ema-pytorch at its defaults) and its default
  sampler (torchdiffeq's midpoint rule: 2 network evaluations per step), on the same images and budget
  (gradient steps x batch size). Only the budget, where it writes, and how often it saves are set.

Installed by ``pip install -e ".[peers]"``; without it the benchmark drops the rows with a note.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
import types

import torch
from omegaconf import OmegaConf

from flowpolicy import EMA, make_network


def import_peer() -> tuple[types.ModuleType | None, str]:
    """Import rectified_flow_pytorch; returns (module or None, a note saying how or why not).

    The package imports torchvision at module level for image saving and an optional LPIPS loss. When the
    installed torchvision cannot load its compiled ops against this torch (a CUDA torchvision beside a CPU
    torch), that import fails; the peer's flow, loss and sampler need no torchvision, so a stub that fails
    loudly if any torchvision function is called stands in for it, and the note says so.
    """
    try:
        import rectified_flow_pytorch

        return rectified_flow_pytorch, "imported as installed"
    except ImportError as e:
        return None, f"not installed ({e}); pip install rectified-flow-pytorch"
    except Exception as e:  # torchvision's compiled ops fail at import with a RuntimeError
        reason = f"{type(e).__name__}: {e}"
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for name in [m for m in sys.modules if m.startswith("rectified_flow_pytorch")]:
        del sys.modules[name]

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is unavailable in this environment (stubbed by bench.images)")

    tv = types.ModuleType("torchvision")
    tv.utils = types.ModuleType("torchvision.utils")
    tv.utils.save_image = unavailable
    tv.models = types.ModuleType("torchvision.models")
    tv.models.vgg16 = unavailable
    tv.models.VGG16_Weights = types.SimpleNamespace(DEFAULT=None)
    tv.transforms = types.ModuleType("torchvision.transforms")
    sys.modules.update({"torchvision": tv, "torchvision.utils": tv.utils, "torchvision.models": tv.models,
                        "torchvision.transforms": tv.transforms})
    try:
        import rectified_flow_pytorch
    except Exception as e:
        return None, f"does not import: {reason}; with a torchvision stub: {type(e).__name__}: {e}"
    return rectified_flow_pytorch, (f"installed; the venv's torchvision does not import ({reason[:120]}), so a "
                                    "stub stands in for it (the peer's flow, loss and Euler sampler do not use it)")


class _PeerNet(torch.nn.Module):
    """Our ImageUNet behind the peer's calling convention ``model(x, times=t)`` (same time convention)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        return self.net(x, times)


class PeerModel:
    """rectified-flow-pytorch's RectifiedFlow (its MSE flow loss, its torchdiffeq Euler sampler) on our U-Net,
    trained with the same optimizer, batches, gradient clipping and EMA as ours."""

    def __init__(self, rfp: types.ModuleType, x_shape: tuple[int, ...], stage) -> None:
        net_cfg = OmegaConf.to_container(stage.net, resolve=True)
        kind = net_cfg.pop("kind")
        net_cfg["channels"] = tuple(net_cfg["channels"])
        self.rfp, self.x_shape, self.name = rfp, tuple(x_shape), "peer_1rf"
        self.net = _PeerNet(make_network(kind, x_shape, **net_cfg))
        # data is already in [-1, 1]: identity (None) instead of the peer's [0, 1] -> [-1, 1] maps
        self.flow = rfp.RectifiedFlow(self.net, data_normalize_fn=None, data_unnormalize_fn=None,
                                      odeint_kwargs={"method": "euler"}, data_shape=self.x_shape)
        self.ema = EMA(self.net, decay=float(stage.ema_decay))
        self.train_s = 0.0

    def train(self, images: torch.Tensor, steps: int, batch_size: int, lr: float, grad_clip: float,
              schedule: str = "constant") -> None:
        """The peer's loss ``flow(x1)``; Adam, clipping, lr schedule and EMA as in agents.images.trainer.fit."""
        start = time.perf_counter()
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps)) if schedule == "cosine" else None
        self.net.train()
        for _ in range(steps):
            loss = self.flow(images[torch.randint(0, images.shape[0], (batch_size,))])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), grad_clip)
            opt.step()
            if sched is not None:
                sched.step()
            self.ema.update(self.net)
        self.train_s += time.perf_counter() - start

    @torch.no_grad()
    def generate(self, x0: torch.Tensor, steps: int, batch: int = 1000) -> torch.Tensor:
        # the peer's sample() always runs its own .model: wrap the EMA network in a second peer flow
        sampler = self.rfp.RectifiedFlow(self.ema.model, data_normalize_fn=None, data_unnormalize_fn=None,
                                         odeint_kwargs={"method": "euler"}, data_shape=self.x_shape)
        # the peer's `steps` counts time points: K Euler steps need K + 1
        return torch.cat([sampler.sample(batch_size=x0[i : i + batch].shape[0], steps=steps + 1,
                                         noise=x0[i : i + batch]) for i in range(0, x0.shape[0], batch)])


# the peer's own U-Net at about our U-Net's size for 8x8 digits: two resolutions (8x8, 4x4), like our channels
# (32, 64); its default dim_mults (1, 2, 4, 8) would shrink an 8x8 image to 1x1
OWN_UNET = {"dim": 32, "dim_mults": (1, 2)}


class PeerOwnModel:
    """rectified-flow-pytorch end to end (see the module docstring). Images are in [-1, 1] here; the package
    expects [0, 1] data and normalizes it itself, so the data set hands it (x + 1) / 2 and samples come back
    from its [0, 1] as 2 y - 1."""

    name = "peer_own"
    nfe_per_step = 2  # the default sampler is the midpoint rule

    def __init__(self, rfp: types.ModuleType, x_shape: tuple[int, ...], unet: dict | None = None) -> None:
        self.rfp, self.x_shape = rfp, tuple(x_shape)
        self.unet = rfp.Unet(channels=self.x_shape[0], **(unet or OWN_UNET))
        self.flow = rfp.RectifiedFlow(self.unet, data_shape=self.x_shape)
        self.trainer = None
        self.train_s = 0.0

    def num_params(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    def train(self, images: torch.Tensor, steps: int, batch_size: int) -> None:
        """The package's ``Trainer`` for ``steps`` gradient steps of ``batch_size`` images; its per-step prints
        are swallowed, and it saves nothing (results and checkpoints only after the last step, in a temp dir)."""
        start = time.perf_counter()
        data = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            self.trainer = self.rfp.Trainer(
                self.flow, dataset=_Images(data),
                num_train_steps=int(steps), batch_size=int(batch_size), checkpoints_folder=f"{tmp}/ckpt",
                results_folder=f"{tmp}/results", save_results_every=int(steps) + 1,
                checkpoint_every=int(steps) + 1)
            self.trainer()
        self.train_s += time.perf_counter() - start

    def sampler(self):
        """The network that samples: the trainer's EMA copy (as the package's own ``Trainer.sample`` does)."""
        if self.trainer is None:
            return self.flow
        ema = self.trainer.ema_model
        return ema.ema_model if ema is not None else self.flow

    @torch.no_grad()
    def generate(self, x0: torch.Tensor, steps: int, batch: int = 1000) -> torch.Tensor:
        """``steps`` midpoint steps (the package's default sampler; ``steps + 1`` time points) from x0 in [-1, 1]."""
        flow = self.sampler()
        out = [flow.sample(batch_size=x0[i : i + batch].shape[0], steps=steps + 1, noise=x0[i : i + batch],
                           data_shape=self.x_shape) for i in range(0, x0.shape[0], batch)]
        return torch.cat(out) * 2.0 - 1.0


class _Images(torch.utils.data.Dataset):
    """A tensor of images as the map-style data set the package's ``Trainer`` batches (one tensor per item)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]
