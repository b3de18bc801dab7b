"""The one supervised gradient loop: :class:`SupervisedLoop` and its callbacks.

Every supervised stage trains through it: behavior-cloning pretraining (:mod:`agents.pretrain`), policy
reflow (:mod:`agents.policy_reflow`), policy alignment (:mod:`agents.align_train`), image generators
(:mod:`agents.images.fitting`) and image alignment (:mod:`agents.images.align`); :func:`fit` is the plain
version for toy data, benchmarks of the core and tests. PPO keeps its own loop (:mod:`agents.finetune`).

One step, in this order (the order fixes the numerics and the random draws)::

    loss, info = loss_fn(index)          # the stage draws its batch and noise here
    on_loss(step)                        # e.g. a distributed mean loss, the non-finite guard
    zero_grad; loss.backward()
    on_backward(step)                    # e.g. averaging the gradients over ranks
    grad_norm = clip(params, grad_clip)  # only when grad_clip is not None (0: measured, not clipped)
    on_grad(step)                        # e.g. the non-finite gradient guard
    optimizer.step(); scheduler.step()
    on_update(step)                      # EMA weights, the shortcut model's target network
    on_step_end(step)                    # progress, logging, validation, evaluation, checkpoints, Ctrl-C

A callback sets ``step.stop`` to end the loop after the current step (Ctrl-C), or raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flowpolicy.flow import RectifiedFlow, ShortcutFlow

from .runfiles import stop_requested


@dataclass
class Step:
    """One update as the callbacks see it."""

    index: int                          # 0-based index of this update
    loss: torch.Tensor
    info: dict
    value: torch.Tensor                 # the loss value checked and logged (the global mean under DDP)
    grad_norm: torch.Tensor | None = None
    stop: bool = False                  # a callback asks to end the loop after this step
    tags: list[str] = field(default_factory=lambda: ["last"])  # checkpoint tags earned (evaluation: "best")

    @property
    def done(self) -> int:
        """Updates completed once this one is."""
        return self.index + 1


class Callback:
    """Hooks of :class:`SupervisedLoop`; override the ones needed."""

    def on_start(self, loop: SupervisedLoop) -> None: ...

    def on_loss(self, step: Step) -> None: ...

    def on_backward(self, step: Step) -> None: ...

    def on_grad(self, step: Step) -> None: ...

    def on_update(self, step: Step) -> None: ...

    def on_step_end(self, step: Step) -> None: ...

    def on_end(self, loop: SupervisedLoop) -> None: ...


class SupervisedLoop:
    """``optimizer`` steps on ``loss_fn(index) -> (loss, info)`` with optional clipping, a scheduler and
    callbacks. :meth:`run` trains from update ``start`` to ``steps`` and returns the updates completed."""

    def __init__(self, params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[int], tuple[torch.Tensor, dict]], *, scheduler=None,
                 grad_clip: float | None = None, callbacks: Sequence[Callback] = ()) -> None:
        if grad_clip is not None and not grad_clip >= 0:  # a negative max-norm would flip the gradients
            raise ValueError(f"grad_clip must be >= 0 (the max gradient norm; 0: no clipping), got {grad_clip}")
        self.params = list(params)
        self.optimizer, self.scheduler = optimizer, scheduler
        # 0 means no clipping (as fit() and image training read it), with the gradient norm still measured
        self.loss_fn, self.grad_clip = loss_fn, (float("inf") if grad_clip == 0 else grad_clip)
        self.callbacks = list(callbacks)
        self.stopped = False  # True when a callback ended the loop early

    def run(self, steps: int, start: int = 0) -> int:
        cbs = self.callbacks
        for cb in cbs:
            cb.on_start(self)
        index = start
        try:
            while index < steps:
                loss, info = self.loss_fn(index)
                step = Step(index, loss, info, loss.detach())
                for cb in cbs:
                    cb.on_loss(step)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for cb in cbs:
                    cb.on_backward(step)
                if self.grad_clip is not None:
                    step.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
                for cb in cbs:
                    cb.on_grad(step)
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                for cb in cbs:
                    cb.on_update(step)
                for cb in cbs:
                    cb.on_step_end(step)
                index += 1
                if step.stop:
                    self.stopped = True
                    break
        finally:
            for cb in cbs:
                cb.on_end(self)
        return index


# --- when a periodic callback fires ---------------------------------------------------------------------------


def every(n: int, total: int | None = None, first: bool = False) -> Callable[[Step], bool]:
    """Fires after every ``n``-th update (``first``: on the first update and every ``n`` after it) and after
    update ``total``."""
    if first:
        return lambda s: s.index % n == 0 or s.done == total
    return lambda s: s.done % n == 0 or s.done == total


# --- callbacks ------------------------------------------------------------------------------------------------


class NonFiniteGuard(Callback):
    """Raises FloatingPointError on a non-finite loss (``loss_message(step)``) and, when ``grad_message`` is
    given, on a non-finite gradient norm (before the optimizer step, so the weights stay finite)."""

    def __init__(self, loss_message: Callable[[Step], str],
                 grad_message: Callable[[Step], str] | None = None) -> None:
        self.loss_message, self.grad_message = loss_message, grad_message

    def on_loss(self, step: Step) -> None:
        if not torch.isfinite(step.value):
            raise FloatingPointError(self.loss_message(step))

    def on_grad(self, step: Step) -> None:
        if self.grad_message is not None and not torch.isfinite(step.grad_norm):
            raise FloatingPointError(self.grad_message(step))


class EMAUpdate(Callback):
    """``ema.update(source)`` after every update (the EMA weights used for evaluation and sampling)."""

    def __init__(self, ema, source: torch.nn.Module) -> None:
        self.ema, self.source = ema, source

    def on_update(self, step: Step) -> None:
        self.ema.update(self.source)


class ShortcutTarget(Callback):
    """A shortcut model's EMA target network follows its weights after every update (no-op for other flows)."""

    def __init__(self, flow: RectifiedFlow | None) -> None:
        self.flow = flow if isinstance(flow, ShortcutFlow) else None

    def on_update(self, step: Step) -> None:
        if self.flow is not None:
            self.flow.update_ema()


