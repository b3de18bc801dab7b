"""Benchmark of online fine-tuning: ReinFlow (ReFlow K=4, Shortcut K=1) beside a Gaussian BC policy fine-tuned
with the same PPO, and stable-baselines3 PPO from scratch, on the same env-step budget, in one command.

    python -m bench.finetune --task hopper_medium --budget small --seeds 0 --workers 2
    python -m bench.finetune --task hopper_medium --budget full --seeds 0 1 2 --workers 16   # GPU box CPUs
    python -m bench.finetune --task pick_place --methods reflow --variant lowsig:sigma_min=0.02,sigma_max=0.06

Steps: demos (cached) -> BC pretraining of each policy kind -> fine-tuning runs (method x variant x seed) in
parallel worker processes, each on one CPU thread -> deterministic evaluation curves (return / success vs env
steps) at ``--eval-points`` points with ``--eval-episodes`` episodes each, the same evaluation episodes (env
seeds) for every method, SB3 included. Writes bench/results/finetune_<task>.{json,md,png}: per run the final
and best return and their ratio, per method the mean over seeds with a 95% bootstrap interval and the
interquartile mean, the ratio to the Gaussian + same-PPO baseline, and wall time per 100k env steps (also as a
ratio to SB3 PPO's in the same command). The JSON keeps every curve and the PPO diagnostics of every
iteration (KL per executed action dim, clip fraction, log-ratio spread, sigma, stochastic rollout return,
explained variance, value loss).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import re
import time
from pathlib import Path

import numpy as np

from bench.common import code_version, write_json_atomic  # noqa: F401 (code_version: used by tests too)

BUDGETS = {
    # env steps of fine-tuning, BC gradient steps
    "small": {"env_steps": 40_000, "pretrain_steps": 1500},
    "full": {"env_steps": 1_000_000, "pretrain_steps": 4000},
}
TASKS = {
    "hopper_medium": {"env": "Hopper-v5", "demos": {"num_demos": 20, "quality": "medium", "noise": 0.0},
                      "obs_horizon": 1, "action_horizon": 4, "exec_horizon": 4, "max_episode_steps": 1000},
    "walker2d_medium": {"env": "Walker2d-v5", "demos": {"num_demos": 20, "quality": "medium", "noise": 0.0},
                        "obs_horizon": 1, "action_horizon": 4, "exec_horizon": 4, "max_episode_steps": 1000},
    "pick_place": {"env": "metaworld/pick-place-v3", "demos": {"num_demos": 20, "noise": 0.3},
                   "obs_horizon": 1, "action_horizon": 4, "exec_horizon": 2, "max_episode_steps": 200},
    # the robosuite extra; settings of configs/task/robosuite_{lift,can}.yaml (python -m bench.robosuite)
    "robosuite_lift": {"env": "robosuite/Lift", "demos": {"num_demos": 20, "noise": 0.3},
                       "obs_horizon": 1, "action_horizon": 4, "exec_horizon": 2, "max_episode_steps": 150},
    "robosuite_can": {"env": "robosuite/Can", "demos": {"num_demos": 30, "noise": 0.2},
                      "obs_horizon": 1, "action_horizon": 4, "exec_horizon": 2, "max_episode_steps": 400},
}
POLICY_SPECS = {
    "reflow": {"kind": "reflow", "network": "mlp", "hidden": 256, "depth": 3, "default_steps": 4},
    "shortcut": {"kind": "shortcut", "network": "mlp", "hidden": 256, "depth": 3, "default_steps": 1,
                 "max_level": 5},
    "gaussian": {"kind": "gaussian", "hidden": 256, "depth": 2},
}
K_FOR = {"reflow": 4, "shortcut": 1, "gaussian": 1, "fpo": 4}
# methods that fine-tune another method's pretrained policy with another algorithm: method -> (kind, overrides)
ALGO_METHODS = {"fpo": ("reflow", {"algo": "fpo"})}


def task_spec(task: str) -> dict:
    """A named task of TASKS, or any Meta-World v3 task as ``metaworld/<name>-v3`` with pick-place's setup
    (20 scripted demos with noise 0.3, Ta = 4, Te = 2, 200-step episodes) and configs/task/metaworld.yaml."""
    if task in TASKS:
        return TASKS[task]
    if task.startswith("metaworld/"):
        return {**TASKS["pick_place"], "env": task}
    raise SystemExit(f"error: unknown --task {task!r}; use one of {sorted(TASKS)} or metaworld/<task>-v3")


def _task_finetune_defaults(task: str) -> dict:
    """The task's `finetune:` section of configs/task/<task>.yaml (the same defaults train.py uses)."""
    import yaml

    name = "metaworld" if task.startswith("metaworld/") else task
    path = Path(__file__).resolve().parents[1] / "configs" / "task" / f"{name}.yaml"
    d = dict(yaml.safe_load(path.read_text()).get("finetune") or {})
    d.pop("total_env_steps", None)
    return d


