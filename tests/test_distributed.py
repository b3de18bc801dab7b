"""Data-parallel BC pretraining under torchrun (gloo, 2 CPU processes): the same update as one process with the
global batch, exact resume under 2 ranks, Ctrl-C on any rank saves once, and a dead rank ends the job."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agents.pretrain import PretrainConfig, Pretrainer
from flowpolicy import rng

ROOT = Path(__file__).resolve().parents[1]
ENV = "metaworld/pick-place-v3"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")


@pytest.fixture(scope="module")
def demos(pick_place_demos):
    return pick_place_demos  # tests/conftest.py


def _cfg(demos, run_dir, kind="reflow", **kw):
    base = dict(dataset=demos, env_name=ENV, run_dir=str(run_dir),
                policy={"kind": kind, "hidden": 64, "depth": 2, "default_steps": 2}, obs_horizon=1,
                action_horizon=4, exec_horizon=2, grad_steps=50, batch_size=64, eval_every=0, eval_episodes=0,
                val_every=25, save_every=10, max_episode_steps=60, progress=False, tensorboard=False)
    base.update(kw)
    return base


def _torchrun(cfg: dict, out: Path, *extra: str, nproc: int = 2, timeout: float = 240.0):
    cfg_path = out.with_suffix(".json")
    cfg_path.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FLOWPOLICY_DIST_TIMEOUT": "30"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--max_restarts=0", str(ROOT / "tests" / "dist_pretrain.py"), str(cfg_path), str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def _params(obj) -> torch.Tensor:
    ps = obj["params"] if isinstance(obj, dict) else list(obj.parameters())
    return torch.cat([p.detach().flatten() for p in ps])


def test_shard_keeps_each_ranks_slice_of_the_global_draw():
    g = torch.Generator().manual_seed(3)
    full = rng.randn((8, 3), g)
    parts = []
    for r in range(2):
        g = torch.Generator().manual_seed(3)
        with rng.shard(r, 2):
            parts.append(rng.randn((4, 3), g))
    assert torch.equal(torch.cat(parts), full)
    g = torch.Generator().manual_seed(3)
    with rng.shard(1, 2):
        assert rng.randint(0, 5, (3,), None).shape == (3,)  # unseeded draws are local
        assert rng.rand((3,), g).shape == (3,)


@pytest.mark.parametrize("kind", ["reflow", "gaussian"])
def test_two_ranks_make_the_update_of_one_process_with_the_global_batch(demos, tmp_path, kind):
    cfg = _cfg(demos, tmp_path / "ddp", kind)
    proc, _ = _torchrun(cfg, tmp_path / "ddp.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt")
    assert ddp["step"] == 50
    single = Pretrainer(PretrainConfig(**_cfg(demos, tmp_path / "one", kind))).run()
    assert single["step"] == 50
    one = Pretrainer(PretrainConfig(**_cfg(demos, tmp_path / "one", kind)))  # resumes the finished run
    diff = (_params(ddp) - _params(one.policy)).abs().max().item()
    moved = (_params(one.policy) - _params(Pretrainer(PretrainConfig(**_cfg(demos, tmp_path / "init", kind,
                                                                             grad_steps=1))).policy)).abs().max().item()
    assert moved > 1e-3  # training moved the parameters, so the match below means something
    assert diff < 1e-5, f"2 ranks vs 1 process: max |diff| {diff:.2e}"
    # rank 0 alone wrote checkpoints: one set, in the run directory, no second writer's temporaries
    ckdir = tmp_path / "ddp" / "checkpoints"
    assert (ckdir / "last").is_symlink() and not list(ckdir.glob("*.tmp*"))


def test_ctrl_c_on_one_rank_saves_once_and_the_two_rank_resume_matches(demos, tmp_path):
    cfg = _cfg(demos, tmp_path / "full", "reflow", grad_steps=30)
    proc, _ = _torchrun(cfg, tmp_path / "full.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg_half = _cfg(demos, tmp_path / "half", "reflow", grad_steps=30)
    proc, _ = _torchrun(cfg_half, tmp_path / "half.pt", "--sigint-at", "15", "--rank", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped at step 15; saved " in proc.stderr  # rank 0 saved although Ctrl-C reached rank 1 only
    assert torch.load(tmp_path / "half.pt")["step"] == 15
    proc, _ = _torchrun(cfg_half, tmp_path / "resumed.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from " in proc.stderr and "(step 15)" in proc.stderr
    full, resumed = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "resumed.pt")
    assert resumed["step"] == 30
    assert torch.equal(_params(full), _params(resumed))


def test_a_rank_that_dies_ends_the_job_with_an_error(demos, tmp_path):
    cfg = _cfg(demos, tmp_path / "die", "reflow", grad_steps=200)
    proc, wall = _torchrun(cfg, tmp_path / "die.pt", "--die-at", "20", "--rank", "1", timeout=120)
    assert proc.returncode != 0
    assert wall < 90
    assert not (tmp_path / "die.pt").exists()


def test_torchrun_train_py_pretrains_and_finetunes_in_one_run_directory(demos, tmp_path):
    """The documented launch: rank 0's run directory alone remains, with results; fine-tuning from it runs
    data-parallel too; the stages that are not distributed say so in one line."""
    data_dir = Path(demos).parents[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FLOWPOLICY_DIST_TIMEOUT": "60"}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
            str(ROOT / "train.py"), f"data_dir={data_dir}", "task.demos.num=6", "progress=false", "logger=none"]
    proc = subprocess.run(base + ["stage=pretrain", "stage.grad_steps=20", "stage.batch_size=32", "stage.eval_every=0",
                                  "task.eval.episodes=1", "task.eval.num_envs=1", "task.eval.denoise_steps=[1]",
                                  "task.eval.videos=0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs  # the other rank ran in a scratch directory
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["pretrain"]["world_size"] == 2 and summary["pretrain"]["step"] == 20
    assert proc.stdout.count("run directory:") == 1
    ft_dir = tmp_path / "ft"
    proc = subprocess.run(base + ["stage=finetune", "checkpoint=" + str(runs[0]), f"hydra.run.dir={ft_dir}",
                                  "stage.total_env_steps=400", "stage.num_envs=2", "stage.n_steps=50",
                                  "stage.eval_every=1", "stage.eval_episodes=3", "stage.eval_num_envs=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((ft_dir / "summary.json").read_text())
    assert summary["finetune"]["world_size"] == 2 and summary["finetune"]["env_steps"] >= 400
    assert (ft_dir / "checkpoints" / "last").is_symlink() and proc.stdout.count("## finetune_table") == 1
    proc = subprocess.run(base + ["stage=eval", "checkpoint=" + str(runs[0])], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0  # each rank exits with code 2; torchrun reports the failure
    assert "error: stage=eval runs in one process" in proc.stderr


@pytest.mark.parametrize("kind", ["reflow", "gaussian"])
def test_two_rank_ppo_fine_tuning_equals_one_process_with_all_envs(tmp_path, kind):
    """2 ranks x 3 envs vs 1 process x 6 envs, 3 iterations: the same rollouts (env seeds and chain noise are
    the global ones), global reward scaling and advantage normalization, summed minibatch gradients (also
    where a rank holds none of a minibatch); and the same evaluation, split across the ranks and gathered."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           "FLOWPOLICY_DIST_TIMEOUT": "60"}
    script = str(ROOT / "tests" / "dist_finetune.py")
    one = subprocess.run([sys.executable, script, kind, "6", "3", str(tmp_path / "one.pt")], env=env,
                         capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--max_restarts=0", script, kind, "6", "3", str(tmp_path / "two.pt")], env=env,
                         capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a["env_steps"] == b["env_steps"] > 0 and a["episodes"] == b["episodes"]
    for part in ("actor", "critic"):
        pa = torch.cat([p.flatten() for p in a[part]])
        pb = torch.cat([p.flatten() for p in b[part]])
        assert (pa - pb).abs().max().item() < 1e-5, part
    ma, mb = a["metrics"], b["metrics"]
    assert ma["eval/episodes"] == mb["eval/episodes"] == 5
    # the gradient norm catches a wrong gradient scale (mean instead of sum over ranks), which Adam would hide
    for key in ("train/approx_kl", "train/clipfrac", "train/grad_norm", "rollout/return_mean", "eval/return_mean",
                "eval/success_rate"):
        assert ma[key] == pytest.approx(mb[key], rel=1e-4, abs=1e-6), key


IMAGE_TINY = ["task=digits", "stage=image", "stage.grad_steps=15", "stage.batch_size=32", "stage.net.channels=[8,16]",
              "stage.net.emb_dim=16", "stage.reflow.couplings=64", "stage.reflow.couplings_steps=2",
              "stage.reflow.grad_steps=10", "stage.distill.grad_steps=0", "stage.eval.fd=false", "stage.eval.denoise_steps=[1]",
              "stage.eval.samples=16", "stage.eval.straightness_samples=0", "progress=false", "logger=none"]


def test_two_rank_image_training_equals_one_process_with_the_global_batch(tmp_path):
    """torchrun train.py stage=image: 2 ranks with half the global batch each train the 1-RF and the 2-RF on its
    couplings to the weights one process reaches with the whole batch; rank 0 alone writes the run directory;
    a global batch that does not split evenly is one error line."""
    from agents.images import load_generator
    from agents.stages import run

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FLOWPOLICY_DIST_TIMEOUT": "60"}
    two_dir = tmp_path / "two"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
            str(ROOT / "train.py"), *IMAGE_TINY, "stage.method=reflow"]
    proc = subprocess.run(base + [f"hydra.run.dir={two_dir}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[*IMAGE_TINY, "stage.method=reflow"])
    run(cfg, tmp_path / "one")
    # the function the weights compute, compared on fixed noise: the biases right before a GroupNorm have a
    # gradient that is zero up to rounding, which Adam turns into steps of either sign (up to lr per step).
    # Rounding alone gave up to 1.2e-5 (torch 2.14.1 on an AMD EPYC VM); ranks that train on the wrong data
    # or do not average their gradients move the samples by orders of magnitude more.
    x0 = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for name in ("1rf", "2rf"):
        a, _ = load_generator(two_dir / "checkpoints" / name)
        b, _ = load_generator(tmp_path / "one" / "checkpoints" / name)
        with torch.no_grad():
            ya, yb = a.sample(steps=2, x0=x0), b.sample(steps=2, x0=x0)
        diff = (ya - yb).abs().max().item()
        assert diff < 1e-4, f"{name}: 2 ranks vs 1 process: max |sample diff| {diff:.2e}"
        assert (yb - x0).abs().max().item() > 0.5  # the samples are the trained model's, not the noise
    summary = json.loads((two_dir / "summary.json").read_text())
    assert set(summary["models"]) == {"1rf", "2rf"} and proc.stdout.count("run directory:") == 1
    assert not list((two_dir / "checkpoints").rglob("*.tmp*"))
    # resume with the same 2 ranks after losing the 2-RF: the 1-RF loads, the 2-RF trains as before
    before = load_generator(two_dir / "checkpoints" / "2rf")[0]
    shutil.rmtree(two_dir / "checkpoints" / "2rf")
    proc = subprocess.run(base + [f"hydra.run.dir={two_dir}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("resumed 1rf") == 1, proc.stdout[-2000:]
    with torch.no_grad():
        diff = (load_generator(two_dir / "checkpoints" / "2rf")[0].sample(steps=2, x0=x0)
                - before.sample(steps=2, x0=x0)).abs().max().item()
    assert diff < 1e-6, f"resumed 2-rank 2-RF vs uninterrupted: max |sample diff| {diff:.2e}"
    proc = subprocess.run(base + ["stage.batch_size=33", f"hydra.run.dir={tmp_path / 'odd'}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "stage.batch_size=33 must be divisible by the number of processes (2)" \
        in proc.stderr