class StopOnCtrlC(Callback):
    """Ctrl-C (see :class:`agents.runfiles.StopOnInterrupt`): finish the step, then ``on_stop(step)`` (which
    may save and raise) or end the loop. ``requested`` replaces the process-wide flag (e.g. any rank's)."""

    def __init__(self, requested: Callable[[], bool] = stop_requested,
                 on_stop: Callable[[Step], None] | None = None) -> None:
        self.requested, self.on_stop = requested, on_stop

    def on_step_end(self, step: Step) -> None:
        if self.requested():
            step.stop = True
            if self.on_stop is not None:
                self.on_stop(step)


class ProgressBar(Callback):
    """A tqdm bar over the updates, with the loss as postfix every ``postfix_every`` updates."""

    def __init__(self, total: int, desc: str, *, initial: int = 0, disable: bool = False, leave: bool = True,
                 postfix_every: int = 50) -> None:
        self.kw = dict(total=total, initial=initial, desc=desc, disable=disable, leave=leave, mininterval=1.0)
        self.postfix_every = postfix_every
        self.bar = None

    def on_start(self, loop: SupervisedLoop) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(**self.kw)

    def on_step_end(self, step: Step) -> None:
        self.bar.update(1)
        if step.done % self.postfix_every == 0:
            self.bar.set_postfix(loss=f"{float(step.value):.4f}")

    def on_end(self, loop: SupervisedLoop) -> None:
        if self.bar is not None:
            self.bar.close()


class History(Callback):
    """``records``: ``record(step)`` of every update (loss curves returned to callers)."""

    def __init__(self, record: Callable[[Step], Any]) -> None:
        self.record = record
        self.records: list = []

    def on_step_end(self, step: Step) -> None:
        self.records.append(self.record(step))


class LogScalars(Callback):
    """``logger.log(scalars(step), at(step))`` when ``when(step)`` (an :class:`agents.tblog.Logger`)."""

    def __init__(self, logger, scalars: Callable[[Step], dict], when: Callable[[Step], bool],
                 at: Callable[[Step], int] = lambda s: s.done) -> None:
        self.logger, self.scalars, self.when, self.at = logger, scalars, when, at

    def on_step_end(self, step: Step) -> None:
        if self.logger is not None and self.when(step):
            self.logger.log(self.scalars(step), self.at(step))


class Periodic(Callback):
    """``fn(step)`` when ``when(step)``: validation, evaluation (which may add the ``best`` tag to
    ``step.tags``) or a checkpoint (``when`` may also look at the tags)."""

    def __init__(self, fn: Callable[[Step], None], when: Callable[[Step], bool]) -> None:
        self.fn, self.when = fn, when

    def on_step_end(self, step: Step) -> None:
        if self.when(step):
            self.fn(step)


# --- the plain loop -------------------------------------------------------------------------------------------


def fit(
    flow: RectifiedFlow,
    loss_fn: Callable[[int], tuple[torch.Tensor, dict]],
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    progress: bool = False,
    desc: str = "fit",
) -> list[float]:
    """Run ``steps`` AdamW updates of ``flow.net`` on ``loss_fn(step) -> (loss, info)``; returns the loss history.

    A ShortcutFlow's EMA target network is updated after every step. The learning rate decays by cosine to 5%.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    opt = torch.optim.AdamW(flow.net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    history = History(lambda s: float(s.value))
    callbacks = [NonFiniteGuard(lambda s: f"{desc}: non-finite loss {float(s.value)} at step {s.index}"),
                 ShortcutTarget(flow), history]
    if progress:
        callbacks.append(ProgressBar(steps, desc, leave=False))
    SupervisedLoop(flow.net.parameters(), opt, loss_fn, scheduler=sched, grad_clip=grad_clip or None,
                   callbacks=callbacks).run(steps)
    return history.records