def eval_interval(settings: dict, env_steps: int, exec_horizon: int, points: int) -> int:
    """Iterations between evaluations for about ``points`` points over ``env_steps``, from these fine-tuning
    settings' env steps per iteration (a variant that changes n_steps or num_envs gets its own interval)."""
    per_iter = int(settings.get("n_steps", 256)) * int(settings.get("num_envs", 16)) * int(exec_horizon)
    return max(1, max(1, math.ceil(env_steps / per_iter)) // max(1, points))


def _pretrain(args):
    kind, task, dataset, out_dir, steps, seed, exec_horizon = args
    import torch

    torch.set_num_threads(1)
    from agents.pretrain import PretrainConfig, Pretrainer

    t = {**task_spec(task), **({"exec_horizon": exec_horizon} if exec_horizon else {})}
    cfg = PretrainConfig(dataset=dataset, env_name=t["env"], run_dir=str(out_dir), policy=POLICY_SPECS[kind],
                         obs_horizon=t["obs_horizon"], action_horizon=t["action_horizon"],
                         exec_horizon=t["exec_horizon"], grad_steps=steps, eval_every=0, eval_episodes=0,
                         save_every=steps, max_episode_steps=t["max_episode_steps"], seed=seed, progress=False,
                         tensorboard=False, resume=False)
    t0 = time.perf_counter()
    out = Pretrainer(cfg).run()
    return kind, out["checkpoint"], time.perf_counter() - t0


DIAG_KEYS = ("train/approx_kl", "train/kl_per_dim", "train/clipfrac", "train/log_ratio_std", "train/sigma_mean",
             "train/sigma_obs_min", "train/sigma_obs_max", "rollout/return_mean", "train/explained_variance",
             "train/value_loss", "train/actor_updated", "train/epochs", "train/two_pass", "train/carry_frac")


def _finetune_settings(task: str, method: str, seed: int, overrides: dict) -> dict:
    """The fine-tuning settings of one run: the task's defaults, the method's K, the seed, then ``overrides``
    (evaluation, the method's algorithm, the variant's settings)."""
    return {**_task_finetune_defaults(task), "denoise_steps": K_FOR[method], "seed": seed, **overrides}


def _save_state(path: Path, agent, curve: list, diag: list, eval_s: float, wall_s: float) -> None:
    """A run's state at an iteration boundary (the agent's exact-resume state, the curve and diagnostics so far,
    its times), written atomically: a run killed while saving keeps the state before."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"agent": agent.state_dict(), "log": json.dumps({"curve": curve, "diagnostics": diag,
                                                                 "eval_s": eval_s, "wall_s": wall_s},
                                                                default=float)}, tmp)
    os.replace(tmp, path)


def _finetune(args, state_path: str | None = None):
    """One fine-tuning run. With ``state_path`` its state is saved there after every iteration, and a run that
    finds a state there (one cut off mid-way) resumes from it: the same results as one uninterrupted run (the
    envs are reset at every iteration), its wall time the sum of the parts that ran."""
    method, variant, overrides, seed, task, ckpt, env_steps = args
    import torch

    torch.set_num_threads(1)
    from agents.finetune import FinetuneConfig, ReinFlowPPO
    from agents.policies import policy_from_checkpoint
    from envs.factory import make_vec_env

    t = task_spec(task)
    cfg = FinetuneConfig.from_dict(_finetune_settings(task, method, seed, overrides))
    policy, _ = policy_from_checkpoint(ckpt)
    envs = make_vec_env(t["env"], cfg.num_envs, seed=1000 * seed, asynchronous=cfg.async_envs,
                        action_horizon=policy.exec_horizon,
                        max_episode_steps=t["max_episode_steps"], **cfg.train_env_kwargs())
    eval_envs = make_vec_env(t["env"], cfg.eval_num_envs, seed=cfg.eval_seed, action_horizon=policy.exec_horizon,
                             max_episode_steps=t["max_episode_steps"])
    agent = ReinFlowPPO(policy, envs, eval_envs, cfg)
    curve, diag = [], []
    eval_s = [0.0]  # evaluation time, kept out of the training wall time per 100k env steps
    evaluate = agent.evaluate

    def timed_evaluate(*a, **kw):
        te = time.perf_counter()
        try:
            return evaluate(*a, **kw)
        finally:
            eval_s[0] += time.perf_counter() - te

    agent.evaluate = timed_evaluate
    state = Path(state_path) if state_path else None
    wall_before, resumed_at = 0.0, None
    if state is not None and state.exists():
        saved = torch.load(state, weights_only=True)
        agent.load_state_dict(saved["agent"])
        log = json.loads(saved["log"])
        curve, diag, eval_s[0], wall_before = log["curve"], log["diagnostics"], log["eval_s"], log["wall_s"]
        resumed_at = agent.env_steps
        print(f"[bench.finetune] {method}/{variant} seed {seed}: resumed at {resumed_at} env steps from {state}",
              flush=True)
    t0 = time.perf_counter() - wall_before

    def cb(a, m):
        if "train/policy_loss" in m or "train/value_loss" in m:
            diag.append({"env_steps": int(m["charts/env_steps"]),
                         **{k.split("/")[1] if k.startswith("train/") else k: m[k] for k in DIAG_KEYS if k in m}})
        if "eval/return_mean" in m:
            curve.append({"env_steps": int(m["charts/env_steps"]), "return": m["eval/return_mean"],
                          "success": m["eval/success_rate"], "wall_s": time.perf_counter() - t0,
                          **({"stoch_return": m["eval_stochastic/return_mean"],
                              "stoch_success": m["eval_stochastic/success_rate"]}
                             if "eval_stochastic/return_mean" in m else {})})
        if state is not None and a.iteration > 0 and a.env_steps < env_steps:
            _save_state(state, a, curve, diag, eval_s[0], time.perf_counter() - t0)

    try:
        agent.learn(env_steps, callback=cb, progress=False)
    finally:
        envs.close()
    if not curve or curve[-1]["env_steps"] != agent.env_steps:
        m = agent._evaluations()
        curve.append({"env_steps": agent.env_steps, "return": m["eval/return_mean"],
                      "success": m["eval/success_rate"], "wall_s": time.perf_counter() - t0,
                      **({"stoch_return": m["eval_stochastic/return_mean"],
                          "stoch_success": m["eval_stochastic/success_rate"]}
                         if "eval_stochastic/return_mean" in m else {})})
    return {"method": method, "variant": variant, "seed": seed, "curve": curve, "diagnostics": diag,
            "wall_s": time.perf_counter() - t0, "eval_s": eval_s[0], "env_steps": agent.env_steps,
            **({"resumed_at": resumed_at} if resumed_at is not None else {})}


def _run_path(job, runs_dir: Path, code: str) -> Path:
    """Where a fine-tuning run is saved: named by method, variant and seed, keyed by everything that decides it
    (settings, budget, task, the pretrained weights' bytes, the code version)."""
    import hashlib

    method, variant, overrides, seed, task, ckpt, env_steps = job
    weights = hashlib.sha256()
    for f in sorted(Path(ckpt).rglob("*.safetensors")):  # the weights and their EMA
        weights.update(f.read_bytes())
    if (Path(ckpt) / "config.yaml").exists():  # and what the weights mean: the policy, its dims and horizons (Te)
        import yaml

        meta = yaml.safe_load((Path(ckpt) / "config.yaml").read_text()) or {}
        weights.update(json.dumps({k: meta.get(k) for k in ("policy", "dims", "horizons")}, sort_keys=True).encode())
    key = json.dumps({"method": method, "overrides": overrides, "seed": seed, "task": task, "env_steps": env_steps,
                      "task_defaults": _task_finetune_defaults(task), "weights": weights.hexdigest(), "code": code},
                     sort_keys=True, default=str)
    return runs_dir / f"{method}-{variant}-seed{seed}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _has_success(task: str) -> bool:
    """Whether the task's score is its success rate (manipulation) rather than its return (locomotion)."""
    return task_spec(task)["env"].startswith(("metaworld", "robosuite"))


def _saved(path: Path, label: str, run_fn, reuse: bool, success: bool) -> dict:
    """``run_fn()`` saved to ``path`` as soon as it ends (atomic write), or the saved run when ``reuse`` and it
    exists; one log line either way, with the task's score (``success``: the success rate, else the return)."""
    if reuse and path.exists():
        run = {**json.loads(path.read_text()), "reused": True}
        print(f"[bench.finetune] {label}: reused {path}", flush=True)
        return run
    run = run_fn()
    write_json_atomic(path, run)  # a run killed while writing leaves no half file behind
    last = run["curve"][-1]
    score = f"success {last['success']:.3f}" if success else f"return {last['return']:.1f}"
    print(f"[bench.finetune] {label}: final {score} at {run['env_steps']} env steps, {run['wall_s']:.0f} s; "
          f"saved {path}", flush=True)
    return run


def _finetune_saved(args):
    """One fine-tuning run, saved as soon as it ends; a rerun of the same command reuses it (printed either way),
    so a long benchmark that is stopped or fails late keeps its finished runs."""
    job, runs_dir, code, reuse = args
    method, variant, _, seed = job[:4]
    path = _run_path(job, Path(runs_dir), code)
    state = path.with_name(path.stem + ".state.pt")  # a run cut off mid-way resumes from it (same key)
    if not reuse:
        state.unlink(missing_ok=True)
    run = _saved(path, f"{method}/{variant} seed {seed}", lambda: _finetune(job, str(state)), reuse,
                 _has_success(job[4]))
    state.unlink(missing_ok=True)
    return run


def _sb3_saved(args):
    """One SB3 PPO run, saved and reused like the fine-tuning runs; keyed by its arguments (seed, task, budget,
    evaluation), stable-baselines3's version and the code version."""
    import hashlib

    import stable_baselines3

    sb3_args, runs_dir, code, reuse = args
    key = json.dumps({"args": list(sb3_args), "task_defaults": _task_finetune_defaults(sb3_args[1]),
                      "sb3": stable_baselines3.__version__, "code": code}, sort_keys=True, default=str)
    path = Path(runs_dir) / f"sb3_ppo-default-seed{sb3_args[0]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    return _saved(path, f"sb3_ppo seed {sb3_args[0]}", lambda: _sb3_ppo(sb3_args), reuse, _has_success(sb3_args[1]))


def _evaluate_sb3(model, task: str, n_episodes: int, eval_seed: int, num_envs: int) -> float:
    """SB3 model on the same evaluation episodes as ReinFlowPPO.evaluate: ``num_envs`` envs reset with
    ``eval_seed``, env i running ``(n + i) // M`` episodes (the one rule), deterministic actions."""
    from envs.episodes import run_episodes
    from envs.factory import make_vec_env

    t = task_spec(task)
    envs = make_vec_env(t["env"], num_envs, seed=eval_seed, action_horizon=1,
                        max_episode_steps=t["max_episode_steps"])
    try:
        res = run_episodes(envs, lambda obs: model.predict(obs, deterministic=True)[0], n_episodes, eval_seed)
        returns = res["returns"]
        return float(np.mean(returns))
    finally:
        envs.close()


def _sb3_ppo(args):
    seed, task, env_steps, eval_every_steps, eval_episodes, eval_seed, eval_num_envs = args
    import torch

    torch.set_num_threads(1)
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    from envs.factory import make_env

    t = task_spec(task)
    venv = DummyVecEnv([lambda i=i: Monitor(make_env(t["env"], seed=1000 * seed + i,
                                                     max_episode_steps=t["max_episode_steps"]))
                        for i in range(8)])
    curve, eval_s = [], [0.0]
    t0 = time.perf_counter()

    def timed_evaluate(model):
        te = time.perf_counter()
        mean = _evaluate_sb3(model, task, eval_episodes, eval_seed, eval_num_envs)
        eval_s[0] += time.perf_counter() - te
        return mean

    class Eval(BaseCallback):
        def __init__(self):
            super().__init__()
            self.next = 0

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next:
                self.next += eval_every_steps
                mean = timed_evaluate(self.model)
                curve.append({"env_steps": int(self.num_timesteps), "return": float(mean), "success": None,
                              "wall_s": time.perf_counter() - t0})
            return True

    model = PPO("MlpPolicy", venv, seed=seed, verbose=0, device="cpu")
    model.learn(env_steps, callback=Eval())
    mean = timed_evaluate(model)
    curve.append({"env_steps": int(model.num_timesteps), "return": float(mean), "success": None,
                  "wall_s": time.perf_counter() - t0})
    return {"method": "sb3_ppo", "variant": "default", "seed": seed, "curve": curve,
            "wall_s": time.perf_counter() - t0, "eval_s": eval_s[0], "env_steps": int(model.num_timesteps)}


VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def _parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,...`` -> (name, settings); ValueError (the reason, one line) for text of another form.
    The values are read as YAML (numbers, true/false, null, strings); the settings are checked by
    :func:`_check_variant`."""
    import yaml

    name, colon, kv = text.partition(":")
    if not colon:
        raise ValueError("expected name:key=value,... (no ':' after the name)")
    if not VARIANT_NAME.fullmatch(name):
        raise ValueError(f"the name {name!r} must be letters, digits and _.+- (it names the run files)")
    if name == "default":
        raise ValueError("'default' is the name of the runs with the task's settings; name the variant otherwise")
    over = {}
    items = kv.split(",")
    if not kv or not all(items):
        raise ValueError("expected name:key=value,... (an empty setting)")
    for item in items:
        k, eq, v = item.partition("=")
        k = k.strip()
        if not eq or not k:
            raise ValueError(f"{item!r} is not key=value")
        if k in over:
            raise ValueError(f"{k} is set twice")
        try:
            val = yaml.safe_load(v)
        except yaml.YAMLError:
            raise ValueError(f"{k}={v}: not a value") from None
        if isinstance(val, str):  # YAML 1.1 reads 1e-5 (no dot) as a string: a number is meant
            try:
                val = float(val)
            except ValueError:
                pass
        over[k] = val
    return name, over


def _type_ok(value, hint) -> bool:
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is tuple:
        return isinstance(value, (list, tuple)) and all(_type_ok(x, int) for x in value)
    return True


def _check_variant(over: dict, settings: list[dict]) -> None:
    """ValueError (one line) when a variant's settings ``over`` are not fine-tuning settings, or a value has
    the wrong type, or a run's whole settings (``settings``: one per method, the variant's included) are
    refused by :class:`agents.finetune.FinetuneConfig`'s checks; checked before anything trains."""
    import dataclasses
    import difflib
    import typing

    from agents.finetune import FinetuneConfig
    from agents.renamed import hint

    hints = typing.get_type_hints(FinetuneConfig)
    written = {f.name: str(f.type) for f in dataclasses.fields(FinetuneConfig)}  # e.g. "float | None"
    for k, v in over.items():
        if k == "seed":
            raise ValueError("the seed is not a variant's setting: use --seeds")
        if k not in hints:
            close = difflib.get_close_matches(k, list(written), n=1)
            why = hint(k, "finetune") or (f" (did you mean {close[0]}?)" if close else "")
            raise ValueError(f"unknown setting {k!r}{why}; the settings are FinetuneConfig's "
                             "(agents/finetune_config.py)")
        if not _type_ok(v, hints[k]):
            raise ValueError(f"{k}={v!r}: expected {written[k]}")
    for fc in settings:
        try:
            FinetuneConfig.from_dict(fc)
        except (ValueError, TypeError) as e:
            raise ValueError(str(e).removeprefix("FinetuneConfig: ")) from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="hopper_medium",
                   help=f"one of {sorted(TASKS)}, or any Meta-World v3 task as metaworld/<name>-v3")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    p.add_argument("--env-steps", type=int, default=None, help="override the budget's fine-tuning env steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=["reflow", "shortcut", "fpo", "gaussian", "sb3_ppo"],
                   help="reflow, shortcut (ReinFlow), fpo (FPO on the reflow policy), gaussian (same PPO), sb3_ppo")
    p.add_argument("--variant", action="append", default=[],
                   help="name:key=value,... extra fine-tuning settings to compare (default variant always runs)")
    p.add_argument("--skip-default", action="store_true",
                   help="run only the --variant settings (e.g. when the default's runs exist from another command)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--work", default="/tmp/flowpolicy_bench",
                   help="folder for pretraining checkpoints and fine-tuning runs (runs/): rerunning the same "
                        "command with the same code reuses the runs it finished and resumes those cut off mid-way "
                        "from their last iteration")
    p.add_argument("--no-reuse", action="store_true",
                   help="rerun every fine-tuning run from the start, even those saved under --work by the same "
                        "command")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the budget's BC gradient steps")
    p.add_argument("--exec-horizon", type=int, default=None,
                   help="actions executed per predicted chunk (Te, 1..Ta; default: the task's); scale the task's "
                        "n_steps with a --variant to keep the env steps per iteration")
    p.add_argument("--eval-episodes", type=int, default=20, help="deterministic episodes per evaluation point")
    p.add_argument("--eval-points", type=int, default=10,
                   help="evaluation points along the curve (plus the initial one)")
    p.add_argument("--eval-stochastic", action="store_true",
                   help="also evaluate every run's policy as it acts in training (same episodes): final/best "
                        "stochastic return and success beside the deterministic ones")
    p.add_argument("--merge", default=None, metavar="JSON",
                   help="an earlier finetune_<task>.json (with its _curves.json beside it) made with the same "
                        "task, budget, pretraining, dataset and evaluation: its runs join this run's tables and "
                        "plot (for a method added later without rerunning the others); settings are checked and "
                        "both commands are listed")
    p.add_argument("--eval-seed", type=int, default=None,
                   help="first env seed of the evaluation episodes (default: the task's, 100000); tune settings "
                        "with another one (and other training seeds) than the one whose numbers you report")
    args = p.parse_args(argv)
    from bench.common import RESULTS, check_not_written, check_out_dir, load_result, save_results
    from envs.collect import ensure_demos

    # every argument is checked here, before the demos, the pretraining or any run: a mistake found after hours
    # of runs would cost them
    for flag, value, low in (("--env-steps", args.env_steps, 1), ("--pretrain-steps", args.pretrain_steps, 1),
                             ("--workers", args.workers, 1), ("--eval-episodes", args.eval_episodes, 1),
                             ("--eval-points", args.eval_points, 1), ("--eval-seed", args.eval_seed, 0)):
        if value is not None and value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    if min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds):
        p.error(f"--seeds must be distinct and >= 0 (they seed the envs), got {args.seeds}")
    budget = dict(BUDGETS[args.budget])
    if args.env_steps is not None:
        budget["env_steps"] = args.env_steps
    if args.pretrain_steps is not None:
        budget["pretrain_steps"] = args.pretrain_steps
    t_start = time.perf_counter()
    t = task_spec(args.task)
    if args.exec_horizon is not None:
        if not 1 <= args.exec_horizon <= t["action_horizon"]:
            raise SystemExit(f"error: --exec-horizon must be in [1, {t['action_horizon']}] (the task's Ta), "
                             f"got {args.exec_horizon}")
        t = {**t, "exec_horizon": args.exec_horizon}
    slug = args.task.replace("/", "_")  # metaworld/push-v3 -> metaworld_push-v3
    work = Path(args.work) / slug
    unknown = [m for m in args.methods if m not in POLICY_SPECS and m not in ALGO_METHODS and m != "sb3_ppo"]
    if unknown:
        raise SystemExit(f"error: unknown --methods {unknown}; use {sorted([*POLICY_SPECS, *ALGO_METHODS, 'sb3_ppo'])}")
    kinds = sorted({m for m in args.methods if m in POLICY_SPECS}
                   | {ALGO_METHODS[m][0] for m in args.methods if m in ALGO_METHODS})
    ft_methods = [m for m in args.methods if m in POLICY_SPECS or m in ALGO_METHODS]
    ft_defaults = _task_finetune_defaults(args.task)
    steps_per_iter = int(ft_defaults.get("n_steps", 256)) * int(ft_defaults.get("num_envs", 16)) * t["exec_horizon"]
    eval_every = eval_interval(ft_defaults, budget["env_steps"], t["exec_horizon"], args.eval_points)
    eval_over = {"eval_every": eval_every, "eval_episodes": args.eval_episodes}
    if args.eval_stochastic:
        eval_over["eval_stochastic"] = True
    if args.eval_seed is not None:
        eval_over["eval_seed"] = args.eval_seed
    variants = [] if args.skip_default and args.variant else [("default", {})]
    for text in args.variant:  # each as its runs would build it: the task's defaults + the variant's settings
        try:
            vn, vo = _parse_variant(text)
            if vn in dict(variants):
                raise ValueError(f"a variant named {vn!r} is given twice")
            _check_variant(vo, [_finetune_settings(args.task, m, args.seeds[0],
                                                   {**eval_over, **ALGO_METHODS.get(m, (m, {}))[1], **vo})
                                for m in ft_methods or ["reflow"]])
        except ValueError as e:
            p.error(f"--variant {text!r}: {e}")
        variants.append((vn, vo))
    name = f"finetune_{slug}"
    out = check_out_dir(args.out or RESULTS)
    if args.merge:  # its kind and place here; its settings below, once the demos are known
        load_result(args.merge, "--merge", "bench.finetune", lambda r: str(r.get("name")).startswith("finetune"))
        check_not_written(args.merge, [out / f"{name}.json", out / f"{name}_curves.json"])
    dataset = str(ensure_demos(t["env"], seed=0, progress=False, **t["demos"]))
    from envs.hdf5 import read_demos

    demo_returns = [ep.episode_return for ep in read_demos(dataset)]
    eval_every_steps = eval_every * steps_per_iter
    eval_seed = int(args.eval_seed if args.eval_seed is not None else ft_defaults.get("eval_seed", 100_000))
    eval_num_envs = int(ft_defaults.get("eval_num_envs", 8))
    earlier = None
    if args.merge:  # checked before any run: a mismatch found after hours of runs would lose them
        planned = [{"method": m, "variant": vn, "seed": s} for m in ft_methods for vn, _ in variants
                   for s in args.seeds] + [{"method": "sb3_ppo", "variant": "default", "seed": s} for s in args.seeds
                                           if "sb3_ppo" in args.methods]
        earlier = _load_merge(args.merge, {"task": args.task, **budget, "exec_horizon": t["exec_horizon"],
                                           "finetune_defaults": ft_defaults,
                                           "eval": {**eval_over, "seed": eval_seed}, "dataset": Path(dataset).name,
                                           "demo_return_mean": float(np.mean(demo_returns))}, planned,
                              {"exec_horizon": task_spec(args.task)["exec_horizon"]}, dict(variants))
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        pre = pool.map(_pretrain, [(k, args.task, dataset, work / k, budget["pretrain_steps"], 0,
                                        args.exec_horizon) for k in kinds])
        ckpts = {k: c for k, c, _ in pre}
        pre_wall = {k: w for k, _, w in pre}
        jobs = [(m, vn, {**eval_over, "eval_every": eval_interval({**ft_defaults, **vo}, budget["env_steps"],
                                                                    t["exec_horizon"], args.eval_points),
                         **ALGO_METHODS.get(m, (m, {}))[1], **vo},
                 s, args.task, ckpts[ALGO_METHODS.get(m, (m,))[0]], budget["env_steps"])
                for m in ft_methods for vn, vo in variants for s in args.seeds]
        code = code_version()
        async_sb3 = pool.map_async(_sb3_saved, [((s, args.task, budget["env_steps"], eval_every_steps,
                                                  args.eval_episodes, eval_seed, eval_num_envs),
                                                 str(work / "runs"), code, not args.no_reuse) for s in args.seeds]) \
            if "sb3_ppo" in args.methods else None
        # runs with env worker processes (async_envs) cannot start inside a pool worker: they run here, after
        # the pool's runs, alone on the machine (their speed is what they are for)
        saved = [(j, str(work / "runs"), code, not args.no_reuse) for j in jobs]
        in_pool = [a for a in saved if not a[0][2].get("async_envs")]
        async_ft = pool.map_async(_finetune_saved, in_pool, chunksize=1)
        runs = async_ft.get() + (async_sb3.get() if async_sb3 else [])
    runs += [_finetune_saved(a) for a in saved if a[0][2].get("async_envs")]
    n_reused = sum(bool(r.pop("reused", False)) for r in runs)
    resumed = {f"{r['method']}/{r['variant']} seed {r['seed']}": r["resumed_at"] for r in runs if "resumed_at" in r}
    has_success = t["env"].startswith(("metaworld", "robosuite"))
    score = "success" if has_success else "return"
    rows = []
    sb3_final = {r["seed"]: r["curve"][-1]["return"] for r in runs if r["method"] == "sb3_ppo"}
    for r in runs:
        c = r["curve"]
        init, final = c[0]["return"], c[-1]["return"]
        best = max(x["return"] for x in c)
        row = {"method": r["method"], "variant": r["variant"], "seed": r["seed"], "env_steps": r["env_steps"],
               "eval_points": len(c), "initial_return": init, "final_return": final, "best_return": best,
               "final_over_best": final / best if best > 0 else None,
               "growth_pct": 100.0 * (final - init) / abs(init) if r["method"] != "sb3_ppo" and init else None,
               "wall_s": round(r["wall_s"], 1), "wall_s_per_100k": round(100_000 * r["wall_s"] / max(r["env_steps"], 1), 1),
               "train_s_per_100k": round(100_000 * (r["wall_s"] - r.get("eval_s", 0.0)) / max(r["env_steps"], 1), 1),
               "train_env_steps_per_s": round(r["env_steps"] / max(r["wall_s"] - r.get("eval_s", 0.0), 1e-9), 1)}
        if "stoch_return" in c[-1]:  # eval_stochastic: the policy as it acts in training, same episodes
            row["final_stoch_return"] = c[-1]["stoch_return"]
            row["best_stoch_return"] = max(x["stoch_return"] for x in c)
            if has_success:
                row["final_stoch_success"] = c[-1]["stoch_success"]
                row["best_stoch_success"] = max(x["stoch_success"] for x in c)
        if has_success:
            succ = [x["success"] for x in c if x["success"] is not None]
            row["initial_success"], row["final_success"] = c[0]["success"], c[-1]["success"]
            row["best_success"] = max(succ) if succ else None
        if r["seed"] in sb3_final and r["method"] != "sb3_ppo":
            row["final_vs_sb3_ppo"] = final / sb3_final[r["seed"]] if sb3_final[r["seed"]] else None
        rows.append(row)
    merged_note = ""
    if earlier is not None:
        rows += earlier["rows"]
        runs += earlier["runs"]
        merged_note = (f"\nRows of {earlier['methods']} come from an earlier run with the same task, budget, "
                       f"pretraining, dataset and evaluation episodes (checked): `{earlier['command']}` on "
                       f"{earlier['machine']}, {earlier['date']}, wall time {earlier['wall_s']} s."
                       f"{earlier['relabel_note']}\n")
    summary = _summarize(rows, score)
    wall = time.perf_counter() - t_start
    out_dir = Path(args.out) if args.out else None
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_curves.json").write_text(json.dumps(runs, indent=1))
    _plot(runs, out / f"{name}.png", args.task, has_success)
    cols = ["method", "variant", "seed", "env_steps", "initial_return", "final_return", "best_return",
            "final_over_best", "growth_pct", "final_vs_sb3_ppo", "wall_s_per_100k", "train_s_per_100k",
            "train_env_steps_per_s"]
    if has_success:
        cols[7:7] = ["initial_success", "final_success", "best_success"]
    if any("final_stoch_return" in r for r in rows):
        cols += [f"final_stoch_{score}", f"best_stoch_{score}"]
    from bench.common import markdown_table

    sum_cols = ["method", "variant", "n", f"initial_{score}", f"final_{score}", "final_ci95", f"final_{score}_iqm",
                f"best_{score}", "min_final_over_best", "final_vs_gaussian", "wall_s_per_100k", "train_s_per_100k",
                "train_vs_sb3_ppo", "train_env_steps_per_s"]
    if any(f"final_stoch_{score}" in r for r in summary):
        sum_cols.append(f"final_stoch_{score}")
    extra = (f"\n**Per method** (mean over seeds; 95% percentile-bootstrap interval of the mean; IQM = "
             f"interquartile mean; final_vs_gaussian = ratio of mean final {score} to the Gaussian + same-PPO "
             f"default's; min_final_over_best: the worst seed's final / best return):\n\n"
             f"{markdown_table(summary, sum_cols)}\n\n"
             f"Demo mean return {np.mean(demo_returns):.1f}; each run on one CPU thread, {args.workers} worker "
             f"processes in parallel. {args.eval_episodes} deterministic evaluation episodes every {eval_every} "
             f"iterations ({eval_every_steps} env steps; a variant that changes the env steps per iteration gets "
             f"its own interval for as many points), the same episodes (env seeds from {eval_seed}) for every "
             "method. growth_pct: final vs the pretrained policy's deterministic return at the same K. wall_s_per_100k: "
             "wall time of a run per 100k env steps, evaluations included; train_s_per_100k: the same without "
             "the evaluations (training rollouts and updates only).\n")
    extra += merged_note
    if n_reused:
        extra += (f"\n{n_reused} of {len(runs)} runs were reused from an earlier invocation of this command "
                  f"with the same code (saved under {work / 'runs'}); their wall times are from that invocation.\n")
    if resumed:
        extra += (f"\nRuns cut off mid-way and resumed from their saved state by a rerun of this command (env "
                  f"steps at the resume): {resumed}; the results are those of an uninterrupted run, the wall times "
                  "the sum of the parts that ran.\n")
    async_vs = [vn for vn, vo in variants if vo.get("async_envs")]
    if async_vs:
        gpu = torch_device_name()
        extra += (f"\nVariants {async_vs} step their training envs in worker processes (one per env) and ran one "
                  f"at a time after the other runs, alone on the machine; GPU: {gpu}.\n")
    save_results(name, rows, cols, {"task": args.task, "budget": args.budget, **budget,
                                    "exec_horizon": t["exec_horizon"], "seeds": args.seeds,
                                    "methods": args.methods, "variants": dict(variants),
                                    "finetune_defaults": ft_defaults, "eval": {**eval_over, "seed": eval_seed},
                                    "pretrain_wall_s": pre_wall, "dataset": dataset,
                                    "demo_return_mean": float(np.mean(demo_returns)), "workers": args.workers,
                                    "summary": summary},
                 wall, extra_md=extra, out_dir=out_dir, module="bench.finetune")


