"""Every stage on a CUDA GPU at a tiny budget, and CUDA-graph sampling equal to eager sampling.

All tests here carry the ``cuda`` marker and skip without a GPU (``pytest -m cuda`` runs only them). The CPU
side of the same class of bugs (seeded draws on the wrong device, modules left behind by ``.to()``) is caught
without a GPU in tests/test_devices.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
TINY = ["stage.grad_steps=20", "stage.eval_every=0", "stage.val_every=10", "stage.save_every=10", "task.eval.episodes=2",
        "task.eval.num_envs=2", "task.eval.denoise_steps=[1,2]", "task.eval.videos=0", "task.demos.num=5",
        "task.max_episode_steps=40", "policy.hidden=32", "policy.depth=1", "logger=none", "progress=false",
        "device=cuda"]


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _policy(kind: str, tau: float = 1.0):
    from flowpolicy.flow import RectifiedFlow, ShortcutFlow
    from flowpolicy.nets import MLPVelocity
    from flowpolicy.policy import FlowPolicy

    torch.manual_seed(0)
    net = MLPVelocity((4, 3), cond_dim=11, hidden=64, depth=2, step_input=kind == "shortcut")
    flow = ShortcutFlow(net, (4, 3), max_level=4) if kind == "shortcut" else RectifiedFlow(net, (4, 3))
    return FlowPolicy(flow, 11, 3, 1, 4, obs_stats=(np.full(11, -5.0), np.full(11, 5.0)),
                      action_stats=(np.full(3, -2.0), np.full(3, 1.0)), init_noise_scale=tau).cuda().eval()


@pytest.mark.parametrize("kind", ["reflow", "shortcut"])
def test_cuda_graph_actions_equal_eager_and_follow_weight_updates(kind):
    policy = _policy(kind, tau=0.5)
    obs = np.random.default_rng(0).normal(size=(16, 11)).astype(np.float32)

    def chunk(graphs: bool, k: int, b: int, seed: int):
        policy.cuda_graphs = graphs
        return policy.predict_action_chunk(obs[:b], steps=k, generator=torch.Generator().manual_seed(seed)).cpu()

    for k in (1, 2, 4, 8):
        for b in (1, 16):
            for seed in (0, 1):
                g, e = chunk(True, k, b, seed), chunk(False, k, b, seed)
                assert torch.allclose(g, e, atol=1e-6, rtol=0), (k, b, seed, (g - e).abs().max())
    assert policy._graph.failed is None and len(policy._graph._graphs) == 8
    with torch.no_grad():  # an optimizer step writes the weights in place: the graph must see it
        for p in policy.flow.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g, e = chunk(True, 4, 16, 3), chunk(False, 4, 16, 3)
    assert torch.allclose(g, e, atol=1e-6, rtol=0)
    out1 = policy.predict_action_chunk(obs, steps=4)
    kept = out1.clone()
    policy.predict_action_chunk(obs, steps=4)
    assert torch.equal(out1, kept)  # a returned chunk is the caller's: the next replay does not overwrite it


def test_pretrain_eval_reflow_and_finetune_stages_on_cuda(tmp_path):
    from agents.policies import policy_from_checkpoint
    from agents.stages import run

    data = tmp_path / "data"
    pre = run(_compose("stage=pretrain", f"data_dir={data}", *TINY), tmp_path / "pre")
    assert (tmp_path / "pre" / "checkpoints" / "last" / "model.safetensors").exists()
    rf = run(_compose("stage=reflow", f"checkpoint={tmp_path / 'pre'}", f"data_dir={data}", "stage.reflow_steps=10",
                      "stage.distill_steps=10", "stage.pairs_per_obs=1", "stage.coupling_steps=4", *TINY[4:]),
             tmp_path / "rf")
    assert policy_from_checkpoint(rf["reflow"]["distilled"])[0].default_steps == 1
    ft = run(_compose("stage=finetune", f"checkpoint={tmp_path / 'pre'}", f"data_dir={data}", "stage.num_envs=2",
                      "stage.n_steps=10", "stage.eval_num_envs=2", "stage.eval_episodes=2", "stage.eval_every=1",
                      "stage.critic_warmup_iters=0", "stage.minibatch_size=10", "stage.update_epochs=1",
                      "stage.total_env_steps=40", *TINY[4:]), tmp_path / "ft")["finetune"]
    assert ft["env_steps"] == 40
    policy, _ = policy_from_checkpoint(ft["checkpoint"])  # saved from the GPU, loads on the CPU
    assert policy.device.type == "cpu" and pre is not None


def test_gaussian_ppo_and_align_stages_on_cuda(tmp_path):
    from agents.align import run_align_stage
    from agents.stages import run

    data = tmp_path / "data"
    run(_compose("stage=pretrain", f"data_dir={data}", "policy=gaussian", *TINY), tmp_path / "g")
    ft = run(_compose("stage=finetune", f"checkpoint={tmp_path / 'g'}", f"data_dir={data}", "stage.num_envs=2",
                      "stage.n_steps=10", "stage.eval_num_envs=2", "stage.eval_episodes=2", "stage.eval_every=1",
                      "stage.critic_warmup_iters=0", "stage.minibatch_size=10", "stage.update_epochs=1",
                      "stage.total_env_steps=40", *TINY[4:]), tmp_path / "gft")["finetune"]
    assert ft["env_steps"] == 40
    run(_compose("stage=pretrain", f"data_dir={data}", *TINY), tmp_path / "pre")
    cfg = _compose("stage=align", f"checkpoint={tmp_path / 'pre'}", "task.max_episode_steps=30", "logger=none",
                   "progress=false", "stage.num_start_states=2", "stage.rollouts_per_state=2", "device=cuda",
                   "stage.rollout_envs=4", "stage.min_return_gap=-1", "stage.grad_steps=3", "stage.batch_pairs=2",
                   "stage.eval_episodes=2", "stage.eval_num_envs=2", f"data_dir={data}")
    out = run_align_stage(cfg, tmp_path / "al", cfg.checkpoint)
    assert out["preference_data"]["pairs"] == 2


@pytest.mark.parametrize("method", ["reflow", "shortcut"])
def test_image_stage_on_cuda(tmp_path, method):
    from agents.config_schema import ImageStage
    from agents.images import run

    tiny = {"method": method, "grad_steps": 20, "batch_size": 32, "progress": False, "log_every": 5,
            "reflow": {"couplings": 64, "couplings_steps": 4, "grad_steps": 10},
            "distill": {"couplings": 64, "grad_steps": 10, "k": [1]}, "shortcut": {"max_level": 3},
            "eval": {"denoise_steps": [1, 2], "samples": 64, "straightness_samples": 32, "straightness_steps": 4},
            "classifier": {"grad_steps": 30, "cache_dir": str(tmp_path / "cache")}, "grid_cols": 8}
    stage = OmegaConf.merge(OmegaConf.structured(ImageStage), OmegaConf.create(tiny))
    cfg = OmegaConf.create({"seed": 0, "device": "cuda", "task": OmegaConf.load(ROOT / "configs/task/digits.yaml"),
                            "stage": stage})
    summary = run(cfg, run_dir=tmp_path / "run")
    assert summary["models"]
