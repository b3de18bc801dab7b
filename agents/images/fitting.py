"""Building and fitting image generators: :class:`TrainedModel`, :func:`build_flow`, the Adam loop
:func:`fit` and the methods' trainers (:func:`train_base`, :func:`train_reflow`, :func:`train_distilled`).
:mod:`agents.images.trainer` re-exports all of it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from flowpolicy import (
    EMA,
    RectifiedFlow,
    ShortcutFlow,
    distillation_loss,
    make_couplings,
    make_network,
    make_time_sampler,
)
from flowpolicy import rng as frng

from .. import distributed
from ..loop import (
    Callback,
    EMAUpdate,
    LogScalars,
    NonFiniteGuard,
    ProgressBar,
    Step,
    StopOnCtrlC,
    SupervisedLoop,
    every,
)
from ..tblog import Logger
from .data import ImageData

METHODS = ("rf", "reflow", "shortcut")
CHECKPOINT_FORMAT = 1  # the image-only format before generators used agents.checkpoint_save (still loads)


class _SamplingView(RectifiedFlow):
    """A RectifiedFlow around a (frozen EMA) network whose noise is drawn on the CPU generator and moved to
    the network's device: seeded results do not depend on the device, and ``make_couplings`` (which draws
    noise on the CPU when there is no condition) also works on a GPU."""

    def noise(self, batch: int, device="cpu", generator=None) -> torch.Tensor:
        dev = next(self.net.parameters()).device
        return torch.randn((batch, *self.x_shape), generator=generator).to(dev)


@dataclass
class TrainedModel:
    """A trained generator: ``flow`` holds the training weights, ``ema`` the weights every sample uses."""

    name: str
    flow: RectifiedFlow
    ema: EMA
    spec: dict  # what rebuilds it: flow class and settings, network settings
    train_s: float = 0.0
    info: dict = field(default_factory=dict)
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None  # the (x0, x1) couplings it was trained on, if any

    @torch.no_grad()
    def generate(self, x0: torch.Tensor, steps: int, batch: int = 1000) -> torch.Tensor:
        """Images (N, C, H, W) from noise x0 (N, C, H, W) with ``steps`` Euler steps of the EMA network."""
        dev = next(self.ema.model.parameters()).device
        out = [self.flow.sample(steps=steps, x0=x0[i : i + batch].to(dev), net=self.ema.model)
               for i in range(0, x0.shape[0], batch)]
        return torch.cat(out)

    def sampling_flow(self) -> RectifiedFlow:
        """A RectifiedFlow over the EMA network (for ``make_couplings`` and ``straightness``)."""
        return _SamplingView(self.ema.model, self.flow.x_shape, loss=self.flow.loss_kind, huber_c=self.flow.huber_c)


# --- building blocks -----------------------------------------------------------------------------------


def build_flow(method: str, x_shape: tuple[int, ...], stage: DictConfig) -> tuple[RectifiedFlow, dict]:
    """The flow for ``method`` with a fresh U-Net; returns (flow, spec) where spec rebuilds it."""
    if method not in METHODS:
        raise ValueError(f"unknown image method {method!r}; choose from {METHODS}")
    net_cfg = OmegaConf.to_container(stage.net, resolve=True)
    kind = net_cfg.pop("kind", "unet2d")
    if "channels" in net_cfg:
        net_cfg["channels"] = tuple(net_cfg["channels"])
    is_shortcut = method == "shortcut"
    net = make_network(kind, x_shape, cond_dim=0, step_input=is_shortcut, **net_cfg)
    loss, huber_c = _loss_settings(stage, stage, x_shape)
    sampler_name = str(stage.get("time_sampler", "uniform"))
    sampler = make_time_sampler(sampler_name)
    spec = {"net": {"kind": kind, "step_input": is_shortcut, **net_cfg}, "x_shape": list(x_shape),
            "loss": loss, "huber_c": huber_c, "time_sampler": sampler_name}
    if is_shortcut:
        sc = stage.shortcut
        flow = ShortcutFlow(net, x_shape, max_level=int(sc.max_level), sc_fraction=float(sc.sc_fraction),
                            ema_decay=float(stage.ema_decay), time_sampler=sampler, loss=loss, huber_c=huber_c)
        spec.update({"class": "ShortcutFlow", "max_level": int(sc.max_level), "sc_fraction": float(sc.sc_fraction)})
    else:
        flow = RectifiedFlow(net, x_shape, time_sampler=sampler, loss=loss, huber_c=huber_c)
        spec["class"] = "RectifiedFlow"
    if "channels" in spec["net"]:
        spec["net"]["channels"] = list(spec["net"]["channels"])
    return flow, spec


class _Stopped(Exception):
    """Ctrl-C inside :func:`fit`: ``model`` stopped after ``step`` optimizer steps (run() saves it)."""

    def __init__(self, model: TrainedModel, step: int) -> None:
        super().__init__(f"{model.name} stopped at step {step}")
        self.model, self.step = model, step


class _RankSync(Callback):
    """Data-parallel image training (torchrun): the global mean loss and "any rank saw Ctrl-C" in one
    all-reduce after each loss, and the gradients averaged over ranks before clipping."""

    def __init__(self, params) -> None:
        self.params, self.stop = list(params), False

    def on_loss(self, step: Step) -> None:
        from ..runfiles import stop_requested

        red = distributed.all_reduce_sum(torch.stack([step.value.detach().float().cpu(),
                                                      torch.tensor(float(stop_requested()))]))
        step.value, self.stop = red[0] / distributed.info().world_size, bool(red[1] > 0)

    def on_backward(self, step: Step) -> None:
        distributed.average_gradients(self.params)


def _same_rng_as_rank0(device: torch.device) -> None:
    """Give every rank rank 0's global RNG state (CPU, and the CUDA device's): the ranks then draw the same
    global batches and noise, whatever else rank 0 alone drew before (classifier, evaluation)."""
    states = distributed.broadcast_object(
        (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None))
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


class _Logger(Logger):
    """The TensorBoard logger with one global step across the models of a run."""

    def __init__(self, log_dir: Path | None) -> None:
        super().__init__(log_dir)
        self.step = 0

    def scalar(self, tag: str, value: float, step: int | None = None) -> None:
        self.log({tag: value}, self.step if step is None else step)


def fit(
    model: TrainedModel,
    loss_fn: Callable[[], tuple[torch.Tensor, dict]],
    steps: int,
    lr: float,
    grad_clip: float | None = 1.0,
    logger: _Logger | None = None,
    log_every: int = 50,
    progress: bool = True,
    schedule: str = "constant",
) -> TrainedModel:
    """Adam on ``model.flow.net`` for ``steps`` steps of ``loss_fn() -> (loss, info)``, EMA after each step.

    ``schedule``: ``constant`` learning rate or ``cosine`` decay to 0. Logs ``train/loss``, ``train/lr`` and
    each info entry ``loss/<x>`` as ``train/<x>``; adds the wall time to ``train_s``.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown lr schedule {schedule!r}; choose 'constant' or 'cosine'")
    start = time.perf_counter()
    net = model.flow.net
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps)) if schedule == "cosine" else None
    base = logger.step if logger is not None else 0  # the logger's global step before this model

    def scalars(s: Step) -> dict:
        return {"train/loss": float(s.value), "train/lr": opt.param_groups[0]["lr"],
                **{"train/" + k.split("/", 1)[-1]: v for k, v in s.info.items()}}

    # torchrun: each rank computes the loss on its rows of the global batch (and of the global noise draws)
    dist = distributed.info()
    sync = None
    if dist.enabled:
        _same_rng_as_rank0(next(net.parameters()).device)
        sync = _RankSync(net.parameters())
        progress = progress and dist.is_main
        inner = loss_fn

        def loss_fn():
            with frng.shard(dist.rank, dist.world_size, unseeded=True):
                return inner()
    # the shortcut model's EMA is its target network too (train_base), so EMAUpdate covers both
    callbacks = [*([sync] if sync else []),
        NonFiniteGuard(lambda s: f"{model.name}: non-finite loss {float(s.value)} at step {s.index}; lower stage.lr"),
        EMAUpdate(model.ema, net),
        LogScalars(logger, scalars, every(log_every, steps, first=True), at=lambda s: base + s.done),
        ProgressBar(steps, model.name, disable=not progress, leave=False, postfix_every=log_every),
        # Ctrl-C: stop after this step (every rank, when any saw it); run() saves this model once
        StopOnCtrlC(lambda: sync.stop) if sync else StopOnCtrlC(),
    ]
    loop = SupervisedLoop(net.parameters(), opt, lambda i: loss_fn(), scheduler=sched, grad_clip=grad_clip or None,
                          callbacks=callbacks)
    done = loop.run(steps)
    if logger is not None:
        logger.step = base + done
    net.eval()
    model.train_s += time.perf_counter() - start
    if loop.stopped:
        raise _Stopped(model, done)
    return model


