"""A minimal training loop for a flow on batches from a callable (toy data, couplings, distillation).

Agents have their own loops with logging, checkpoints and evaluation; this one serves the 2-D demo, the
benchmarks of the core and the tests, so that all of them train the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .flow import RectifiedFlow, ShortcutFlow


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
    """Run ``steps`` Adam updates of ``loss_fn(step) -> (loss, info)``; returns the loss history.

    A ShortcutFlow's EMA target network is updated after every step. The learning rate decays by cosine.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    opt = torch.optim.AdamW(flow.net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    history = []
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, leave=False, mininterval=2.0)
    for i in it:
        loss, _ = loss_fn(i)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss {float(loss)} at step {i}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(flow.net.parameters(), grad_clip)
        opt.step()
        sched.step()
        if isinstance(flow, ShortcutFlow):
            flow.update_ema()
        history.append(float(loss.detach()))
    return history
