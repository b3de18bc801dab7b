"""PPO fine-tuning of flow (ReinFlow) and Gaussian policies (agents/finetune.py, agents/ppo_utils.py)."""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from agents.finetune import FinetuneConfig, ReinFlowPPO
from agents.ppo_utils import RunningRewardScaler, VecEnvStepper, compute_gae, hold_then_linear, lr_factor
from envs.wrappers import ActionChunk
from flowpolicy.flow import RectifiedFlow, ShortcutFlow
from flowpolicy.nets import MLPVelocity
from flowpolicy.policy import FlowPolicy, GaussianPolicy

torch.set_num_threads(1)
TA = 2
REQUIRED_METRICS = ("train/approx_kl", "train/clipfrac", "train/policy_loss", "train/value_loss", "train/entropy",
                    "train/ratio_first_minibatch", "train/sigma_mean", "charts/SPS", "rollout/return_mean",
                    "eval/return_mean", "eval/success_rate")


class PointReach(gym.Env):
    """Move a 2-D point to the origin: p <- p + 0.2 a, reward -|p|, terminated when |p| < 0.1 (success),
    truncated after ``horizon`` steps. A tiny task with both kinds of episode end."""

    def __init__(self, horizon: int = 10) -> None:
        self.observation_space = gym.spaces.Box(-2, 2, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        self.horizon = horizon

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.p, self.t = self.np_random.uniform(-1, 1, 2), 0
        return self.p.astype(np.float32), {}

    def step(self, action):
        self.p = np.clip(self.p + 0.2 * np.clip(action, -1, 1), -2, 2)
        self.t += 1
        dist = float(np.linalg.norm(self.p))
        terminated = dist < 0.1
        return self.p.astype(np.float32), -dist, terminated, self.t >= self.horizon and not terminated, {
            "success": terminated}


def make_envs(n: int, mode=gym.vector.AutoresetMode.NEXT_STEP, ta: int = TA) -> gym.vector.VectorEnv:
    return gym.vector.SyncVectorEnv([lambda: ActionChunk(PointReach(), ta) for _ in range(n)], autoreset_mode=mode)


def make_policy(kind: str = "reflow", seed: int = 0, hidden: int = 32, exec_horizon: int | None = None):
    torch.manual_seed(seed)
    stats = dict(obs_stats=([-2, -2], [2, 2]), action_stats=([-1, -1], [1, 1]), exec_horizon=exec_horizon)
    if kind == "gaussian":
        return GaussianPolicy(2, 2, 1, TA, hidden=hidden, **stats)
    net = MLPVelocity((TA, 2), cond_dim=2, hidden=hidden, depth=2, emb_dim=16, step_input=kind == "shortcut")
    flow = ShortcutFlow(net, (TA, 2), max_level=3) if kind == "shortcut" else RectifiedFlow(net, (TA, 2))
    return FlowPolicy(flow, 2, 2, 1, TA, default_steps=4, **stats)


def small_cfg(**kw) -> FinetuneConfig:
    base = dict(n_steps=8, update_epochs=2, minibatch_size=32, critic_warmup_iters=1, eval_every=0,
                critic_hidden=(32,), noise_hidden=16, actor_lr=1e-3, critic_lr=1e-3, clip_coef=0.2)
    return FinetuneConfig(**{**base, **kw})


def run(agent: ReinFlowPPO, iterations: int) -> list[dict]:
    out: list[dict] = []

    def cb(a, m):
        if "train/ratio_first_minibatch" in m:
            out.append(m)
        return len(out) < iterations

    agent.learn(10**9, callback=cb, progress=False)
    return out


@pytest.mark.parametrize("kind,steps", [("reflow", 4), ("reflow", 8), ("shortcut", 1), ("gaussian", 1)])
def test_importance_ratio_is_one_at_the_first_minibatch_of_every_update(kind, steps):
    cfg = small_cfg(denoise_steps=steps, noise_time_dependent=True, target_kl=None)
    agent = ReinFlowPPO(make_policy(kind), make_envs(8), None, cfg)
    metrics = run(agent, 3)
    assert len(metrics) == 3
    for m in metrics:
        assert m["train/ratio_first_minibatch"] <= 1e-6
    assert metrics[-1]["train/approx_kl"] > 0  # the actor did move after the critic warm-up



def test_noise_in_the_last_step_only_fine_tunes_with_ratio_one_at_the_first_minibatch():
    agent = ReinFlowPPO(make_policy("reflow"), make_envs(8), None, small_cfg(noise_steps=1))
    assert agent.actor.sampler.first_noisy(4) == 3
    metrics = run(agent, 3)
    assert all(m["train/ratio_first_minibatch"] <= 1e-6 for m in metrics) and metrics[-1]["train/approx_kl"] > 0

@pytest.mark.parametrize("kind", ["reflow", "gaussian"])
def test_a_policy_that_executes_one_action_per_chunk_fine_tunes_on_single_action_envs(kind):
    """Te = 1 (receding horizon: predict Ta = 4, execute the first): the env takes single actions, every chunk
    step is one env step, and the log-prob counts the executed action only. Te = 2 on such envs is refused."""
    envs = gym.vector.SyncVectorEnv([PointReach for _ in range(4)])
    agent = ReinFlowPPO(make_policy(kind, exec_horizon=1), envs, None, small_cfg())
    assert (agent.env_chunk, agent.actor.logprob_count) == (1, 2)
    metrics = run(agent, 2)
    assert agent.env_steps == 2 * 8 * 4 and all(m["train/ratio_first_minibatch"] <= 1e-6 for m in metrics)
    with pytest.raises(ValueError, match="executes chunks of Te=2"):
        ReinFlowPPO(make_policy(kind, exec_horizon=2), gym.vector.SyncVectorEnv([PointReach]), None, small_cfg())



def test_gaussian_init_std_sets_the_gaussians_exploration_at_the_start():
    """gaussian_init_std replaces the std that behavior cloning left (SB3's log_std_init): the rollouts sample
    with it, their log-probs use it (ratio 1 at the first minibatch), and the mean is untouched."""
    base = ReinFlowPPO(make_policy("gaussian"), make_envs(4), None, small_cfg())
    agent = ReinFlowPPO(make_policy("gaussian"), make_envs(4), None, small_cfg(gaussian_init_std=0.5))
    cond = torch.randn(16, 2)
    assert torch.allclose(agent.actor.policy.distribution(cond).mean, base.actor.policy.distribution(cond).mean)
    assert base.actor.sigma_stats(cond)[0] == pytest.approx(math.exp(-1.0))  # the policy's own init
    assert agent.actor.sigma_stats(cond) == pytest.approx((0.5, 0.5, 0.5))
    metrics = run(agent, 2)
    assert all(m["train/ratio_first_minibatch"] <= 1e-6 for m in metrics)
    assert metrics[0]["train/sigma_mean"] == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError, match="gaussian_init_std must be > 0"):
        small_cfg(gaussian_init_std=0.0)


