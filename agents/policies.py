"""Build policies from a plain spec (the ``policy`` config group) and rebuild them from checkpoints.

A spec is a dict: ``kind`` (reflow | shortcut | gaussian), ``network`` (mlp | unet1d) and its sizes,
``default_steps``, ``solver``, ``time_sampler``, ``loss``/``huber_c``, shortcut ``max_level``/``sc_fraction``/
``ema_decay``. Horizons (To, Ta, exec) come from the task. The checkpoint's ``config.yaml`` stores the
resolved spec, the dims and the horizons, so a policy is rebuilt without Hydra.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from flowpolicy import RectifiedFlow, ShortcutFlow, make_network, make_time_sampler
from flowpolicy.policy import BasePolicy, FlowPolicy, GaussianPolicy, is_power_of_two

from .checkpoint import CheckpointError, load_checkpoint

POLICY_KINDS = ("reflow", "shortcut", "gaussian")


def validate_spec(spec: dict[str, Any]) -> None:
    """Raise ValueError with a clear message on invalid values, before any training starts."""
    kind = spec.get("kind")
    if kind not in POLICY_KINDS:
        raise ValueError(f"policy.kind must be one of {POLICY_KINDS}, got {kind!r}")
    for key in ("hidden", "depth", "default_steps"):
        if key in spec and spec[key] is not None and int(spec[key]) < 1:
            raise ValueError(f"policy.{key} must be >= 1, got {spec[key]}")
    tau = spec.get("init_noise_scale")
    if tau is not None and not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"policy.init_noise_scale must be in [0, 1], got {tau}")
    if kind == "shortcut":
        if not is_power_of_two(int(spec.get("default_steps", 1))):
            raise ValueError(f"shortcut policies sample with a power-of-two K; policy.default_steps="
                             f"{spec.get('default_steps')}")
        if int(spec.get("max_level", 1)) < 1:
            raise ValueError(f"policy.max_level must be >= 1, got {spec.get('max_level')}")


def build_policy(spec: dict[str, Any], obs_dim: int, act_dim: int, obs_horizon: int = 1, action_horizon: int = 1,
                 exec_horizon: int | None = None, obs_stats=None, action_stats=None) -> BasePolicy:
    """A fresh policy. ``obs_stats``/``action_stats`` are (low, high) arrays for the normalizers."""
    validate_spec(spec)
    kind = spec["kind"]
    common = dict(obs_dim=obs_dim, act_dim=act_dim, obs_horizon=obs_horizon, action_horizon=action_horizon,
                  exec_horizon=exec_horizon, obs_stats=obs_stats, action_stats=action_stats)
    if kind == "gaussian":
        return GaussianPolicy(**common, hidden=int(spec.get("hidden", 256)), depth=int(spec.get("depth", 2)),
                              init_log_std=float(spec.get("init_log_std", -1.0)))
    x_shape = (action_horizon, act_dim)
    net_kwargs: dict[str, Any] = {}
    network = spec.get("network", "mlp")
    if network == "mlp":
        net_kwargs = {"hidden": int(spec.get("hidden", 256)), "depth": int(spec.get("depth", 3)),
                      "emb_dim": int(spec.get("emb_dim", 128))}
    elif network == "unet1d":
        net_kwargs = {"channels": tuple(spec.get("channels", (64, 128))), "emb_dim": int(spec.get("emb_dim", 128))}
    net = make_network(network, x_shape, cond_dim=obs_horizon * obs_dim, step_input=(kind == "shortcut"),
                       **net_kwargs)
    ts = dict(spec.get("time_sampler") or {"name": "uniform"})
    sampler = make_time_sampler(ts.pop("name"), **ts)
    loss = spec.get("loss", "mse")
    huber_c = spec.get("huber_c")
    if kind == "shortcut":
        flow = ShortcutFlow(net, x_shape, max_level=int(spec.get("max_level", 5)),
                            sc_fraction=float(spec.get("sc_fraction", 0.25)),
                            ema_decay=float(spec.get("ema_decay", 0.999)), time_sampler=sampler, loss=loss,
                            huber_c=huber_c)
    else:
        flow = RectifiedFlow(net, x_shape, time_sampler=sampler, loss=loss, huber_c=huber_c)
    return FlowPolicy(flow, **common, default_steps=int(spec.get("default_steps", 4)),
                      solver=spec.get("solver", "euler"), init_noise_scale=float(spec.get("init_noise_scale", 1.0)))


def policy_config(policy: BasePolicy, spec: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint's config.yaml needs to rebuild ``policy``."""
    return {"policy": dict(spec), "dims": {"obs_dim": policy.obs_dim, "act_dim": policy.act_dim},
            "horizons": {"obs_horizon": policy.obs_horizon, "action_horizon": policy.action_horizon,
                         "exec_horizon": policy.exec_horizon}}


def extra_modules(policy: BasePolicy) -> dict[str, torch.nn.Module]:
    """Modules that are not in ``policy.state_dict()`` but must be saved (the shortcut's EMA target net)."""
    if isinstance(policy, FlowPolicy) and isinstance(policy.flow, ShortcutFlow):
        return {"shortcut_ema": policy.flow.ema.model}
    return {}


def policy_from_checkpoint(path: str | os.PathLike, expect_kind: str | None = None, ema: bool = True,
                           device: str = "cpu") -> tuple[BasePolicy, dict[str, Any]]:
    """Rebuild a policy from a checkpoint directory (EMA weights when saved and ``ema``); returns (policy, ckpt)."""
    ckpt = load_checkpoint(path, expect_kind=expect_kind)
    cfg = ckpt["config"]
    if "policy" not in cfg or "dims" not in cfg:
        raise CheckpointError(f"{ckpt['path']}: not a policy checkpoint (no policy/dims in config.yaml)")
    dims, hz = cfg["dims"], cfg["horizons"]
    policy = build_policy(cfg["policy"], dims["obs_dim"], dims["act_dim"], hz["obs_horizon"], hz["action_horizon"],
                          hz["exec_horizon"])
    state = ckpt["extras"].get("policy_ema") if ema and "policy_ema" in ckpt["extras"] else ckpt["model"]
    try:
        policy.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt['path']}: weights do not fit the policy described in config.yaml: {err}") from err
    if "shortcut_ema" in ckpt["extras"]:
        policy.flow.ema.model.load_state_dict(ckpt["extras"]["shortcut_ema"])
    return policy.to(device).eval(), ckpt


def stats_pair(stats: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(stats["min"], dtype=np.float32), np.asarray(stats["max"], dtype=np.float32)