def _batches(n: int, batch_size: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """Uniform random minibatch indices (global RNG, so a seeded run is reproducible); under torchrun every
    rank draws the same ``batch_size`` indices and keeps its share."""
    def draw() -> torch.Tensor:
        idx = torch.randint(0, n, (batch_size,))
        start, stop = distributed.shard_range(batch_size)
        return idx[start:stop].to(device)

    return draw


def train_base(name: str, method: str, data: ImageData, stage: DictConfig, device: torch.device,
               logger: _Logger | None = None, progress: bool = True, restore: Restore | None = None) -> TrainedModel:
    """1-RF (``method='rf'``) or shortcut model (``'shortcut'``) trained on the data for ``stage.grad_steps``."""
    flow, spec = build_flow(method, data.image_shape, stage)
    flow.to(device)
    # the shortcut model's own EMA (its self-consistency targets) doubles as its sampling EMA
    ema = flow.ema if isinstance(flow, ShortcutFlow) else EMA(flow.net, decay=float(stage.ema_decay))
    model = TrainedModel(name, flow, ema, spec)
    images = data.images.to(device)
    draw = _batches(len(data), int(stage.batch_size), device)
    return _fit_section(model, lambda: flow.loss(images[draw()]), int(stage.grad_steps), stage, stage, logger,
                        progress, restore)


# ``restore(model) -> bool``: loads a finished model's weights saved by an earlier run into ``model`` (True), or
# leaves it to be trained (False); agents.images.trainer passes one to resume a run section by section
Restore = Callable[[TrainedModel], bool]


def _fit_section(model: TrainedModel, loss_fn, steps: int, section: DictConfig, stage: DictConfig,
                 logger: _Logger | None, progress: bool, restore: Restore | None = None) -> TrainedModel:
    """``fit`` with the section's lr and lr_schedule, falling back to the stage's (or ``restore``'s weights)."""
    if restore is not None and restore(model):
        if logger is not None:
            logger.step += steps  # TensorBoard steps continue as in the run that trained it
        return model
    return fit(model, loss_fn, steps, float(section.get("lr") or stage.lr), stage.get("grad_clip", 1.0), logger,
               int(stage.get("log_every", 50)), progress,
               str(section.get("lr_schedule") or stage.get("lr_schedule", "constant")))


def _couplings(model: TrainedModel, section: DictConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(x0, x1_hat, seconds): ``section.couplings`` pairs from ``model``'s EMA ODE, solved with
    ``section.couplings_steps`` steps of ``section.couplings_solver``."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    x0, x1 = make_couplings(model.sampling_flow(), int(section.couplings), steps=int(section.couplings_steps),
                            solver=str(section.get("couplings_solver", "euler")), batch_size=1000, generator=g)
    return x0, x1, time.perf_counter() - start


def _loss_settings(section: DictConfig, stage: DictConfig, x_shape: tuple[int, ...]) -> tuple[str, float | None]:
    """(loss, huber_c) of a training section, falling back to the stage's. ``pseudo_huber`` without an explicit
    ``huber_c`` uses Lee et al.'s c = 0.00054 * dim."""
    loss = str(section.get("loss") or stage.get("loss", "mse"))
    huber_c = section.get("huber_c") or stage.get("huber_c")
    if loss == "pseudo_huber" and huber_c is None:
        huber_c = 0.00054 * math.prod(x_shape)
    return loss, None if huber_c is None else float(huber_c)


def _child(name: str, parent: TrainedModel, stage: DictConfig, section: DictConfig) -> TrainedModel:
    """A RectifiedFlow initialized from ``parent``'s EMA weights; ``section`` may override loss/time sampler."""
    net = copy.deepcopy(parent.ema.model).train()
    for p in net.parameters():
        p.requires_grad_(True)
    loss, huber_c = _loss_settings(section, stage, parent.flow.x_shape)
    sampler_name = str(section.get("time_sampler") or stage.get("time_sampler", "uniform"))
    flow = RectifiedFlow(net, parent.flow.x_shape, time_sampler=make_time_sampler(sampler_name), loss=loss,
                         huber_c=huber_c)
    spec = {**parent.spec, "loss": loss, "huber_c": huber_c, "time_sampler": sampler_name}
    return TrainedModel(name, flow, EMA(net, decay=float(stage.ema_decay)), spec)


def train_reflow(base: TrainedModel, stage: DictConfig, seed: int, logger: _Logger | None = None,
                 progress: bool = True, restore: Restore | None = None) -> TrainedModel:
    """2-RF: couplings from ``base`` (the 1-RF), then flow matching on the fixed pairs.

    ``train_s`` includes the time to generate the couplings (recorded separately in ``info``).
    """
    r = stage.reflow
    x0, x1, coupling_s = _couplings(base, r, seed)
    model = _child("2rf", base, stage, r)
    model.train_s, model.info["couplings_s"] = coupling_s, coupling_s
    model.pairs = (x0, x1)
    draw = _batches(x0.shape[0], int(stage.batch_size), x0.device)

    def loss_fn():
        idx = draw()
        return model.flow.loss(x1[idx], x0=x0[idx])

    return _fit_section(model, loss_fn, int(r.grad_steps), r, stage, logger, progress, restore)


def distill_ks(stage: DictConfig) -> list[int]:
    """The distillation step counts: ``stage.distill.k`` as an int or a list (one student each)."""
    k = stage.distill.k
    ks = [int(v) for v in (k if OmegaConf.is_list(k) or isinstance(k, list | tuple) else [k])]
    if not ks or any(v < 1 for v in ks):
        raise ValueError(f"stage.distill.k must be positive step counts, got {k}")
    return ks


def train_distilled(teacher: TrainedModel, stage: DictConfig, seed: int, logger: _Logger | None = None,
                    progress: bool = True, restore: Restore | None = None) -> list[TrainedModel]:
    """K-step distillations of ``teacher``: one student ``<teacher>_distill_k<K>`` per K in ``stage.distill.k``,
    initialized from the teacher's EMA weights, all trained on the same pairs.

    ``stage.distill.pairs``: ``teacher`` draws new couplings from the teacher's own ODE (Liu et al.'s recipe);
    ``reflow`` reuses the couplings the teacher (a 2-RF) was itself trained on, i.e. the 1-RF's ODE pairs,
    which the 2-RF only approximates: no new ODE solves and, on digits, a better 1-step student. The
    couplings' time is counted in each student's ``train_s`` and recorded as ``info["couplings_s"]``.
    """
    dcfg = stage.distill
    ks = distill_ks(stage)
    source = str(dcfg.get("pairs", "teacher"))
    if source == "reflow":
        if teacher.pairs is None:
            raise ValueError(f"distill.pairs=reflow needs a teacher trained on couplings; {teacher.name} was not")
        (x0, x1), coupling_s = teacher.pairs, 0.0
    elif source == "teacher":
        x0, x1, coupling_s = _couplings(teacher, dcfg, seed + 1)
    else:
        raise ValueError(f"unknown distill.pairs {source!r}; choose 'teacher' or 'reflow'")
    students = []
    for k in ks:
        model = _child(f"{teacher.name}_distill_k{k}", teacher, stage, dcfg)
        model.train_s = coupling_s
        model.info.update({"couplings_s": coupling_s, "k": k, "pairs": source})
        draw = _batches(x0.shape[0], int(stage.batch_size), x0.device)

        def loss_fn(model=model, draw=draw, k=k):
            idx = draw()
            return distillation_loss(model.flow, x0[idx], x1[idx], steps=k)

        students.append(_fit_section(model, loss_fn, int(dcfg.grad_steps), dcfg, stage, logger, progress, restore))
    return students