def test_the_last_evaluation_is_of_the_final_policy():
    """Evaluations run at iteration 0, every eval_every iterations and after the last one, so the fine-tuning
    table's "after" row and summary's final_eval are of the policy that is saved, not of an earlier one."""
    from agents.stage_runners import finetune_table

    agent = ReinFlowPPO(make_policy("reflow"), make_envs(4), make_envs(2), small_cfg(eval_every=3, eval_episodes=2))
    per_iter = 4 * 8 * TA
    evals = []
    agent.learn(4 * per_iter, callback=lambda a, m: evals.append(a.iteration) if "eval/return_mean" in m else None,
                progress=False)
    n = agent.iteration  # 4 or 5: episodes that end inside a chunk give fewer env steps
    assert n % 3 and evals == [*range(0, n, 3), n]
    assert finetune_table({}, "env", False).startswith("no evaluation during fine-tuning (stage.eval_every=0)")

def test_resume_mid_finetuning_gives_the_same_parameters_as_not_stopping():
    cfg = small_cfg(lr_schedule="cosine", lr_schedule_iters=4, sigma_min_final=0.05, sigma_max_final=0.1,
                    sigma_hold_iters=1, sigma_decay_iters=2, bc_coef=0.1, noise_time_dependent=True)
    straight = ReinFlowPPO(make_policy(), make_envs(4), None, cfg)
    run(straight, 4)

    first = ReinFlowPPO(make_policy(), make_envs(4), None, cfg)
    run(first, 2)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = ReinFlowPPO(make_policy(seed=123), make_envs(4), None, cfg)  # weights come from the state
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    resumed.learn(10**9, callback=lambda a, m: a.iteration < 4, progress=False)

    assert resumed.iteration == straight.iteration == 4 and resumed.env_steps == straight.env_steps
    for mod_a, mod_b in [(straight.actor, resumed.actor), (straight.critic, resumed.critic)]:
        sa, sb = mod_a.state_dict(), mod_b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    oa, ob = straight.actor_optim.state_dict()["state"], resumed.actor_optim.state_dict()["state"]
    assert all(torch.equal(oa[i]["exp_avg"], ob[i]["exp_avg"]) for i in oa)
    assert straight.reward_scaler.rms.var == resumed.reward_scaler.rms.var
    assert torch.equal(straight.noise_gen.get_state(), resumed.noise_gen.get_state())


@pytest.fixture(scope="module")
def poor_bc_policy() -> FlowPolicy:
    return train_poor_bc_policy()


