"""Multi-process training on PyTorch's own stack: ``torchrun`` + ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

    torchrun --nproc_per_node=2 train.py stage=pretrain                   # 2 processes, this machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=host0:29500 train.py stage=pretrain          # 2 nodes (a shared filesystem)

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; :func:`init` reads them
and joins the process group. Without them (``python train.py``) everything is one process, exactly as before:
every helper here is then a no-op returning its input.

Conventions every distributed stage follows:

* rank 0 alone writes checkpoints, logs, videos and result files, and holds the run directory's lock;
* every rank draws the same global random numbers (same seed, same generator state) and keeps its own slice
  (:func:`flowpolicy.rng.shard`), so N ranks with a global batch B compute the same update as one process
  with batch B;
* a rank that dies ends the job with an error (torchrun stops the others; a peer's closed connection raises
  in every collective), and collectives that wait on a stuck rank time out after ``FLOWPOLICY_DIST_TIMEOUT``
  seconds (default 1800, as rank 0 may first collect demos while the others wait).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_differs(self, device: str) -> bool:
        """True when this rank uses another device string than ``device`` (``cuda`` -> ``cuda:LOCAL_RANK``)."""
        return self.enabled and str(device).startswith("cuda")


_INFO = DistInfo()


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher) with WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_s() -> float:
    return float(os.environ.get("FLOWPOLICY_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


def init(device: str = "cpu") -> DistInfo:
    """Join the process group that torchrun describes (no-op for one process); returns this rank's info.

    The backend is NCCL for CUDA devices and gloo otherwise. On CUDA each rank uses ``cuda:LOCAL_RANK``
    (see :func:`device_for`)."""
    global _INFO
    if not launched():
        _INFO = DistInfo()
        return _INFO
    if not tdist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    # on CUDA, CUDA tensors go through NCCL and the small CPU tensors (flags, counts, statistics) through gloo
    backend = "cpu:gloo,cuda:nccl" if str(device).startswith("cuda") else "gloo"
    if not tdist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if "nccl" in backend:
            torch.cuda.set_device(local)
        tdist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s()))
    _INFO = DistInfo(rank=tdist.get_rank(), world_size=tdist.get_world_size(),
                     local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=tdist.get_backend())
    return _INFO


def info() -> DistInfo:
    """This process's rank and world size (one process until :func:`init` joined a group)."""
    return _INFO


def device_for(device: str) -> str:
    """``cuda`` (or ``cuda:k``) becomes ``cuda:LOCAL_RANK`` under a multi-process launch: one GPU per process.
    Other devices are unchanged."""
    if _INFO.enabled and str(device).startswith("cuda"):
        return f"cuda:{_INFO.local_rank}"
    return str(device)


def shutdown(wait: bool = True) -> None:
    """Leave the process group. ``wait``: first meet every rank in a barrier (the normal end: a rank that
    destroys its group while a peer's last collective is still in flight can abort at exit); pass False on an
    error path, where the peers may be inside another collective."""
    global _INFO
    if tdist.is_available() and tdist.is_initialized():
        if wait:
            try:
                tdist.barrier()
            except Exception:  # noqa: BLE001 - a dead peer: leave anyway
                pass
        tdist.destroy_process_group()
    _INFO = DistInfo()


def barrier() -> None:
    if _INFO.enabled:
        tdist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a CPU copy for gloo); returns the result on ``x``'s device."""
    if not _INFO.enabled:
        return x
    y = x.detach().clone()
    if "nccl" not in str(_INFO.backend) and y.device.type != "cpu":
        y = y.cpu()
    tdist.all_reduce(y, op=tdist.ReduceOp.SUM)
    return y.to(x.device)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(x) / _INFO.world_size if _INFO.enabled else x


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. Ctrl-C seen by one process)."""
    if not _INFO.enabled:
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0]))[0] > 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects: paths, small dicts)."""
    if not _INFO.enabled:
        return obj
    box = [obj if _INFO.rank == src else None]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def average_gradients(params, scale: float | None = None) -> None:
    """Average (or, with ``scale=1``, sum) the ``.grad`` of ``params`` over ranks in one flat all-reduce.

    Every rank must pass the same parameters with gradients present (a rank whose share of a minibatch is
    empty still backpropagates a zero loss). A no-op for one process."""
    if not _INFO.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = all_reduce_sum(flat) * (1.0 / _INFO.world_size if scale is None else scale)
    i = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[i:i + n].view_as(g))
        i += n


def shard_range(n: int, rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n items (the first n % world ranks get one more)."""
    rank = _INFO.rank if rank is None else rank
    world = _INFO.world_size if world is None else world
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (same shape on every rank) concatenated along dim 0, in rank order."""
    if not _INFO.enabled:
        return x
    y = x.detach().contiguous()
    dev = y.device
    if "nccl" not in str(_INFO.backend) and dev.type != "cpu":
        y = y.cpu()
    parts = [torch.empty_like(y) for _ in range(_INFO.world_size)]
    tdist.all_gather(parts, y)
    return torch.cat(parts).to(dev)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (one element for one process)."""
    if not _INFO.enabled:
        return [obj]
    out: list[Any] = [None] * _INFO.world_size
    tdist.all_gather_object(out, obj)
    return out


def sum_gradients(params) -> None:
    """Sum the ``.grad`` of ``params`` over ranks (each rank's loss is its share of a global mean)."""
    average_gradients(params, scale=1.0)


def exit_process(code: int = 0) -> None:
    """End a torchrun worker after :func:`shutdown`: flush output and logs, then ``os._exit``.

    Observed with gloo (torch 2.13, about one run in twenty on a loaded 2-core machine): a worker that had
    finished and left its process group aborted during interpreter teardown ("terminate called without an
    active exception", from a communication thread's static destructor), and torchrun then reported the whole
    job as failed. Skipping the teardown avoids that; nothing is left to clean up at this point."""
    import logging
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream
            pass
    logging.shutdown()
    os._exit(int(code))
