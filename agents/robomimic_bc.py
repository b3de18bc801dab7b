"""robomimic's own behavior cloning (``robomimic.algo.bc.BC``) as a peer baseline, behind our policy interface.

``train_robomimic_bc(RobomimicBCConfig(dataset=...))`` builds robomimic's BC exactly as its ``train.py`` does
(``config_factory("bc")``, ``ObsUtils.initialize_obs_utils_with_config``, ``algo_factory``), reads our HDF5
file with robomimic's ``SequenceDataset`` (our files use its layout: ``data/demo_i/obs/state``, ``actions``,
``mask/train``), and runs robomimic's per-batch steps (``process_batch_for_training``,
``postprocess_batch_for_training``, ``train_on_batch``, ``on_epoch_end`` after each pass) from a plain
DataLoader for a fixed number of gradient steps, so the budget (steps x batch size) matches ours. Everything
else (network (1024, 1024) with tanh output, Adam at 1e-4, L2 loss, raw observations) stays robomimic's
default unless the config overrides it.

The result is a :class:`RobomimicBCPolicy` (``kind="robomimic_bc"``, To = Ta = exec = 1) that
``agents.evaluate.rollout_episodes``/``measure_latency`` and stable-baselines3's ``evaluate_policy`` run.

torchvision note: robomimic imports ``torchvision`` at module load (its image encoders). A CUDA build of
torchvision beside a CPU build of torch cannot load its compiled ops (``_C.so`` needs ``libtorch_cuda.so``),
and torchvision >= 0.2x then fails at import with ``RuntimeError: operator torchvision::nms does not exist``
(its ``_meta_registrations`` registers fake kernels for ``nms``/``qnms`` unconditionally). Low-dim BC never
calls those ops, so :func:`import_robomimic` declares the two missing op schemas (no kernels: calling them
still fails loudly) and imports again, with a warning; the real fix is a torchvision build that matches torch.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import h5py
import numpy as np
import torch

from flowpolicy.policy import BasePolicy

_TORCHVISION_FAKE_OPS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


class RobomimicUnavailable(ImportError):
    """robomimic (or a library it imports at load time) cannot be imported here; the message says why."""


def _is_torchvision_ops_error(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and "torchvision::" in str(err) and "does not exist" in str(err)


def _import_torchvision() -> str | None:
    """Import torchvision, declaring its missing compiled-op schemas if needed; returns a note when it was."""
    try:
        import torchvision  # noqa: F401

        return None
    except RuntimeError as err:
        if not _is_torchvision_ops_error(err):
            raise
        first = err
    for name, schema in _TORCHVISION_FAKE_OPS.items():
        if not hasattr(torch.ops.torchvision, name):
            torch.library.define(f"torchvision::{name}", schema)
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]
    import torchvision  # noqa: F401

    note = (f"torchvision {torchvision.__version__} cannot load its compiled ops with torch {torch.__version__} "
            f"({first}); declared the missing op schemas so that robomimic imports (low-dim BC does not use them)."
            " Install a torchvision build that matches torch to remove this.")
    warnings.warn(note, stacklevel=3)
    return note


def import_robomimic() -> SimpleNamespace:
    """robomimic's modules that BC needs: ``config_factory``, ``algo_factory``, ``ObsUtils``, ``FileUtils``,
    ``SequenceDataset``, ``BC``, plus ``note`` (the torchvision workaround, or None). Raises
    :class:`RobomimicUnavailable` naming the original error when they cannot be imported."""
    try:
        note = _import_torchvision()
        with contextlib.redirect_stdout(io.StringIO()):  # "No private macro file found!" on first import
            import robomimic.utils.file_utils as FileUtils
            import robomimic.utils.obs_utils as ObsUtils
            from robomimic.algo import algo_factory
            from robomimic.algo.bc import BC
            from robomimic.config import config_factory
            from robomimic.utils.dataset import SequenceDataset
    except Exception as err:  # noqa: BLE001 - report why the peer is unavailable, with the cause chained
        raise RobomimicUnavailable(f"robomimic's BC cannot be imported here: {type(err).__name__}: {err}") from err
    import robomimic

    return SimpleNamespace(config_factory=config_factory, algo_factory=algo_factory, ObsUtils=ObsUtils,
                           FileUtils=FileUtils, SequenceDataset=SequenceDataset, BC=BC, note=note,
                           version=robomimic.__version__)


@dataclass
class RobomimicBCConfig:
    """robomimic BC on a robomimic-layout HDF5 file.

    Args:
        dataset: HDF5 path. obs_key: the low-dim observation key (``obs/<obs_key>``).
        grad_steps, batch_size: gradient steps and batch size (match ours for a same-budget comparison).
        filter_key: ``mask/<filter_key>`` demos to train on (None: all).
        actor_layer_dims, lr, normalize_obs: None keeps robomimic's defaults ((1024, 1024), 1e-4, False).
    """

    dataset: str
    grad_steps: int = 4000
    batch_size: int = 256
    obs_key: str = "state"
    filter_key: str | None = "train"
    actor_layer_dims: tuple[int, ...] | None = None
    lr: float | None = None
    normalize_obs: bool | None = None
    seed: int = 0
    device: str = "cpu"
    progress: bool = False

    def validate(self) -> None:
        if int(self.grad_steps) < 1 or int(self.batch_size) < 1:
            raise ValueError(f"robomimic_bc grad_steps and batch_size must be >= 1, got {self.grad_steps}, "
                             f"{self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"robomimic_bc lr must be positive, got {self.lr}")


class RobomimicBCPolicy(BasePolicy):
    """Our policy interface around a trained robomimic ``BC`` algo: one action per call (To = Ta = exec = 1).

    ``predict_action_chunk(obs)`` (B, Do) or (B, 1, Do) raw observations -> (B, 1, Da) actions in [-1, 1]
    (robomimic's actor ends in tanh); ``steps`` is ignored. robomimic's observation normalization, when it was
    enabled for training, is applied here with the training statistics. robomimic's networks are a
    submodule (``nets``), so ``.to()``, ``.eval()`` and ``state_dict()`` cover them.
    """

    kind = "robomimic_bc"

    def __init__(self, algo, obs_dim: int, act_dim: int, obs_key: str = "state",
                 obs_normalization_stats: dict | None = None) -> None:
        super().__init__(obs_dim, act_dim, obs_horizon=1, action_horizon=1, exec_horizon=1)
        self.algo = algo
        self.nets = algo.nets
        self.obs_key = obs_key
        self.obs_normalization_stats = obs_normalization_stats
        if obs_normalization_stats is not None:
            st = obs_normalization_stats[obs_key]
            self.register_buffer("obs_mean", torch.as_tensor(np.asarray(st["mean"]), dtype=torch.float32).reshape(-1))
            self.register_buffer("obs_std", torch.as_tensor(np.asarray(st["std"]), dtype=torch.float32).reshape(-1))

    def loss(self, batch: dict):
        raise NotImplementedError("robomimic's BC trains through train_robomimic_bc (robomimic's train_on_batch)")

    def predict_normalized(self, cond: torch.Tensor, steps: int | None = None, deterministic: bool = True,
                           **kw) -> torch.Tensor:
        # cond is the raw observation: the base class's normalizer is the identity for this policy
        x = cond
        if self.obs_normalization_stats is not None:
            x = (x - self.obs_mean) / self.obs_std  # robomimic's ObsUtils.normalize_obs, on tensors
        self.algo.nets.eval()  # robomimic's get_action asserts eval mode
        actions = self.algo.get_action(obs_dict={self.obs_key: x})
        return actions.reshape(cond.shape[0], 1, self.act_dim)


def _robomimic_config(rm, cfg: RobomimicBCConfig):
    config = rm.config_factory("bc")
    with config.values_unlocked():
        config.train.data = str(cfg.dataset)
        config.train.batch_size = int(cfg.batch_size)
        config.train.seed = int(cfg.seed)
        config.train.cuda = str(cfg.device).startswith("cuda")
        config.train.hdf5_filter_key = cfg.filter_key
        config.train.dataset_keys = ("actions",)
        config.train.hdf5_load_next_obs = False
        config.observation.modalities.obs.low_dim = [cfg.obs_key]
        if cfg.actor_layer_dims is not None:
            config.algo.actor_layer_dims = tuple(int(d) for d in cfg.actor_layer_dims)
        if cfg.lr is not None:
            config.algo.optim_params.policy.learning_rate.initial = float(cfg.lr)
        if cfg.normalize_obs is not None:
            config.train.hdf5_normalize_obs = bool(cfg.normalize_obs)
    return config


def _check_file(path: str, obs_key: str) -> None:
    with h5py.File(path, "r") as f:
        demos = list(f.get("data", {}).keys())
        if not demos:
            raise ValueError(f"{path}: no data/demo_* groups (not a robomimic-layout file)")
        if f"data/{demos[0]}/obs/{obs_key}" not in f:
            keys = sorted(f[f"data/{demos[0]}/obs"].keys()) if f"data/{demos[0]}/obs" in f else []
            raise ValueError(f"{path}: no data/{demos[0]}/obs/{obs_key} (obs keys: {keys})")


def train_robomimic_bc(cfg: RobomimicBCConfig) -> tuple[RobomimicBCPolicy, dict[str, Any]]:
    """Train robomimic's BC for ``cfg.grad_steps`` gradient steps; returns (policy in eval mode, info).

    ``info``: ``train_s``, ``final_loss`` (mean of the last 50 losses), ``epochs``, ``algo`` (class name),
    ``robomimic`` (version), ``config`` (the robomimic settings that differ by task: actor dims, lr, batch,
    normalization), ``note`` (the torchvision workaround, or None).
    """
    cfg.validate()
    rm = import_robomimic()
    _check_file(cfg.dataset, cfg.obs_key)
    config = _robomimic_config(rm, cfg)
    with contextlib.ExitStack() as quiet:
        if not cfg.progress:  # robomimic prints its obs spec and dataset-loading progress bars
            quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        rm.ObsUtils.initialize_obs_utils_with_config(config)  # robomimic's global obs-modality registry
        shape_meta = rm.FileUtils.get_shape_metadata_from_dataset(cfg.dataset, all_obs_keys=[cfg.obs_key])
        dataset = rm.SequenceDataset(
            hdf5_path=cfg.dataset, obs_keys=[cfg.obs_key], dataset_keys=config.train.dataset_keys,
            frame_stack=config.train.frame_stack, seq_length=config.train.seq_length,
            pad_frame_stack=config.train.pad_frame_stack, pad_seq_length=config.train.pad_seq_length,
            goal_mode=None, hdf5_cache_mode=config.train.hdf5_cache_mode, hdf5_use_swmr=config.train.hdf5_use_swmr,
            hdf5_normalize_obs=config.train.hdf5_normalize_obs, filter_by_attribute=cfg.filter_key,
            load_next_obs=False)
    stats = dataset.get_obs_normalization_stats() if config.train.hdf5_normalize_obs else None
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    algo = rm.algo_factory("bc", config, obs_key_shapes=OrderedDict(shape_meta["all_shapes"]),
                           ac_dim=int(shape_meta["ac_dim"]), device=device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=0,
                                         drop_last=len(dataset) >= cfg.batch_size,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    losses: list[float] = []
    epoch, step = 1, 0
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.grad_steps, desc="robomimic BC", disable=not cfg.progress, mininterval=1.0)
    algo.set_train()
    while step < cfg.grad_steps:
        for batch in loader:
            batch = algo.process_batch_for_training(batch)
            batch = algo.postprocess_batch_for_training(batch, obs_normalization_stats=stats)
            info = algo.train_on_batch(batch, epoch, validate=False)
            loss = float(info["losses"]["action_loss"])
            if not np.isfinite(loss):
                raise FloatingPointError(f"robomimic BC: non-finite loss ({loss}) at step {step}")
            losses.append(loss)
            step += 1
            bar.update(1)
            if step >= cfg.grad_steps:
                break
        algo.on_epoch_end(epoch)
        epoch += 1
    bar.close()
    train_s = time.perf_counter() - t0
    policy = RobomimicBCPolicy(algo, obs_dim=int(np.prod(shape_meta["all_shapes"][cfg.obs_key])),
                               act_dim=int(shape_meta["ac_dim"]), obs_key=cfg.obs_key, obs_normalization_stats=stats)
    policy.to(device).eval()
    out = {"train_s": train_s, "final_loss": float(np.mean(losses[-50:])), "steps": step, "epochs": epoch - 1,
           "num_samples": len(dataset), "algo": type(algo).__name__, "robomimic": rm.version, "note": rm.note,
           "config": {"actor_layer_dims": list(config.algo.actor_layer_dims),
                      "lr": float(config.algo.optim_params.policy.learning_rate.initial),
                      "optimizer": config.algo.optim_params.policy.optimizer_type,
                      "batch_size": int(config.train.batch_size),
                      "normalize_obs": bool(config.train.hdf5_normalize_obs), **asdict(cfg)}}
    return policy, out