def train_poor_bc_policy(seed: int = 0) -> FlowPolicy:
    """A FlowPolicy behavior-cloned from poor demos: a weak controller a = -p + noise (0.2 a per step)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(4000, 2, generator=g) * 2 - 1
    acts, q = [], p.clone()
    for _ in range(TA):
        a = (-q + 0.1 * torch.randn(q.shape, generator=g)).clamp(-1, 1)
        acts.append(a)
        q = q + 0.2 * a
    act = torch.stack(acts, 1)
    policy = make_policy(hidden=64, seed=seed)
    opt = torch.optim.Adam(policy.parameters(), 2e-3)
    for _ in range(300):
        idx = torch.randint(0, len(p), (256,), generator=g)
        loss, _ = policy.loss({"obs": p[idx, None], "action": act[idx]}, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy.eval()


def test_reinflow_improves_a_poorly_pretrained_flow_policy(poor_bc_policy):
    start = time.perf_counter()
    cfg = FinetuneConfig(n_steps=16, denoise_steps=4, sigma_min=0.05, sigma_max=0.2, clip_coef=0.1, actor_lr=3e-4,
                         critic_lr=3e-3, update_epochs=10, minibatch_size=64, critic_warmup_iters=1, eval_every=12,
                         eval_episodes=32, critic_hidden=(64, 64), noise_hidden=32, ent_coef=0.0, seed=0)
    agent = ReinFlowPPO(poor_bc_policy, make_envs(8), make_envs(8, gym.vector.AutoresetMode.SAME_STEP), cfg)
    evals = []

    def cb(a, m):
        if "eval/return_mean" in m:
            evals.append(m["eval/return_mean"])
        for k in REQUIRED_METRICS if a.iteration == 12 else ():
            assert k in m, k
        return a.iteration < 12

    agent.learn(10**9, callback=cb, progress=False)
    # measured over 6 seeds (of BC and fine-tuning): -2.39 .. -2.51 before, -1.31 .. -1.55 after 12
    # iterations (3k env steps, about 4 s); the optimum is about -1.2. Demand 0.6, 70% of the smallest gain.
    assert len(evals) == 2
    assert evals[1] > evals[0] + 0.6, evals
    assert time.perf_counter() - start < 20


def test_gae_bootstraps_truncation_but_not_termination():
    gamma, lam = 0.9, 0.8
    r = torch.tensor([[1.0], [2.0], [3.0]])
    v = torch.tensor([[0.5], [0.4], [0.3]])
    nv = torch.tensor([[0.4], [10.0], [0.7]])  # step 1 ends an episode whose last observation is worth 10
    zeros = torch.zeros(3, 1)
    done = torch.tensor([[0.0], [1.0], [0.0]])
    for terminated, boot in [(zeros, 10.0), (done, 0.0)]:
        adv, ret = compute_gae(r, v, nv, terminated, done, gamma, lam)
        d2 = 3.0 + gamma * 0.7 - 0.3
        d1 = 2.0 + gamma * boot - 0.4
        d0 = 1.0 + gamma * 0.4 - 0.5
        expected = torch.tensor([[d0 + gamma * lam * d1], [d1], [d2]])
        assert torch.allclose(adv, expected) and torch.allclose(ret, expected + v)


def test_stepper_gives_the_same_transitions_in_same_step_and_next_step_modes():
    noise = np.random.default_rng(0).uniform(-1, 1, (30, 3, TA, 2))
    gain = np.array([3.0, 1.0, 0.2])[:, None, None]  # env 2 is too slow to reach the origin: truncations
    runs = []
    for mode in (gym.vector.AutoresetMode.NEXT_STEP, gym.vector.AutoresetMode.SAME_STEP):
        stepper = VecEnvStepper(make_envs(3, mode), TA)
        obs, res = [stepper.reset(seed=5)], []
        for eps in noise:  # a noisy controller towards the origin: episodes both terminate and truncate
            action = np.clip(-gain * obs[-1][:, None] + 0.5 * eps, -1, 1).astype(np.float32)
            res.append(stepper.step(action))
            obs.append(res[-1].obs)
        runs.append((obs, res))
    (obs_a, res_a), (obs_b, res_b) = runs
    assert any(x.truncated.any() for x in res_a) and any(x.terminated.any() for x in res_a)
    for a, b in zip(obs_a, obs_b):
        assert np.array_equal(a, b)
    for a, b in zip(res_a, res_b):
        for field in ("reward", "terminated", "truncated", "final_obs", "success", "chunk_steps"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field
    ended = [x for x in res_a if x.terminated.any()]
    assert ended and all(x.success[x.terminated].all() for x in ended)
    assert any((x.chunk_steps < TA).any() for x in ended)  # a chunk cut short by the episode end


def test_reward_scaler_divides_by_running_std_of_discounted_return():
    scaler = RunningRewardScaler(2, gamma=0.5)
    r = np.array([1.0, 3.0])
    scaled = scaler(r, np.array([False, True]))
    # returns seen: [1, 3]; running var mixes the prior (var 1, count 1e-4) with the batch var 1
    assert np.allclose(scaled, r / np.sqrt(scaler.rms.var + 1e-8))
    assert scaler.ret.tolist() == [1.0, 0.0]  # the ended episode restarts its return
    scaler(r, np.array([False, False]))
    assert scaler.ret.tolist() == [1.5, 3.0]


def test_schedules():
    assert lr_factor("constant", 7, 10, 0.1) == 1.0
    assert lr_factor("linear", 5, 10, 0.0) == pytest.approx(0.5)
    assert lr_factor("cosine", 10, 10, 0.1) == pytest.approx(0.1) and lr_factor("cosine", 0, 10, 0.1) == 1.0
    assert lr_factor("linear", 50, 10, 0.2) == pytest.approx(0.2)
    assert [hold_then_linear(i, 0.2, 0.1, 2, 2) for i in range(6)] == pytest.approx([0.2, 0.2, 0.2, 0.15, 0.1, 0.1])
    cfg = FinetuneConfig(sigma_min_final=0.05, sigma_max_final=0.1, sigma_hold_iters=1, sigma_decay_iters=1)
    assert cfg.noise_bounds(0) == (0.10, 0.24) and cfg.noise_bounds(5) == (0.05, 0.1)


def test_fraction_schedules_scale_with_the_length_of_the_run():
    cfg = FinetuneConfig(sigma_min=0.2, sigma_max=0.3, sigma_min_final=0.1, sigma_max_final=0.15,
                         sigma_hold_frac=0.5, sigma_decay_frac=0.25, lr_schedule="linear", lr_schedule_frac=1.0)
    assert cfg.schedule_iters(100) == (50, 25, 100) and cfg.schedule_iters(300) == (150, 75, 300)
    assert cfg.noise_bounds(49, 100) == (0.2, 0.3) and cfg.noise_bounds(75, 100) == pytest.approx((0.1, 0.15))
    assert cfg.noise_bounds(149, 300) == (0.2, 0.3) and cfg.noise_bounds(300, 300) == pytest.approx((0.1, 0.15))
    with pytest.raises(ValueError, match="run's length"):
        cfg.noise_bounds(0)
    with pytest.raises(ValueError, match="fraction of the run"):
        FinetuneConfig(sigma_hold_frac=1.5)
    # learn() plans the run: 2 envs x 8 chunk steps x 2 executed actions = 32 env steps per iteration
    agent = ReinFlowPPO(make_policy(), make_envs(2), None, small_cfg(sigma_min=0.2, sigma_max=0.3,
                        sigma_min_final=0.02, sigma_max_final=0.03, sigma_hold_frac=0.5, sigma_decay_frac=0.0,
                        critic_warmup_iters=5))
    sig = []
    agent.learn(4 * 32, callback=lambda a, m: sig.append(m.get("train/sigma_mean")), progress=False)
    assert agent.planned_iters == 4 and agent.iteration == 4
    assert all(0.2 <= x <= 0.3 for x in sig[:2]) and all(0.02 <= x <= 0.03 for x in sig[2:]), sig


def test_noise_bound_schedule_reaches_the_noise_net():
    cfg = small_cfg(sigma_min=0.2, sigma_max=0.3, sigma_min_final=0.02, sigma_max_final=0.03, sigma_hold_iters=1,
                    sigma_decay_iters=0, critic_warmup_iters=5)
    agent = ReinFlowPPO(make_policy(), make_envs(2), None, cfg)
    sig = [m["train/sigma_mean"] for m in run(agent, 2)]
    assert 0.2 <= sig[0] <= 0.3 and 0.02 <= sig[1] <= 0.03


def test_composed_stage_config_equals_the_dataclass():
    from hydra import compose, initialize_config_dir

    configs = Path(__file__).resolve().parents[1] / "configs"
    raw = yaml.safe_load((configs / "stage" / "finetune.yaml").read_text())
    assert raw["name"] == "finetune"
    assert set(raw) - {"name", "defaults", "total_env_steps"} < set(FinetuneConfig().to_dict())  # schema: the rest
    with initialize_config_dir(str(configs), version_base="1.3"):
        # a task without finetune defaults gets the stage's own values, which equal the dataclass defaults
        cfg = compose("config", overrides=["stage=finetune", "task=digits"])
    stage = OmegaConf.to_container(cfg.stage, resolve=True)
    for key in ("name", "total_env_steps", "save_every"):
        stage.pop(key)
    assert FinetuneConfig.from_dict(stage) == FinetuneConfig()
    with pytest.raises(ValueError, match="unknown finetune settings"):
        FinetuneConfig.from_dict({"clip": 0.1})
    with pytest.raises(ValueError, match="sigma_min"):
        FinetuneConfig(sigma_min=0.3, sigma_max=0.2)


def test_env_and_policy_chunk_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="chunks"):
        ReinFlowPPO(make_policy(), make_envs(2, ta=TA + 1), None, small_cfg())


def test_finetunes_on_a_real_factory_env():
    factory = pytest.importorskip("envs.factory")
    envs = factory.make_vec_env("Hopper-v5", 2, seed=0, action_horizon=4)
    eval_envs = factory.make_vec_env("Hopper-v5", 2, seed=100, action_horizon=4, max_episode_steps=40)
    torch.manual_seed(0)
    net = MLPVelocity((4, 3), cond_dim=11, hidden=32, depth=1, emb_dim=16)
    policy = FlowPolicy(RectifiedFlow(net, (4, 3)), 11, 3, 1, 4)
    agent = ReinFlowPPO(policy, envs, eval_envs, small_cfg(n_steps=16, eval_every=1, eval_episodes=2))
    metrics = run(agent, 1)
    assert agent.env_steps == metrics[0]["charts/env_steps"] > 0
    assert np.isfinite(metrics[0]["eval/return_mean"]) and metrics[0]["eval/episodes"] == 2
    assert metrics[0]["train/ratio_first_minibatch"] <= 1e-6
    envs.close()
    eval_envs.close()


# --- comparable trust regions (issue: fine-tuning that wins) ------------------------------------------


def _scaled_noise_log_ratio(kind: str, te: int, k: int, c: float) -> torch.Tensor:
    """Normalized log-ratio of a deterministic sample after every exploration std is divided by exp(c / n),
    with n the number of Gaussian factors an executed action dim passes through (K for a flow, 1 for a
    Gaussian): the same change of the executed actions' log-density per dimension, c, for every actor."""
    from agents.finetune import make_actor

    policy = make_policy(kind)
    cfg = small_cfg(denoise_steps=k, sigma_min=0.1, sigma_max=0.1)  # constant sigma for the flow
    actor = make_actor(policy, cfg, exec_horizon=te)
    cond = torch.randn(16, 2)
    with torch.no_grad():
        out = actor.act(cond, deterministic=True, generator=torch.Generator().manual_seed(0))
        old, _ = actor.evaluate(cond, out.latent)
        if kind == "gaussian":
            policy.log_std.sub_(c)
        else:
            f = math.exp(-c / k)
            actor.set_noise_bounds(0.1 * f, 0.1 * f)
        new, _ = actor.evaluate(cond, out.latent)
    return new - old