def _load_merge(path: str, mine: dict, rows: list[dict], missing: dict | None = None,
                variants: dict | None = None) -> dict:
    """Rows and curves of an earlier run for ``--merge``, after checking that its settings equal ``mine``;
    ``missing``: the values of settings that files from before they were recorded did not write. Fine-tuning
    settings are compared per variant (the task's defaults with the variant's overrides): an earlier variant
    that ran with this run's defaults is listed as ``default`` (e.g. a setting tried as a variant, then made
    the default), one that ran with a variant of this run's settings keeps its name, others are left out."""
    from bench.common import load_result

    p = Path(path)
    rec = load_result(p, "--merge", "bench.finetune", lambda r: str(r.get("name")).startswith("finetune"))
    try:
        runs = json.loads(p.with_name(p.stem + "_curves.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --merge {path}: cannot read its _curves.json beside it ({e})") from None
    if not isinstance(runs, list):
        raise SystemExit(f"error: --merge {path}: its _curves.json beside it is not a list of runs")
    cfg = {**(missing or {}), **rec.get("config", {})}
    cfg["dataset"] = Path(str(cfg.get("dataset"))).name  # the demo file by name (runs from other checkouts)
    mine = dict(mine)
    my_defaults = mine.pop("finetune_defaults", None)
    diff = [k for k, v in mine.items() if _json(cfg.get(k)) != _json(v)]
    labels = _merge_labels(cfg, my_defaults, variants or {}, {r["variant"] for r in rec["rows"]})
    kept = [r for r in rec["rows"] if r["method"] == "sb3_ppo" or labels.get(r["variant"])]
    if not any(r["method"] != "sb3_ppo" for r in kept) and any(r["method"] != "sb3_ppo" for r in rec["rows"]):
        diff.append("finetune_defaults")  # none of its fine-tuning runs match a setting of this run
    if diff:
        raise SystemExit(f"error: --merge {path}: settings differ from this run's in {diff}; rerun instead")

    def relabel(r: dict) -> dict:
        return r if r["method"] == "sb3_ppo" else {**r, "variant": labels[r["variant"]]}

    kept = [relabel(r) for r in kept]
    keys = [(r["method"], r["variant"], r["seed"]) for r in kept]
    mine_keys = {(r["method"], r["variant"], r["seed"]) for r in rows}
    clash = sorted((set(keys) & mine_keys) | {k for k in keys if keys.count(k) > 1})
    if clash:
        raise SystemExit(f"error: --merge {path}: runs {clash} are in both; merge only other methods or seeds")
    kept_runs = [relabel({"variant": "default", **r}) for r in runs
                 if r["method"] == "sb3_ppo" or labels.get(r.get("variant", "default"))]
    renamed = {vn: to for vn, to in labels.items() if to and to != vn}
    left = sorted(vn for vn, to in labels.items() if not to)
    note = "".join([f" Its variant '{vn}' ran with this run's '{to}' settings and is listed as '{to}'."
                    for vn, to in sorted(renamed.items())]
                   + ([f" Its variants {left} ran with settings that are none of this run's and are left out."] if left else []))
    return {"rows": kept, "runs": kept_runs, "methods": sorted({r["method"] for r in kept}),
            "command": rec.get("command"), "machine": rec.get("machine"), "date": rec.get("date"),
            "wall_s": rec.get("wall_s"), "relabel_note": note}


def _json(v):
    return json.loads(json.dumps(v))


def _merge_labels(cfg: dict, my_defaults: dict | None, my_variants: dict, names: set[str]) -> dict:
    """Earlier variant name -> its name in this run (``None``: settings this run neither has nor can name)."""
    theirs, their_variants = cfg.get("finetune_defaults"), cfg.get("variants") or {}
    if theirs is None or my_defaults is None:  # unrecorded: only an exact match of both (old behavior)
        return {vn: vn if _json(theirs) == _json(my_defaults) else None for vn in names}
    out = {}
    for vn in names:
        if vn != "default" and vn not in their_variants:
            out[vn] = vn if _json(theirs) == _json(my_defaults) and vn not in my_variants else None
            continue
        eff = _json({**theirs, **(their_variants.get(vn) or {} if vn != "default" else {})})
        if eff == _json(my_defaults):
            out[vn] = "default"
        elif vn in my_variants and eff == _json({**my_defaults, **(my_variants[vn] or {})}):
            out[vn] = vn
        elif _json(theirs) == _json(my_defaults) and vn not in my_variants:
            out[vn] = vn  # a variant this run does not try, on the same defaults
        else:
            out[vn] = None
    return out


def torch_device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def _summarize(rows: list[dict], score: str) -> list[dict]:
    """One row per (method, variant): statistics over seeds, ratios to the Gaussian baseline and to SB3."""
    from bench.stats import summarize

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["variant"]), []).append(r)
    key = "final_success" if score == "success" else "final_return"
    rows = [r for r in rows if r.get(key) is not None]  # SB3 has no success signal on Meta-World
    base = groups.get(("gaussian", "default"))
    base_mean = float(np.mean([r[key] for r in base])) if base else None
    sb3 = groups.get(("sb3_ppo", "default"))
    sb3_wall = float(np.mean([r["wall_s_per_100k"] for r in sb3])) if sb3 else None
    sb3_train = float(np.mean([r["train_s_per_100k"] for r in sb3])) if sb3 else None
    out = []
    for (method, variant), rs in groups.items():
        fin = summarize([r[key] for r in rs])
        init_key, best_key = key.replace("final", "initial"), key.replace("final", "best")
        fob = [r["final_over_best"] for r in rs if r.get("final_over_best") is not None]
        wall = float(np.mean([r["wall_s_per_100k"] for r in rs]))
        train = float(np.mean([r["train_s_per_100k"] for r in rs]))
        out.append({
            "method": method, "variant": variant, "n": fin["n"],
            f"initial_{score}": float(np.mean([r[init_key] for r in rs])) if all(
                r.get(init_key) is not None for r in rs) else None,
            f"final_{score}": fin["mean"], "final_ci95": f"[{fin['ci_lo']:.3g}, {fin['ci_hi']:.3g}]",
            f"final_{score}_iqm": fin["iqm"], f"final_{score}_ci_lo": fin["ci_lo"], f"final_{score}_ci_hi": fin["ci_hi"],
            f"best_{score}": float(np.mean([r[best_key] for r in rs if r.get(best_key) is not None])),
            "min_final_over_best": min(fob) if fob else None,
            "final_vs_gaussian": fin["mean"] / base_mean if base_mean else None,
            "wall_s_per_100k": round(wall, 1),
            "wall_vs_sb3_ppo": wall / sb3_wall if sb3_wall else None,
            "train_s_per_100k": round(train, 1),
            "train_vs_sb3_ppo": train / sb3_train if sb3_train else None,
            "train_env_steps_per_s": round(float(np.mean([r["train_env_steps_per_s"] for r in rs])), 1),
            **({f"final_stoch_{score}": float(np.mean([r[f"final_stoch_{score}"] for r in rs]))}
               if all(f"final_stoch_{score}" in r for r in rs) else {}),
        })
    return out


