"""flowpolicy: the flow core (pure torch). Paths, time samplers, losses, networks, rectified flow, reflow,
distillation, shortcut models, solvers, EMA, policies with their normalizers, ReinFlow's noisy sampler and
the alignment losses. It imports nothing from ``envs`` or ``agents``."""

from .align import flow_dpo_loss, flow_rwr_loss, flowchef_sample, guided_sample, rwr_weights
from .ema import EMA
from .flow import PathSample, RectifiedFlow, ShortcutFlow, linear_path
from .losses import mse, pseudo_huber
from .nets import ConvUNet1D, ImageUNet, MLPVelocity, make_network
from .policy import FlowPolicy, GaussianPolicy
from .reflow import distillation_loss, make_couplings, straightness
from .reinflow import NoiseNet, NoisyFlowSampler
from .solvers import integrate, time_grid
from .time_samplers import (
    LogitNormalTime,
    ModeHeavyTailTime,
    UniformTime,
    UShapedTime,
    make_time_sampler,
    shift_time,
)

__version__ = "0.1.0"

__all__ = [
    "flow_dpo_loss",
    "flow_rwr_loss",
    "flowchef_sample",
    "guided_sample",
    "rwr_weights",
    "FlowPolicy",
    "GaussianPolicy",
    "NoiseNet",
    "NoisyFlowSampler",
    "EMA",
    "PathSample",
    "RectifiedFlow",
    "ShortcutFlow",
    "linear_path",
    "mse",
    "pseudo_huber",
    "ConvUNet1D",
    "ImageUNet",
    "MLPVelocity",
    "make_network",
    "distillation_loss",
    "make_couplings",
    "straightness",
    "integrate",
    "time_grid",
    "LogitNormalTime",
    "ModeHeavyTailTime",
    "UniformTime",
    "UShapedTime",
    "make_time_sampler",
    "shift_time",
]