def test_flow_and_gaussian_actors_get_the_same_normalized_log_ratio_for_the_same_change():
    """With clip c, every actor's per-sample log-ratio is bounded by c per executed action dimension.

    Before the fix, a K = 4 flow divided by (K + 1) Ta Da and a Gaussian by Ta Da: the same clip let the flow's
    likelihood move 5x further. The count excludes the initial-noise term and K."""
    c = 0.05
    ref = _scaled_noise_log_ratio("gaussian", TA, 1, c)
    assert torch.allclose(ref, torch.full_like(ref, c), atol=1e-5)
    for kind, k in [("reflow", 1), ("reflow", 4), ("shortcut", 2)]:
        lr = _scaled_noise_log_ratio(kind, TA, k, c)
        assert torch.allclose(lr, ref, atol=1e-5), (kind, k, lr[:3])


def test_log_prob_count_excludes_unexecuted_actions():
    from agents.finetune import make_actor

    for kind in ("reflow", "gaussian"):
        actor = make_actor(make_policy(kind), small_cfg(denoise_steps=4), exec_horizon=1)
        assert actor.logprob_count == 1 * 2 and actor.logprob_scale == 0.5
        cond = torch.randn(6, 2)
        with torch.no_grad():
            out = actor.act(cond, generator=torch.Generator().manual_seed(1))
            lp, _ = actor.evaluate(cond, out.latent)
            moved = out.latent.clone()
            final = moved[:, -1] if kind == "reflow" else moved  # the chain's x_K, or the Gaussian's chunk
            final[:, 1:] += 1.0  # the unexecuted second action of the chunk
            assert torch.allclose(actor.evaluate(cond, moved)[0], lp)
            final[:, 0] += 1.0
            assert not torch.allclose(actor.evaluate(cond, moved)[0], lp)