def _plot(runs, path, task, has_success):
    """Mean evaluation curve per (method, variant) with its 95% bootstrap band over seeds; thin lines are the
    seeds. A last panel shows the KL per executed action dim of every PPO update (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import save_figure
    from bench.stats import mean_curve

    keys = ["return"] + (["success"] if has_success else [])
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(f"{r['method']}/{r['variant']}", []).append(r)
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(6 * (len(keys) + 1), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (label, rs) in enumerate(sorted(groups.items())):
            curves = [[(x["env_steps"], x[key]) for x in r["curve"] if x[key] is not None] for r in rs]
            curves = [c for c in curves if c]
            if not curves:
                continue
            color = f"C{i}"
            for c in curves:
                ax.plot(*zip(*c), color=color, alpha=0.25, lw=0.8)
            xs, mean, lo, hi = mean_curve(curves)
            ax.plot(xs, mean, color=color, lw=2, label=f"{label} (n={len(curves)})")
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2)
        ax.set_xlabel("env steps")
        ax.set_ylabel(f"eval {key} (deterministic)")
        ax.set_title(task)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for i, (label, rs) in enumerate(sorted(groups.items())):
        curves = [[(d["env_steps"], d["kl_per_dim"]) for d in r.get("diagnostics", [])
                   if d.get("kl_per_dim", 0) > 0]
                  for r in rs]
        curves = [c for c in curves if c]
        if curves:
            xs, mean, _, _ = mean_curve(curves, n_boot=200)
            ax.plot(xs, mean, color=f"C{i}", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("env steps")
    ax.set_ylabel("KL per executed action dim (mean of update)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
