"""train.py and its stages end to end with tiny budgets: pretrain -> eval -> reflow -> finetune, resume."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["stage.grad_steps=20", "stage.eval_every=0", "stage.val_every=10", "stage.save_every=10", "task.eval.episodes=2",
        "task.eval.num_envs=2", "task.eval.denoise_steps=[1,2]", "task.eval.videos=0", "task.demos.num=5",
        "task.max_episode_steps=40", "policy.hidden=32", "policy.depth=1", "logger=none", "progress=false"]


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from agents.stages import run

    data = tmp_path_factory.mktemp("data")
    run_dir = tmp_path_factory.mktemp("pretrain")
    out = run(_compose("stage=pretrain", f"data_dir={data}", *TINY), run_dir)
    return run_dir, data, out


def test_pretrain_stage_writes_checkpoints_eval_and_summary(pretrained):
    run_dir, _, out = pretrained
    assert (run_dir / "checkpoints" / "last" / "model.safetensors").exists()
    rows = json.loads((run_dir / "eval.json").read_text())
    assert [r["steps"] for r in rows] == [1, 2] and all(r["episodes"] == 2 for r in rows)
    assert json.loads((run_dir / "summary.json").read_text())["stage"] == "pretrain"


def test_eval_stage_reads_a_run_directory(pretrained, tmp_path):
    from agents.stages import run

    run_dir, data, _ = pretrained
    out = run(_compose("stage=eval", f"checkpoint={run_dir}", f"data_dir={data}", "stage.denoise_steps=[4]", *TINY[4:]),
              tmp_path)
    assert [r["steps"] for r in out["eval"]["rows"]] == [4]


def test_eval_stage_reads_its_episodes_num_envs_videos_and_seed(pretrained, tmp_path, monkeypatch):
    import agents.stage_runners as runners
    import agents.stages as stages

    run_dir, data, _ = pretrained
    calls = []
    real = runners.evaluate_policy_steps

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **{**kwargs, "videos": 0})  # rendering needs a GL backend; the value is what counts

    monkeypatch.setattr(runners, "evaluate_policy_steps", spy)  # run_eval lives there
    # TINY sets task.eval.episodes=2, num_envs=2, videos=0; the stage's own values must win
    out = stages.run(_compose("stage=eval", f"checkpoint={run_dir}", f"data_dir={data}", "stage.denoise_steps=[1]",
                              "stage.episodes=3", "stage.num_envs=3", "stage.videos=1", "stage.seed=7", *TINY[4:]),
                     tmp_path)
    assert [r["episodes"] for r in out["eval"]["rows"]] == [3]
    assert {k: calls[0][k] for k in ("episodes", "num_envs", "videos", "seed")} == {
        "episodes": 3, "num_envs": 3, "videos": 1, "seed": 7}
    # defaults: task.eval's episodes, num_envs and videos, and the stage's seed 100000
    calls.clear()
    stages.run(_compose("stage=eval", f"checkpoint={run_dir}", f"data_dir={data}", "stage.denoise_steps=[1]", *TINY[4:]),
               tmp_path / "defaults")
    assert {k: calls[0][k] for k in ("episodes", "num_envs", "videos", "seed")} == {
        "episodes": 2, "num_envs": 2, "videos": 0, "seed": 100000}
    from agents.errors import UserError

    with pytest.raises(UserError, match="stage.episodes must be >= 1"):
        stages.run(_compose("stage=eval", f"checkpoint={run_dir}", "stage.episodes=0", *TINY[4:]), tmp_path / "bad")


def test_logger_wandb_opens_a_run_with_the_configs_project_and_mode(pretrained, tmp_path, monkeypatch):
    import types

    from agents.errors import UserError
    from agents.stages import run

    run_dir, data, _ = pretrained
    overrides = ["stage=eval", f"checkpoint={run_dir}", f"data_dir={data}", "stage.denoise_steps=[1]", *TINY[4:],
                 "logger=wandb", "logger.project=tiny-project", "logger.mode=offline"]
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: a user error before anything runs
    with pytest.raises(UserError, match="pip install wandb"):
        run(_compose(*overrides), tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    runs = []

    class FakeRun:
        def __init__(self, **kwargs):
            self.kwargs, self.finished = kwargs, False
            runs.append(self)

        def finish(self):
            self.finished = True

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=FakeRun))
    run(_compose(*overrides), tmp_path / "ok")
    assert len(runs) == 1 and runs[0].finished
    kw = runs[0].kwargs
    assert (kw["project"], kw["mode"], kw["sync_tensorboard"]) == ("tiny-project", "offline", True)
    assert kw["config"]["logger"]["project"] == "tiny-project" and kw["dir"] == str(tmp_path / "ok")


def test_reflow_stage_saves_rectified_and_distilled_policies(pretrained, tmp_path):
    from agents.policies import policy_from_checkpoint
    from agents.stages import run

    run_dir, data, _ = pretrained
    out = run(_compose("stage=reflow", f"checkpoint={run_dir}", f"data_dir={data}", "stage.reflow_steps=10",
                       "stage.distill_steps=10", "stage.pairs_per_obs=1", "stage.coupling_steps=4", *TINY[4:]),
              tmp_path)
    policy, ck = policy_from_checkpoint(out["reflow"]["distilled"])
    assert policy.default_steps == 1 and ck["config"]["reflow"]["distilled_steps"] == 1


def test_finetune_stage_runs_and_resumes_from_last(pretrained, tmp_path):
    from agents.stages import run

    run_dir, data, _ = pretrained
    ft = ["stage=finetune", f"checkpoint={run_dir}", f"data_dir={data}", "stage.num_envs=2", "stage.n_steps=10",
          "stage.eval_num_envs=2", "stage.eval_episodes=2", "stage.eval_every=1", "stage.critic_warmup_iters=0",
          "stage.minibatch_size=10", "stage.update_epochs=1", "stage.save_every=1", *TINY[4:]]
    first = run(_compose(*ft, "stage.total_env_steps=40"), tmp_path)["finetune"]
    assert first["env_steps"] == 40 and Path(first["checkpoint"]).name == "step_000000001"
    again = run(_compose(*ft, "stage.total_env_steps=80"), tmp_path)["finetune"]
    assert again["env_steps"] == 80 and Path(again["checkpoint"]).name == "step_000000002"
    assert [h["iteration"] for h in again["history"]] == [0, 1, 2]


def test_finetuned_policy_keeps_the_initial_noise_scale_it_was_tuned_with(pretrained, tmp_path):
    from agents.policies import policy_from_checkpoint
    from agents.stages import run

    run_dir, data, _ = pretrained
    ft = ["stage=finetune", f"checkpoint={run_dir}", f"data_dir={data}", "stage.num_envs=2", "stage.n_steps=10",
          "stage.eval_num_envs=2", "stage.eval_episodes=2", "stage.eval_every=0", "stage.critic_warmup_iters=0",
          "stage.minibatch_size=10", "stage.update_epochs=1", "stage.total_env_steps=40",
          "stage.init_noise_scale=0.0", *TINY[4:]]
    out = run(_compose(*ft), tmp_path)["finetune"]
    policy, ck = policy_from_checkpoint(out["checkpoint"])
    assert policy.init_noise_scale == 0.0 and ck["config"]["policy"]["init_noise_scale"] == 0.0
    cond = torch.randn(3, policy.cond_dim)
    with torch.no_grad():  # tau = 0: every chain starts at x0 = 0, whatever the generator
        a = policy.predict_normalized(cond, generator=torch.Generator().manual_seed(1))
        b = policy.predict_normalized(cond, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_train_py_runs_through_hydra(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "stage=pretrain", f"hydra.run.dir={tmp_path}",
                          f"data_dir={tmp_path / 'data'}", *TINY], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "run directory" in out.stdout and "| reflow (BC) | metaworld/pick-place-v3 | 2 |" in out.stdout


def test_task_finetune_section_sets_every_schedule_key_of_the_stage():
    """A task's finetune: section reaches the stage for the noise and lr schedules too (Hopper's defaults)."""
    from omegaconf import OmegaConf

    cfg = _compose("task=hopper_medium", "stage=finetune")
    s = OmegaConf.to_container(cfg.stage, resolve=True)
    task = OmegaConf.to_container(cfg.task.finetune, resolve=True)
    for key in ("sigma_min_final", "sigma_max_final", "sigma_hold_iters", "sigma_decay_iters", "ent_coef",
                "clip_coef", "init_noise_scale"):
        assert s[key] == task[key], key
    cfg = _compose("task=pick_place", "stage=finetune", "+task.finetune.lr_schedule=cosine",
                   "+task.finetune.lr_schedule_iters=7", "stage.sigma_hold_iters=3")
    s = OmegaConf.to_container(cfg.stage, resolve=True)
    assert (s["lr_schedule"], s["lr_schedule_iters"], s["sigma_hold_iters"]) == ("cosine", 7, 3)
    assert s["sigma_min_final"] is None  # pick-place keeps its noise bounds


def test_finetune_with_async_env_workers_equals_the_sync_run(pretrained, tmp_path, monkeypatch):
    """stage.async_envs=true steps the training envs in worker processes: the same episodes and update."""
    import agents.finetune_stage as fs
    from agents.policies import policy_from_checkpoint
    from agents.stages import run

    kinds, real = [], fs.make_vec_env

    def spy(*a, **kw):
        envs = real(*a, **kw)
        kinds.append(type(envs).__name__)
        return envs

    monkeypatch.setattr(fs, "make_vec_env", spy)
    run_dir, data, _ = pretrained
    ft = ["stage=finetune", f"checkpoint={run_dir}", f"data_dir={data}", "stage.num_envs=2", "stage.n_steps=10",
          "stage.eval_num_envs=2", "stage.eval_episodes=2", "stage.eval_every=0", "stage.critic_warmup_iters=0",
          "stage.minibatch_size=10", "stage.update_epochs=1", "stage.total_env_steps=40", *TINY[4:]]
    outs = [run(_compose(*ft, f"stage.async_envs={a}"), tmp_path / str(a))["finetune"] for a in ("false", "true")]
    params = [torch.cat([p.flatten() for p in policy_from_checkpoint(o["checkpoint"])[0].parameters()])
              for o in outs]
    assert outs[0]["env_steps"] == outs[1]["env_steps"] == 40 and torch.equal(*params)
    assert kinds == ["SyncVectorEnv", "SyncVectorEnv", "GuardedAsyncVectorEnv", "SyncVectorEnv"]  # train, eval


def test_finetune_stage_runs_fpo_from_the_algo_config_group(pretrained, tmp_path):
    """`train.py stage=finetune algo=fpo checkpoint=...`: the algorithm is a config group; FPO's actor has no
    noise net, and the saved policy loads and acts."""
    from agents.checkpoint import load_checkpoint
    from agents.policies import policy_from_checkpoint
    from agents.stages import run

    run_dir, data, _ = pretrained
    cfg = _compose("stage=finetune", "algo=fpo", f"checkpoint={run_dir}", f"data_dir={data}", "stage.num_envs=2",
                   "stage.n_steps=10", "stage.eval_num_envs=2", "stage.eval_episodes=2", "stage.eval_every=1",
                   "stage.critic_warmup_iters=0", "stage.minibatch_size=10", "stage.update_epochs=1",
                   "stage.total_env_steps=40", *TINY[4:])
    assert cfg.stage.algo == "fpo" and cfg.stage.fpo_mc_samples == 8
    out = run(cfg, tmp_path)["finetune"]
    assert out["env_steps"] == 40
    ck = load_checkpoint(out["checkpoint"])
    assert ck["config"]["finetune"]["algo"] == "fpo"
    assert "noise_net" not in ck["extras"]  # a ReinFlow run saves its noise net there
    policy, _ = policy_from_checkpoint(out["checkpoint"])
    assert policy.predict_action_chunk(np.zeros((1, policy.obs_dim), np.float32)).shape[-1] == policy.act_dim