def test_two_fresh_runs_with_the_same_seed_give_identical_weights():
    """The new networks are seeded from cfg.seed, whatever state torch's global RNG is in."""
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        agent = ReinFlowPPO(make_policy(), make_envs(4), None, small_cfg(seed=7))
        run(agent, 2)
        results.append({**agent.actor.state_dict(), **{f"critic.{k}": v for k, v in agent.critic.state_dict().items()}})
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_diagnostics_are_logged_for_every_actor():
    for kind in ("reflow", "gaussian"):
        agent = ReinFlowPPO(make_policy(kind), make_envs(4), None, small_cfg())
        m = run(agent, 2)[-1]
        for key in ("train/kl_per_dim", "train/log_ratio_std", "train/log_ratio_absmax", "train/sigma_obs_min",
                    "train/sigma_obs_max", "train/explained_variance", "train/value_loss", "rollout/return_mean"):
            assert key in m and math.isfinite(m[key]), (kind, key)
        assert m["train/sigma_obs_min"] <= m["train/sigma_mean"] <= m["train/sigma_obs_max"]


def test_non_finite_loss_stops_fine_tuning_with_the_iteration_named():
    agent = ReinFlowPPO(make_policy(), make_envs(4), None, small_cfg())
    with torch.no_grad():
        agent.critic.mlp[-1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="iteration 0"):
        run(agent, 1)


@pytest.mark.parametrize("kind", ["reflow", "shortcut", "gaussian"])
def test_skipping_clipped_samples_gives_the_same_update(kind):
    """skip_clipped backpropagates only the samples whose clipped surrogate term has a gradient; with a tight
    clip and many epochs most minibatches take that path, and the parameters match the plain update."""
    params = {}
    for skip in (False, True):
        cfg = small_cfg(skip_clipped=skip, ent_coef=0.0, clip_coef=0.005, update_epochs=8, minibatch_size=16,
                        critic_warmup_iters=0, denoise_steps=2 if kind == "shortcut" else 4)
        agent = ReinFlowPPO(make_policy(kind), make_envs(4), None, cfg)
        m = agent.update(agent.collect_rollout())
        assert (m["train/two_pass"] > 0.3) == skip, m["train/two_pass"]
        params[skip] = [p.detach().clone() for p in agent.actor.parameters()]
    moved = max(float((a - b).abs().max()) for a, b in zip(params[True], [p.detach() for p in
                                                                           make_policy(kind).parameters()]))
    assert moved > 1e-3  # the update did something
    for a, b in zip(params[False], params[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_success_options_build_the_training_envs_only():
    cfg = small_cfg(terminate_on_success=True, success_reward=1.0)
    assert cfg.train_env_kwargs() == {"terminate_on_success": True, "success_reward": 1.0}
    assert small_cfg().train_env_kwargs() == {}


@pytest.mark.parametrize("kind", ["reflow", "gaussian"])
def test_ppo_evaluation_and_rollout_episodes_agree(kind):
    """Fine-tuning's deterministic evaluation and agents.evaluate.rollout_episodes share one episode split
    (spare episodes to the last envs): the same policy and seed give the same episodes."""
    from agents.evaluate import rollout_episodes

    policy = make_policy(kind)
    agent = ReinFlowPPO(policy, make_envs(2), make_envs(3), small_cfg(eval_episodes=7, eval_seed=123))
    m = agent.evaluate()
    ref = rollout_episodes(policy, "unused", 7, steps=4 if kind == "reflow" else None, envs=make_envs(3), seed=123)
    assert m["eval/episodes"] == len(ref["returns"]) == 7
    assert m["eval/return_mean"] == pytest.approx(np.mean(ref["returns"]), abs=1e-9)
    assert m["eval/return_std"] == pytest.approx(np.std(ref["returns"]), abs=1e-9)


def test_episode_quotas_give_spares_to_the_last_envs_and_split_across_processes():
    from envs.episodes import episode_quotas

    assert episode_quotas(7, 3).tolist() == [2, 2, 3]
    assert episode_quotas(7, 3).sum() == 7
    whole = episode_quotas(11, 8).tolist()
    assert episode_quotas(11, 4, 0, 8).tolist() + episode_quotas(11, 4, 4, 8).tolist() == whole
    with pytest.raises(ValueError):
        episode_quotas(5, 4, 6, 8)


@pytest.mark.parametrize("kind", ["reflow", "gaussian"])
def test_stochastic_evaluation_runs_the_training_policy_on_the_same_episodes(kind):
    """eval_stochastic adds eval_stochastic/... metrics: the same episode count, the noisy policy (so other
    returns than the deterministic one), reproducible from eval_seed, and logged at every eval point."""
    agent = ReinFlowPPO(make_policy(kind), make_envs(2), make_envs(3),
                        small_cfg(eval_episodes=4, eval_seed=5, eval_stochastic=True, eval_every=1))
    det, sto = agent.evaluate(), agent.evaluate(stochastic=True)
    assert sto["eval_stochastic/episodes"] == det["eval/episodes"] == 4
    assert sto["eval_stochastic/return_mean"] != det["eval/return_mean"]
    assert agent.evaluate(stochastic=True) == sto
    seen = []
    agent.learn(1, callback=lambda a, m: seen.append(sorted(k for k in m if k.startswith("eval"))), progress=False)
    assert all("eval_stochastic/return_mean" in keys and "eval/return_mean" in keys for keys in seen) and seen


def test_a_new_policy_kind_plugs_in_through_the_actor_registry(monkeypatch):
    """register_actor is the one place a new policy kind names its PPO actor; nothing else in the loop changes."""
    from agents import actors
    from agents.actors import GaussianActor, make_actor, register_actor

    monkeypatch.setattr(actors, "ACTORS", dict(actors.ACTORS))
    policy = make_policy("gaussian")
    policy.kind = "my_kind"
    with pytest.raises(ValueError, match="register_actor"):
        make_actor(policy, small_cfg())

    class MyActor(GaussianActor):
        pass

    register_actor("my_kind", MyActor)
    assert type(make_actor(policy, small_cfg())) is MyActor
    agent = ReinFlowPPO(policy, make_envs(2), None, small_cfg())
    assert type(agent.actor) is MyActor and agent.update(agent.collect_rollout())["train/value_loss"] >= 0
    with pytest.raises(TypeError):
        register_actor("bad", object)


# --- FPO: the algorithm registry's proof (algo=fpo) ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["reflow", "shortcut"])
def test_fpo_ratio_is_the_flow_matching_loss_difference_on_stored_pairs(kind):
    """FPO's log-prob is minus the CFM loss of the sampled chunk on its stored (eps_i, t_i), checked against a
    loop over the pairs; it is reproduced exactly at scoring time (ratio 1 before any step)."""
    from agents.actors import FPOActor, make_actor

    policy = make_policy(kind)
    actor = make_actor(policy, small_cfg(algo="fpo", fpo_mc_samples=3, denoise_steps=2))
    assert type(actor) is FPOActor and actor.logprob_count == TA * 2
    cond = torch.randn(5, 2)
    with torch.no_grad():
        s = actor.act(cond, generator=torch.Generator().manual_seed(0))
        lp, ent = actor.evaluate(cond, s.latent)
    assert s.latent.shape == (5, 4, TA * 2 + 1) and torch.equal(lp, s.log_prob) and not ent.any()
    a = s.latent[:, 0, :-1].reshape(5, TA, 2)
    brute = torch.zeros(5)
    for i in range(3):
        eps, t = s.latent[:, 1 + i, :-1].reshape(5, TA, 2), s.latent[:, 1 + i, -1]
        x_t = t[:, None, None] * a + (1 - t[:, None, None]) * eps
        d = torch.full_like(t, policy.flow.finest_step) if kind == "shortcut" else None
        with torch.no_grad():
            v = policy.velocity(x_t, t, cond, d)
        brute += (v - (a - eps)).pow(2).sum((1, 2)) / 3
    torch.testing.assert_close(lp, -brute / (TA * 2))
    agent = ReinFlowPPO(make_policy(kind), make_envs(8), None, small_cfg(algo="fpo", critic_warmup_iters=0))
    m = run(agent, 2)
    assert all(x["train/ratio_first_minibatch"] <= 1e-6 for x in m) and m[-1]["train/approx_kl"] > 0


def test_fpo_deterministic_action_is_the_policy_ode_from_the_scaled_initial_noise():
    from agents.actors import make_actor

    policy = make_policy()
    actor = make_actor(policy, small_cfg(algo="fpo", denoise_steps=4, init_noise_scale=0.5))
    cond = torch.randn(6, 2)
    with torch.no_grad():
        s = actor.act(cond, deterministic=True, generator=torch.Generator().manual_seed(3))
        x0 = torch.randn(6, TA, 2, generator=torch.Generator().manual_seed(3)) * 0.5
        ref = policy.predict_normalized(cond, steps=4, x0=x0)
    torch.testing.assert_close(s.latent[:, 0, :-1].reshape(6, TA, 2), ref)
    torch.testing.assert_close(s.action, policy.clamp_normalized(ref))


def test_algo_choice_errors_are_clear():
    from agents.actors import make_actor

    with pytest.raises(ValueError, match="algo must be one of"):
        small_cfg(algo="trpo")
    with pytest.raises(ValueError, match="algo=ppo does not fine-tune a reflow policy"):
        make_actor(make_policy(), small_cfg(algo="ppo"))
    with pytest.raises(ValueError, match="algo=fpo fine-tunes flow policies"):
        make_actor(make_policy("gaussian"), small_cfg(algo="fpo"))


def fpo_gain(seed: int = 0) -> list[float]:
    cfg = FinetuneConfig(algo="fpo", n_steps=16, denoise_steps=4, clip_coef=0.02, actor_lr=3e-4, critic_lr=3e-3,
                         update_epochs=10, minibatch_size=64, critic_warmup_iters=1, eval_every=12, eval_episodes=32,
                         critic_hidden=(64, 64), ent_coef=0.0, seed=seed)
    agent = ReinFlowPPO(train_poor_bc_policy(seed), make_envs(8), make_envs(8, gym.vector.AutoresetMode.SAME_STEP),
                        cfg)
    evals = []
    agent.learn(10**9, callback=lambda a, m: (evals.append(m["eval/return_mean"]) if "eval/return_mean" in m
                                              else None, a.iteration < 12)[1], progress=False)
    return evals


def test_fpo_improves_a_poorly_pretrained_flow_policy():
    """The same task and budget as ReinFlow's learning test above, from a fresh BC policy, at clip 0.02.

    FPO is much noisier than ReinFlow here: over BC/fine-tuning seeds 0-4 the gain was 0.26, 0.63, 0.16, 0.35,
    -0.64 (ReinFlow: 0.9-1.2 on every seed); at clip 0.1, -2.0 .. 1.2. With the ratio's sign flipped, seed 0
    loses 0.70. Demand 0.1 on seed 0 (gain 0.26): the update goes the right way."""
    evals = fpo_gain(0)
    assert len(evals) == 2
    assert evals[1] > evals[0] + 0.1, evals


def test_a_registered_algorithm_is_accepted_by_the_settings_and_trains(monkeypatch):
    from agents import actors, registry
    from agents.actors import GaussianActor, register_algorithm

    monkeypatch.setattr(actors, "ALGORITHMS", dict(actors.ALGORITHMS))
    monkeypatch.setattr(actors, "ALGORITHM_NAMES", set(registry.ALGORITHM_NAMES))
    monkeypatch.setattr(registry, "ALGORITHM_NAMES", actors.ALGORITHM_NAMES)
    import agents.finetune_config as fc

    monkeypatch.setattr(fc, "ALGORITHM_NAMES", actors.ALGORITHM_NAMES)
    with pytest.raises(ValueError, match="algo must be one of"):
        small_cfg(algo="my_ppo")

    class MyPPO(GaussianActor):
        pass

    register_algorithm("my_ppo", MyPPO)
    agent = ReinFlowPPO(make_policy("gaussian"), make_envs(2), None, small_cfg(algo="my_ppo"))
    assert type(agent.actor) is MyPPO


def narrow_policy(kind: str):
    """A policy whose demos used only [-0.5, 0.5] of the env's [-1, 1] on the first action dim."""
    policy = make_policy(kind)
    policy.act_norm.low[0], policy.act_norm.high[0] = -0.5, 0.5
    return policy


@pytest.mark.parametrize("kind", ["reflow", "gaussian"])
def test_env_action_limits_let_fine_tuning_act_past_the_demos_range(kind):
    """action_limits=data clips what is sent to the env to the demos' range (normalized [-1, 1]); =env to the
    env's bounds, so the noisy chain can explore actions the demos never used; the limits travel with the policy
    (its state dict) to deterministic evaluation after fine-tuning."""
    from agents.actors import make_actor

    big = torch.full((64, TA, 2), 5.0)
    for limits, expect in (("data", 0.5), ("env", 1.0)):
        policy = narrow_policy(kind)
        agent = ReinFlowPPO(policy, make_envs(2), None, small_cfg(action_limits=limits))
        with torch.no_grad():
            s = agent.actor.act(torch.randn(64, 2), generator=torch.Generator().manual_seed(0))
            sent = agent._env_actions(agent.envs, s.action)
        assert float(np.abs(sent[..., 0]).max()) <= expect + 1e-6
        # the env-unit action of a far-out latent is the limit itself, in the actor and in the saved policy
        torch.testing.assert_close(policy.act_norm.unnormalize(policy.clamp_normalized(big))[..., 0],
                                   torch.full((64, TA), expect))
        loaded = narrow_policy(kind)
        loaded.load_state_dict(policy.state_dict())
        torch.testing.assert_close(loaded.action_limits()[1], np.array([expect, 1.0], np.float32))
        assert float(loaded.predict_action_chunk(np.zeros((3, 2)))[..., 0].abs().max()) <= expect + 1e-6
    # the stochastic chain does leave the demos' range with env limits (noise bounds [0.4, 0.5] at clip 1)
    policy = narrow_policy(kind)
    actor = make_actor(policy, small_cfg(sigma_min=0.4, sigma_max=0.5))
    policy.set_action_limits([-1, -1], [1, 1])
    with torch.no_grad():
        a = actor.act(torch.randn(256, 2), generator=torch.Generator().manual_seed(1)).action
    assert float(a[..., 0].abs().max()) > 1.0


def test_policies_saved_before_action_limits_load_with_the_demos_range():
    policy = narrow_policy("reflow")
    state = {k: v for k, v in policy.state_dict().items() if not k.startswith("act_limit")}
    policy.set_action_limits([-1, -1], [1, 1])
    policy.load_state_dict(state)
    np.testing.assert_allclose(policy.action_limits()[0], [-0.5, -1.0])
    with pytest.raises(ValueError, match="low <= high"):
        policy.set_action_limits([1, 1], [-1, -1])
    with pytest.raises(ValueError, match="action_limits must be"):
        small_cfg(action_limits="wide")
