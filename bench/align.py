"""Alignment benchmark: Flow-DPO (a beta sweep and the beta_t schedule), Flow-RWR and supervised fine-tuning
on the winners (SFT), each domain on one shared preference data set, at equal samples seen, with the drift
from the reference and significance over seeds.

    python -m bench.align [--budget small|full] [--seeds 0 1 2] [--betas 20 200 2000]
                          [--policy-betas 200 2000 20000] [--states 128] [--pairing all]
                          [--skip-policy] [--skip-images] [--merge earlier.json ...]

Meta-World pick-place: a reflow policy is pretrained by behavior cloning (agents.pretrain) on 20 noisy
scripted-expert demos. From each of ``states`` start states it runs 4 rollouts that differ only in the flow's
initial noise; rollouts of the same start state are ranked by return (the preference source) and form
(winner, loser) pairs when their returns differ by more than the gap: the best against the worst
(``--pairing best_worst``) or every ordered pair (``all``). Every method fine-tunes a copy of the same policy on
the same rollouts; each DPO step sees 32 pairs x 4 chunks x 2 = 256 chunks, each RWR/SFT step 256 chunks, so
equal steps are equal samples seen. Every policy is evaluated deterministically at K = 4 on the same episodes
(same env seeds and noise); success has a 95% Wilson interval, and the paired episodes against the pretrained
policy give an exact McNemar test. Drift: the mean squared distance (normalized action units) between the
aligned and the pretrained policy's K = 4 chunks from the same noise on 1,024 of the pretrained policy's
rollout observations (agents.align_metrics).

Digits: a 1-RF generator (MLP velocity) is trained on scikit-learn's digits; the reward is classifier A's
log-probability of digit 0. Its own samples in groups of 4 give (best, worst) pairs; DPO (each beta, and the
beta_t = beta t^2 schedule), RWR and SFT on the winners (at equal images seen: a DPO step sees 2 images per
pair, so RWR and SFT run twice the steps) and reward guidance (two weights) are scored on samples from the
same noise: mean reward (classifier A), held-out reward and target rate (classifier B, another seed: a judge
that is not the reward), FD to the real zeros (classifier A's features), and the drift from the base
generator's samples from the same noise.

With several ``--seeds`` every row is the mean over seeds with a 95% percentile-bootstrap interval over seeds;
pick-place success is also pooled over all seeds' episodes (Wilson), and the McNemar test pools the paired
episodes of all seeds (Holm-adjusted over the aligned variants). ``--merge`` adds the seeds of earlier runs
with the same settings. Writes bench/results/<name>.{json,md,png} (``--name``, default align).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from bench.common import (
    RESULTS,
    check_not_written,
    check_out_dir,
    is_module_result,
    load_result,
    machine,
    markdown_table,
)
from bench.stats import bootstrap_ci, discordant, holm, mcnemar_exact, wilson_interval

ROOT = Path(__file__).resolve().parents[1]
ENV = "metaworld/pick-place-v3"
_SHARED = {"max_episode_steps": 200, "eval_envs": 5, "min_return_gap": 50.0, "hidden": 256, "depth": 3,
           "drift_obs": 1024}
BUDGETS = {
    "small": {**_SHARED, "pretrain_steps": 3000, "states": 24, "eval_episodes": 50, "align_steps": 300,
              "gen_steps": 2000, "classifier_steps": 400, "image_samples": 2000, "image_steps": 300,
              "eval_samples": 1000, "heldout_samples": 1000},
    "full": {**_SHARED, "pretrain_steps": 4000, "states": 64, "eval_episodes": 200, "align_steps": 500,
             "gen_steps": 6000, "classifier_steps": 1500, "image_samples": 4000, "image_steps": 500,
             "eval_samples": 2000, "heldout_samples": 2000},
    # seconds, for tests of the code paths only: the numbers mean nothing
    "tiny": {"max_episode_steps": 20, "eval_envs": 2, "min_return_gap": 0.0, "hidden": 32, "depth": 1,
             "drift_obs": 64, "pretrain_steps": 20, "states": 2, "eval_episodes": 4, "align_steps": 3,
             "gen_steps": 20, "classifier_steps": 10, "image_samples": 64, "image_steps": 3,
             "eval_samples": 64, "heldout_samples": 64},
}
POLICY_BETA, IMAGE_BETA = 2000.0, 200.0   # the defaults of agents.align and agents.images.align
LABELS = {"dpo": "Flow-DPO", "rwr": "Flow-RWR", "sft": "SFT on winners"}
SCHEDULE_LABEL = {"constant": "", "diffusion_dpo": ", β_t = β t²"}
K = 4
POLICY_COLUMNS = ["method", "pairs", "samples_seen", "seeds", "episodes", "success", "success_per_seed",
                  "d_success", "return", "b:c", "p", "p_holm", "drift", "verdict", "train_s"]
IMAGE_COLUMNS = ["method", "pairs", "samples_seen", "seeds", "reward", "reward_heldout", "target_rate",
                 "diversity", "fd_target", "drift", "pair_accuracy", "d_reward_vs_sft", "d_drift_vs_sft", "vs_sft", "train_s"]


def _variants(betas: list[float], schedules: list[str], default_beta: float) -> list[tuple[str, float, str]]:
    """(method, beta, schedule): DPO at every beta (constant), DPO at the default beta for every other schedule,
    then RWR and SFT."""
    out = [("dpo", float(bt), "constant") for bt in betas]
    out += [("dpo", float(default_beta), s) for s in schedules if s != "constant"]
    return out + [("rwr", float("nan"), "constant"), ("sft", float("nan"), "constant")]


def _label(method: str, beta: float, schedule: str) -> str:
    if method != "dpo":
        return LABELS[method]
    return f"Flow-DPO β={beta:g}{SCHEDULE_LABEL[schedule]}"


# --- pick-place ---------------------------------------------------------------------------------------------


def policy_part(b: dict, seed: int, workdir: Path, betas: list[float], schedules: list[str], states: int,
                pairing: str, pairs_from: str = "rollouts", branch_points: int = 4,
                prefer: str = "return", branch_span: float = 1.0, rounds: int = 1,
                methods: tuple[str, ...] = ("dpo", "rwr", "sft"),
                branch_noise: str = "independent") -> tuple[list[dict], dict]:
    """Pretrain, collect same-start-state rollouts (or same-state branches), align every variant, evaluate all
    on the same episodes. With ``rounds`` > 1 each variant runs online rounds (agents.align.align_rounds): round
    1 shares the pretrained policy's pairs, every later round collects new pairs on new start states from the
    variant's current policy; every round's policy is evaluated on the same episodes, and the row is the last."""
    from agents.align import AlignConfig, align_policy, collect_rollouts, preference_pairs
    from agents.align_branches import collect_branches, success_pairs
    from agents.align_metrics import observation_sample, policy_drift
    from agents.evaluate import rollout_episodes
    from agents.policies import policy_from_checkpoint
    from agents.pretrain import PretrainConfig, Pretrainer
    from envs.collect import ensure_demos

    t0 = time.perf_counter()
    demos = ensure_demos(ENV, 20, 0.3, 0, progress=False)
    spec = {"kind": "reflow", "network": "mlp", "hidden": b["hidden"], "depth": b["depth"], "default_steps": K}
    pc = PretrainConfig(dataset=str(demos), env_name=ENV, run_dir=str(workdir / "pretrain"), policy=spec,
                        obs_horizon=1, action_horizon=4, exec_horizon=2, grad_steps=b["pretrain_steps"],
                        eval_every=0, eval_episodes=0, max_episode_steps=b["max_episode_steps"], seed=seed,
                        progress=False, tensorboard=False)
    policy, _ = policy_from_checkpoint(Pretrainer(pc).run()["checkpoint"])
    pretrain_s = time.perf_counter() - t0
    # start states and evaluation episodes differ between seeds (far apart from each other); round r uses the
    # start states after round r - 1's (main checks that rounds x states stays below the next seed's)
    cfg = AlignConfig(num_start_states=states, rollouts_per_state=4, min_return_gap=b["min_return_gap"], denoise_steps=K,
                      grad_steps=b["align_steps"], lr=3e-5, beta=POLICY_BETA, seed=seed, progress=False,
                      pairing=pairing, rollout_seed=10_000 * seed, eval_seed=100_000 + 10_000 * seed)
    if pairs_from == "branches":
        where = (f"same restored state ({branch_points} branch points over the first {branch_span:g} of an episode "
                 "per start state, continuation to the end"
                 + (", the copies sharing every later chunk's noise)" if branch_noise == "shared" else ")"))
    else:
        where = "same start state"

    def collect(p, r: int):
        """(trajectories, pairs, seconds) from policy p on round r's start states."""
        t = time.perf_counter()
        rs = cfg.rollout_seed + r * states
        if pairs_from == "branches":
            trajs = collect_branches(p, ENV, states, cfg.rollouts_per_state, branch_points, None, K, rs,
                                     b["max_episode_steps"], cfg.rollout_envs, branch_span, branch_noise == "shared")
        else:
            trajs = collect_rollouts(p, ENV, states, cfg.rollouts_per_state, K, rs, b["max_episode_steps"],
                                     cfg.rollout_envs)
        pairs = success_pairs(trajs) if prefer == "success" else preference_pairs(trajs, cfg.min_return_gap,
                                                                                   cfg.pairing)
        return trajs, pairs, time.perf_counter() - t

    trajs, pairs, collect_s = collect(policy, 0)
    drift_obs = observation_sample(torch.cat([t.obs for t in trajs]), b["drift_obs"], seed)
    source = (f"success, {where}" if prefer == "success"
              else f"return, {where} ({pairing}, gap > {cfg.min_return_gap:g})")
    if rounds > 1:
        source += f", {rounds} online rounds of {states} new start states"

    def evaluate(p) -> dict:
        r = rollout_episodes(p, ENV, b["eval_episodes"], K, num_envs=b["eval_envs"], seed=cfg.eval_seed,
                             max_episode_steps=b["max_episode_steps"])
        # episode identity = (env index, its k-th episode): the same start state in every evaluation
        seen: dict[int, int] = {}
        keys = []
        for e in r["envs"]:
            keys.append((e, seen.get(e, 0)))
            seen[e] = seen.get(e, 0) + 1
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        succ = np.array([r["successes"][i] for i in order], bool)
        ret = np.array([r["returns"][i] for i in order], float)
        lo, hi = wilson_interval(int(succ.sum()), len(succ))
        return {"n_eval": len(succ), "success_rate": float(succ.mean()), "success_lo": lo, "success_hi": hi,
                "return_mean": float(ret.mean()), "successes": succ.astype(int).tolist(),
                "_keys": [keys[i] for i in order], "_ret": ret}

    base = evaluate(policy)
    common = {"domain": "pick_place", "seed": seed, "pairs": len(pairs), "pref_source": source}
    rows = [{**common, "method": "pretrained (BC)", "variant": "base", "samples_seen": 0, "drift": 0.0,
             "d_success": 0.0, "d_return": 0.0, "train_s": round(pretrain_s, 1), **base}]
    for method, beta, schedule in _variants(betas, schedules, POLICY_BETA):
        if method not in methods or (method in ("dpo", "sft") and not pairs):
            continue  # not asked for, or no pair in this data set (tiny budgets): nothing to train on
        acfg = dataclasses.replace(cfg, method=method, beta=beta if method == "dpo" else cfg.beta,
                                   beta_schedule=schedule)
        current, data, train_s, per_round = policy, (trajs, pairs), 0.0, []
        for r in range(rounds):
            extra_s = 0.0
            if r > 0:
                t_, p_, extra_s = collect(current, r)
                data = (t_, p_)
                if not p_ and method in ("dpo", "sft"):
                    break  # the current policy's copies never disagreed: no pair to learn from
            t0 = time.perf_counter()
            current, info = align_policy(current, data[0], data[1], dataclasses.replace(acfg, seed=seed + r))
            train_s += time.perf_counter() - t0 + extra_s
            ev = evaluate(current)
            if ev["_keys"] != base["_keys"]:
                raise RuntimeError("evaluations of the base and the aligned policy ran different episodes")
            per_round.append({"round": r + 1, "pairs": len(data[1]), "collect_s": round(extra_s, 1),
                              "success_rate": ev["success_rate"], "return_mean": ev["return_mean"],
                              "rollout_success": float(np.mean([bool(t.success) for t in data[0]]))})
        bb, cc = discordant(base["successes"], ev["successes"])
        seen = (acfg.grad_steps * acfg.batch_pairs * acfg.chunks_per_pair * 2 if method == "dpo"
                else acfg.grad_steps * acfg.batch_size) * len(per_round)
        rows.append({**common, "method": _label(method, beta, schedule), "variant": method,
                     "beta": beta if method == "dpo" else None, "beta_schedule": schedule, "samples_seen": seen,
                     **ev, "d_success": ev["success_rate"] - base["success_rate"],
                     "d_return": ev["return_mean"] - base["return_mean"], "b": bb, "c": cc,
                     "p_mcnemar": mcnemar_exact(bb, cc),
                     "drift": policy_drift(current, policy, drift_obs, K, seed=seed),
                     "train_s": round(train_s, 1), "final_train_metrics": info["final"], "rounds": per_round})
    for r in rows:
        r.pop("_keys"), r.pop("_ret")
    meta = {"pretrain_s": round(pretrain_s, 1), "rollouts": len(trajs), "start_states": cfg.num_start_states,
            "pairs_from": pairs_from, "prefer": prefer, "rounds": rounds,
            "pairs": len(pairs), "pairing": pairing, "pref_source": source, "collect_s": round(collect_s, 1),
            "rollout_return_mean": float(np.mean([t.ret for t in trajs])),
            "rollout_success": float(np.mean([t.success for t in trajs])),
            "winner_return_mean": float(np.mean([trajs[w].ret for w, _ in pairs])) if pairs else None,
            "loser_return_mean": float(np.mean([trajs[l].ret for _, l in pairs])) if pairs else None,
            "drift_observations": int(drift_obs.shape[0]),
            "align": {k: v for k, v in cfg.to_dict().items() if k not in ("method", "progress", "device")}}
    return rows, meta


# --- digits -------------------------------------------------------------------------------------------------


def image_part(b: dict, seed: int, betas: list[float], schedules: list[str],
               cache: Path | None = None) -> tuple[list[dict], dict, dict]:
    """Train a digits generator, align it every way and guide it, score all on the same noise."""
    from agents.align_metrics import implicit_reward_accuracy, sample_drift
    from agents.images.align import (
        ImageAlignConfig,
        ImageMetrics,
        align_generator,
        classifier_rewards,
        generate,
        group_pairs,
        score,
    )
    from agents.images.data import load_digits
    from agents.images.trainer import eval_noise, train_base
    from flowpolicy import RectifiedFlow
    from flowpolicy.align import guided_sample

    data = load_digits()
    t0 = time.perf_counter()
    cache = ROOT / "data" / "classifiers" if cache is None else cache
    reward, heldout, _ = classifier_rewards(data, 0, b["classifier_steps"], cache, seed)
    classifier_s = time.perf_counter() - t0
    net = {"kind": "mlp", "hidden": 256, "depth": 3, "emb_dim": 128}
    stage = OmegaConf.create({"net": net, "loss": "mse", "time_sampler": "uniform", "ema_decay": 0.999,
                              "batch_size": 128, "grad_steps": b["gen_steps"], "lr": 2e-3})
    # seeded after the classifiers: loading a cached classifier draws its (overwritten) initial weights from
    # the global RNG, training one does not, so seeding earlier would make the generator depend on the cache
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = train_base("1rf", "rf", data, stage, torch.device("cpu"), None, False)
    gen_s = time.perf_counter() - t0
    flow = RectifiedFlow(copy.deepcopy(model.ema.model), data.image_shape)
    cfg = ImageAlignConfig(target_class=0, num_samples=b["image_samples"], grad_steps=b["image_steps"], seed=seed,
                           beta=IMAGE_BETA, progress=False)
    metrics = ImageMetrics(data, reward, heldout)
    x0_eval = eval_noise(b["eval_samples"], data.image_shape, seed + 12345)
    images = generate(flow, eval_noise(cfg.num_samples, data.image_shape, seed + 777), cfg.sample_steps)
    rewards = score(reward, images)
    base_images = generate(flow, x0_eval, cfg.sample_steps)
    # held-out preference pairs: the same recipe (reward A, best vs worst of each group) on fresh noise
    held = generate(flow, eval_noise(b["heldout_samples"], data.image_shape, seed + 999), cfg.sample_steps)
    hw, hl = group_pairs(score(reward, held), cfg.group_size)
    held_w, held_l = held[hw], held[hl]
    samples = {"base 1-RF": base_images}
    n = b["eval_samples"]
    common = {"domain": "digits", "seed": seed, "n_eval": n}
    rows = [{**common, "method": "base 1-RF", "variant": "base", "samples_seen": 0, **metrics(base_images),
             "drift": 0.0, "train_s": round(gen_s, 1)}]
    for method, beta, schedule in _variants(betas, schedules, IMAGE_BETA):
        # equal images seen: a DPO step sees batch_size pairs (2 images each), an RWR/SFT step batch_size images
        steps = cfg.grad_steps if method == "dpo" else 2 * cfg.grad_steps
        acfg = dataclasses.replace(cfg, method=method, beta=beta if method == "dpo" else cfg.beta,
                                   beta_schedule=schedule, grad_steps=steps)
        t0 = time.perf_counter()
        aligned, info = align_generator(flow, images, rewards, acfg)
        train_s = time.perf_counter() - t0
        label = _label(method, beta, schedule)
        samples[label] = generate(aligned, x0_eval, cfg.sample_steps)
        rows.append({**common, "method": label, "variant": method, "beta": beta if method == "dpo" else None,
                     "beta_schedule": schedule, "steps": steps,
                     "samples_seen": steps * acfg.batch_size * (2 if method == "dpo" else 1),
                     "pairs": info["pairs"] if method != "rwr" else None, **metrics(samples[label]),
                     "drift": sample_drift(samples[label], base_images), "train_s": round(train_s, 1),
                     "heldout_pairs": len(hw),
                     **implicit_reward_accuracy(aligned, flow.net, held_w, held_l, draws=16, seed=seed),
                     "final_train_metrics": info["final"]})
    for w in (0.1, 0.5):
        t0 = time.perf_counter()
        name = f"guidance w={w}"
        samples[name] = guided_sample(flow, reward, w, steps=cfg.sample_steps, x0=x0_eval).detach()
        rows.append({**common, "method": name, "variant": "guidance", "samples_seen": 0,
                     **metrics(samples[name]), "drift": sample_drift(samples[name], base_images), "train_s": 0.0,
                     "sample_s": round(time.perf_counter() - t0, 2)})
    real = data.images[data.labels == 0]
    rows.append({**common, "method": "real zeros (reference)", "variant": "real", "n_eval": len(real),
                 **metrics(real)})
    meta = {"gen_steps": b["gen_steps"], "gen_s": round(gen_s, 1), "heldout_pairs": len(hw), "classifier_steps": b["classifier_steps"],
            "classifier_s": round(classifier_s, 1), "target_class": 0,
            "preference_reward_mean": float(rewards.mean()),
            "align": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("method", "progress")}}
    return rows, meta, samples


# --- aggregation over seeds ---------------------------------------------------------------------------------


def _interval(values: list[float]) -> dict:
    x = [float(v) for v in values if v is not None and not np.isnan(float(v))]
    if not x:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    lo, hi = bootstrap_ci(x)
    return {"mean": float(np.mean(x)), "lo": lo, "hi": hi, "n": len(x)}


def _fmt(iv: dict, f: str = ".3f") -> str:
    if iv.get("mean") is None:
        return ""
    if iv["n"] < 2:
        return format(iv["mean"], f)
    return f"{iv['mean']:{f}} [{iv['lo']:{f}}, {iv['hi']:{f}}]"


def _span(values: list[int]) -> str:
    """'19' when every seed has the same count, else 'min-max' over seeds."""
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    return out


def summarize_policy(rows: list[dict]) -> list[dict]:
    """One row per method over seeds: pooled success (Wilson), per-seed mean (bootstrap), pooled McNemar."""
    out = []
    for method, rs in _groups(rows).items():
        succ = np.concatenate([np.asarray(r["successes"], bool) for r in rs])
        k, n = int(succ.sum()), len(succ)
        lo, hi = wilson_interval(k, n)
        s = {"domain": "pick_place", "method": method, "variant": rs[0]["variant"], "seeds": len(rs),
             "pairs": _span([r["pairs"] for r in rs]), "pref_source": rs[0]["pref_source"],
             "samples_seen": rs[0]["samples_seen"], "episodes": n, "success_k": k,
             "success_pooled": {"mean": k / n, "lo": lo, "hi": hi, "n": n},
             "success_seeds": _interval([r["success_rate"] for r in rs]),
             "d_success_seeds": _interval([r["d_success"] for r in rs]),
             "return_seeds": _interval([r["return_mean"] for r in rs]),
             "drift_seeds": _interval([r["drift"] for r in rs]),
             "train_s": float(np.mean([r["train_s"] for r in rs]))}
        if rs[0]["variant"] != "base":
            s["b"], s["c"] = sum(r["b"] for r in rs), sum(r["c"] for r in rs)
            s["p_mcnemar"] = mcnemar_exact(s["b"], s["c"])
            s["p_mcnemar_per_seed"] = [r["p_mcnemar"] for r in rs]
        out.append(s)
    tested = [s for s in out if "p_mcnemar" in s]
    for s, p in zip(tested, holm([s["p_mcnemar"] for s in tested])):
        s["p_holm"] = p
        if p >= 0.05:
            s["verdict"] = "not significant"
        else:
            s["verdict"] = "raises success" if s["c"] > s["b"] else "lowers success"
    return out


def policy_table(summary: list[dict]) -> str:
    def row(s):
        d = {"method": s["method"], "pairs": s["pairs"], "samples_seen": s["samples_seen"], "seeds": s["seeds"],
             "episodes": s["episodes"], "success": _fmt(s["success_pooled"]),
             "success_per_seed": _fmt(s["success_seeds"]), "return": _fmt(s["return_seeds"], ".0f"),
             "drift": _fmt(s["drift_seeds"], ".4f"), "train_s": f"{s['train_s']:.1f}"}
        if "p_mcnemar" in s:
            d.update({"d_success": _fmt(s["d_success_seeds"]), "b:c": f"{s['b']}:{s['c']}",
                      "p": f"{s['p_mcnemar']:.3g}", "p_holm": f"{s['p_holm']:.3g}", "verdict": s["verdict"]})
        return d

    return markdown_table([row(s) for s in summary], POLICY_COLUMNS)


def summarize_images(rows: list[dict]) -> list[dict]:
    """One row per method over seeds; reward and drift differences to SFT paired by seed."""
    groups = _groups(rows)
    sft = {r["seed"]: r for r in groups.get(LABELS["sft"], [])}
    out = []
    for method, rs in groups.items():
        s = {"domain": "digits", "method": method, "variant": rs[0]["variant"], "seeds": len(rs),
             "pairs": rs[0].get("pairs"), "samples_seen": rs[0].get("samples_seen"),
             "train_s": float(np.mean([r.get("train_s") or 0.0 for r in rs]))}
        for key in ("reward", "reward_heldout", "target_rate", "diversity", "fd", "fd_target", "drift",
                    "pair_accuracy"):
            s[key] = _interval([r.get(key) for r in rs])
        if rs[0]["variant"] in ("dpo", "rwr", "guidance") and sft:
            paired = [r for r in rs if r["seed"] in sft]
            s["d_reward_vs_sft"] = _interval([r["reward"] - sft[r["seed"]]["reward"] for r in paired])
            s["d_drift_vs_sft"] = _interval([r["drift"] - sft[r["seed"]]["drift"] for r in paired])
            s["vs_sft"] = _frontier_verdict(s["d_reward_vs_sft"], s["d_drift_vs_sft"])
        out.append(s)
    return out


def _frontier_verdict(dr: dict, dd: dict) -> str:
    """Where a method lies against SFT on the reward-drift plane, from the seed intervals of the differences."""
    if dr["n"] < 3:
        return "fewer than 3 seeds"
    up, down = dr["lo"] > 0, dr["hi"] < 0
    closer, farther = dd["hi"] < 0, dd["lo"] > 0
    if up and closer:
        return "dominates SFT"
    if down and farther:
        return "dominated by SFT"
    if up and farther:
        return "more reward, more drift"
    if down and closer:
        return "less reward, less drift"
    return "undecided"


def image_table(summary: list[dict]) -> str:
    rows = []
    for s in summary:
        d = {"method": s["method"], "pairs": s["pairs"], "samples_seen": s["samples_seen"], "seeds": s["seeds"],
             "reward": _fmt(s["reward"], ".2f"), "reward_heldout": _fmt(s["reward_heldout"], ".2f"),
             "target_rate": _fmt(s["target_rate"]), "diversity": _fmt(s["diversity"], ".2f"),
             "fd_target": _fmt(s["fd_target"], ".0f"),
             "pair_accuracy": _fmt(s["pair_accuracy"]),
             "drift": _fmt(s["drift"], ".4f") if s["variant"] != "real" else "",
             "train_s": f"{s['train_s']:.1f}"}
        if "vs_sft" in s:
            d.update({"d_reward_vs_sft": _fmt(s["d_reward_vs_sft"], ".2f"),
                      "d_drift_vs_sft": _fmt(s["d_drift_vs_sft"], ".4f"), "vs_sft": s["vs_sft"]})
        rows.append(d)
    return markdown_table(rows, IMAGE_COLUMNS)


# --- figure -------------------------------------------------------------------------------------------------


def _plot(policy_summary: list[dict], image_summary: list[dict], samples: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (1 if policy_summary else 0) + (2 if image_summary else 0)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(5.4 * panels, 4.4), squeeze=False)
    axes = list(axes[0])

    def frontier(ax, summary, ykey, ylabel, title, extra=None):
        dpo = []
        for i, s in enumerate(summary):
            x, y = s.get("drift_seeds", s.get("drift")), s[ykey]
            if not x or x.get("mean") is None or y.get("mean") is None:
                continue
            xerr = [[x["mean"] - x["lo"]], [x["hi"] - x["mean"]]]
            yerr = [[y["mean"] - y["lo"]], [y["hi"] - y["mean"]]]
            ax.errorbar(x["mean"], y["mean"], xerr=xerr, yerr=yerr, fmt="o", color=f"C{i % 10}", capsize=2,
                        label=s["method"])
            if extra and s.get(extra, {}).get("mean") is not None:
                ax.scatter(x["mean"], s[extra]["mean"], facecolors="none", edgecolors=f"C{i % 10}", s=40)
            if s["variant"] == "dpo" and "β_t" not in s["method"]:
                dpo.append((x["mean"], y["mean"]))
        if len(dpo) > 1:
            ax.plot(*zip(*sorted(dpo)), "--", color="gray", lw=0.8, label="DPO β sweep")
        xs = [v[0] for v in dpo] + [s.get("drift_seeds", s.get("drift"))["mean"] or 0.0 for s in summary]
        pos = [v for v in xs if v > 0]
        if pos and max(pos) / min(pos) > 30:  # a beta sweep can span decades of drift
            ax.set_xscale("symlog", linthresh=min(pos))
        ax.set_xlabel("drift from the reference (mean squared distance, same noise)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)

    if policy_summary:
        s0 = policy_summary[0]
        frontier(axes.pop(0), policy_summary, "success_pooled", "success (pooled episodes, Wilson 95%)",
                 f"pick-place K={K}: success vs drift ({s0['seeds']} seeds, {s0['episodes']} episodes)")
    if image_summary:
        rows = [s for s in image_summary if s["variant"] != "real"]
        frontier(axes.pop(0), rows, "reward", "mean reward log p(0|x), classifier A (hollow: B)",
                 f"digits: reward vs drift ({rows[0]['seeds']} seeds, bootstrap 95%)", extra="reward_heldout")
        ax = axes.pop(0)
        from agents.images.trainer import image_grid

        ax.imshow(np.asarray(image_grid([x[:12] for x in samples.values()], scale=1)), cmap="gray")
        ax.set_yticks([(i + 0.5) * 9 for i in range(len(samples))], list(samples), fontsize=6)
        ax.set_xticks([])
        ax.set_title("same noise, one row per method (one seed)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- command ------------------------------------------------------------------------------------------------


def _notes(config: dict, policy_summary: list[dict], image_summary: list[dict]) -> str:
    notes = []
    pp, dg = config.get("pick_place"), config.get("digits")
    if pp:
        m = pp["per_seed"]
        notes.append(
            (f"Pick-place: per seed {m[0]['start_states']} start states x {config.get('branch_points')} branch points "
             f"x 4 copies = {m[0]['rollouts']} branch chunks (the copies of a branch point share the restored "
             "simulator state exactly; each samples its own chunk and runs on to the episode's end); "
             if m[0].get("pairs_from") == "branches" else
             f"Pick-place: per seed {m[0]['start_states']} start states x 4 noises = {m[0]['rollouts']} rollouts; ")
            +
            f"preference source: {m[0]['pref_source']}; pairs per seed {[x['pairs'] for x in m]}; rollout "
            f"success {np.mean([x['rollout_success'] for x in m]):.2f}. BC pretraining "
            f"{config['pretrain_steps']} steps. Every policy is evaluated at K={K} on the same "
            f"{config['eval_episodes']} episodes per seed (env seeds and noise differ between seeds). "
            "success: pooled over all seeds' episodes with a 95% Wilson interval; success_per_seed, d_success "
            "(to the pretrained policy), return and drift: mean over seeds [95% percentile bootstrap over seeds; "
            "with 3 seeds it is close to the range]. b:c: paired episodes where only the pretrained / only the "
            "aligned policy succeeded, pooled over seeds; p: exact two-sided McNemar test on them; p_holm: Holm-"
            "adjusted over the aligned rows; verdict from p_holm < 0.05. Samples seen: chunks (a DPO step: 32 "
            "pairs x 4 chunks x 2; RWR/SFT: 256 chunks). drift: mean squared distance in normalized action "
            f"units between the aligned and the pretrained policy's K={K} chunks from the same noise on "
            f"{m[0]['drift_observations']} of the pretrained policy's rollout observations. DPO's β_t = β t² "
            "(Diffusion-DPO's weighting in velocity errors) averages β/3 over uniform t.")
    if dg:
        notes.append(
            "Digits: classifier A (seed = the run's seed) is the reward, log p(0 | x): column reward, and its "
            "features give fd_target (FD to the real zeros). Classifier B (seed + 1), which the reward never "
            "saw, is the held-out judge: reward_heldout (its log p(0 | x)) and target_rate (the fraction it "
            f"labels 0). 1-RF MLP generator trained {dg['per_seed'][0]['gen_steps']} steps; 8 Euler steps "
            "everywhere. Equal images seen: a DPO step sees 64 pairs = 128 images, so RWR and SFT train twice "
            "DPO's steps at 64 images each. drift: mean squared pixel distance ([-1, 1] scale) between a "
            "method's and the base generator's samples from the same noise. d_*_vs_sft: differences to SFT "
            "paired by seed, mean [bootstrap 95% over seeds]; vs_sft: 'dominates SFT' when the reward "
            "difference is above 0 and the drift difference below 0, both intervals excluding 0 (3+ seeds). "
            "diversity: mean pairwise distance in classifier B's features among the samples B labels 0, over "
            "the same for the real zeros (1 = as varied as real zeros). pair_accuracy: on "
            f"{dg['per_seed'][0].get('heldout_pairs', '?')} held-out pairs (best vs worst of 4 by reward A, "
            "samples of the base generator from noise no method trained on), the fraction whose winner the "
            "model's implicit reward -(e_model - e_base) ranks first (e: Flow-DPO's velocity error, 16 draws of "
            "noise and time; 0.5 = no preference learned).")
    return "\n\n".join(notes)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--betas", type=float, nargs="+", default=[IMAGE_BETA],
                   help=f"digits Flow-DPO betas (default {IMAGE_BETA:g})")
    p.add_argument("--policy-betas", type=float, nargs="+", default=[POLICY_BETA],
                   help=f"pick-place Flow-DPO betas (default {POLICY_BETA:g})")
    p.add_argument("--beta-schedules", nargs="+", default=["constant"], choices=["constant", "diffusion_dpo"],
                   help="DPO beta_t schedules; other than constant at the domain's default beta")
    p.add_argument("--states", type=int, default=None, help="pick-place start states (default: the budget's)")
    p.add_argument("--pairing", choices=["best_worst", "all"], default="best_worst",
                   help="pairs per start state: best vs worst, or every ordered pair above the return gap")
    p.add_argument("--pairs-from", choices=["rollouts", "branches"], default="rollouts",
                   help="pick-place pairs: rollouts from one start state, or branches from one restored state "
                        "(agents.align_branches: 4 copies per branch point, run to the episode's end)")
    p.add_argument("--branch-points", type=int, default=4, help="with --pairs-from branches: per start state")
    p.add_argument("--branch-span", type=float, default=1.0,
                   help="with --pairs-from branches: branch points spread over this leading fraction of an episode")
    p.add_argument("--branch-noise", choices=["independent", "shared"], default="independent",
                   help="with --pairs-from branches: shared = the copies of a branch point share every later chunk's "
                        "flow noise (common random numbers), so what followed differs by the branch chunk")
    p.add_argument("--prefer", choices=["return", "success"], default="return",
                   help="pick-place preference: higher return (gap 50), or success over failure")
    p.add_argument("--rounds", type=int, default=1,
                   help="pick-place online rounds: each later round collects new pairs from the variant's current "
                        "policy on new start states and aligns it again (agents.align.align_rounds)")
    p.add_argument("--methods", nargs="+", choices=["dpo", "rwr", "sft"], default=["dpo", "rwr", "sft"],
                   help="pick-place methods to align (default all)")
    p.add_argument("--skip-policy", action="store_true", help="only the digits part")
    p.add_argument("--skip-images", action="store_true", help="only the pick-place part")
    p.add_argument("--name", default="align", help="result files bench/results/<name>.{json,md,png}")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    p.add_argument("--classifier-cache", type=Path, default=None, help="default data/classifiers")
    p.add_argument("--merge", type=Path, nargs="+", default=[],
                   help="earlier bench.align JSONs with the same settings whose seeds are added to this run's "
                        "(e.g. a one-seed timing run); their commands are listed in the results")
    args = p.parse_args(argv)
    # every argument is checked before anything trains: a mistake found after the first part would cost it
    if args.skip_images and args.skip_policy:
        p.error("--skip-images and --skip-policy together leave nothing to run (and would write empty results)")
    if min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds):
        p.error(f"--seeds must be distinct and >= 0, got {args.seeds}")
    for flag, value in (("--states", args.states), ("--rounds", args.rounds), ("--branch-points", args.branch_points)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if not 0.0 < args.branch_span <= 1.0:
        p.error(f"--branch-span must be in (0, 1] (a fraction of an episode), got {args.branch_span}")
    for flag, betas in (("--betas", args.betas), ("--policy-betas", args.policy_betas)):
        if min(betas) <= 0:
            p.error(f"{flag} must be > 0 (Flow-DPO's inverse temperature), got {betas}")
    torch.set_num_threads(1)
    b = dict(BUDGETS[args.budget])
    if args.states is not None:
        b["states"] = args.states
    out_dir = check_out_dir(args.out or RESULTS)
    t_start = time.perf_counter()
    config: dict = {"budget": args.budget, **b, "seeds": args.seeds, "threads": 1, "betas": args.betas,
                    "policy_betas": args.policy_betas, "beta_schedules": args.beta_schedules,
                    "pairing": args.pairing, "pairs_from": args.pairs_from, "prefer": args.prefer}
    if args.rounds > 1 or sorted(args.methods) != ["dpo", "rwr", "sft"]:
        config["rounds"], config["methods"] = args.rounds, sorted(args.methods)
    if args.pairs_from == "branches":
        config["branch_points"], config["branch_span"] = args.branch_points, args.branch_span
        if args.branch_noise != "independent":
            config["branch_noise"] = args.branch_noise
    if not args.skip_policy and args.rounds * b["states"] > 10_000:
        raise SystemExit(f"--rounds {args.rounds} x --states {b['states']} start states would reach the next "
                         "seed's (at most 10000)")
    # every --merge is checked before anything trains: a refused merge must not cost the whole run
    earlier = [(path, load_result(path, "--merge", "bench.align", lambda r: is_module_result(r, "bench.align"),
                                  ("config", "per_seed", "command"))) for path in args.merge]
    for path, old in earlier:
        check_not_written(path, [out_dir / f"{args.name}.json"])
        for key in ("budget", "states", "betas", "policy_betas", "beta_schedules", "pairing", "pairs_from", "prefer",
                    "branch_points", "branch_span", "rounds", "methods", "branch_noise"):
            if old["config"].get(key) != config.get(key):
                raise SystemExit(f"--merge {path}: {key}={old['config'].get(key)!r} differs from this run's "
                                 f"{config.get(key)!r}")
        clash = set(old["config"]["seeds"]) & set(args.seeds)
        if clash:
            raise SystemExit(f"--merge {path}: seeds {sorted(clash)} are also run here")
    policy_rows, image_rows, samples = [], [], {}
    if not args.skip_policy:
        t0 = time.perf_counter()
        metas = []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                rows, meta = policy_part(b, seed, Path(tmp), args.policy_betas, args.beta_schedules, b["states"],
                                         args.pairing, args.pairs_from, args.branch_points, args.prefer,
                                         args.branch_span, args.rounds, tuple(args.methods), args.branch_noise)
            policy_rows += rows
            metas.append({"seed": seed, **meta})
        config["pick_place"] = {"per_seed": metas, "wall_s": round(time.perf_counter() - t0, 1)}
    if not args.skip_images:
        t0 = time.perf_counter()
        metas = []
        for seed in args.seeds:
            rows, meta, s = image_part(b, seed, args.betas, args.beta_schedules, args.classifier_cache)
            image_rows += rows
            metas.append({"seed": seed, **meta})
            samples = samples or s
        config["digits"] = {"per_seed": metas, "wall_s": round(time.perf_counter() - t0, 1)}
    merged = []
    for _path, old in earlier:
        for domain, rows in (("pick_place", policy_rows), ("digits", image_rows)):
            if domain in config and domain in old["config"]:
                config[domain]["per_seed"] = old["config"][domain]["per_seed"] + config[domain]["per_seed"]
                rows[:0] = [r for r in old["per_seed"] if r["domain"] == domain]
        merged.append({"command": old["command"], "wall_s": old["wall_s"], "seeds": old["config"]["seeds"],
                       "date": old["date"]})
        config["seeds"] = old["config"]["seeds"] + config["seeds"]
    config["merged"] = merged
    policy_summary = summarize_policy(policy_rows) if policy_rows else []
    image_summary = summarize_images(image_rows) if image_rows else []
    wall = time.perf_counter() - t_start
    record = {"name": args.name, "command": "python -m bench.align " + " ".join(sys.argv[1:] if argv is None
                                                                                else argv),
              "machine": machine(), "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "wall_s": round(wall, 1), "config": config, "rows": policy_summary + image_summary,
              "per_seed": policy_rows + image_rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(record, indent=2, default=float))
    parts = [f"# {args.name}\n\n`{record['command'].strip()}` on {record['machine']}, {record['date']}, wall "
             f"time {record['wall_s']} s."]
    for m in merged:
        parts[0] += (f" Seeds {m['seeds']} merged from `{m['command'].strip()}` ({m['date']}, wall time "
                     f"{m['wall_s']} s, same machine).")
    if policy_summary:
        parts.append(f"**Pick-place** (preference source: {config['pick_place']['per_seed'][0]['pref_source']})\n\n"
                     + policy_table(policy_summary))
    if image_summary:
        parts.append("**Digits** (reward: classifier A; reward_heldout, target_rate: classifier B)\n\n"
                     + image_table(image_summary))
    parts.append(_notes(config, policy_summary, image_summary))
    md = "\n\n".join(parts) + "\n"
    (out_dir / f"{args.name}.md").write_text(md)
    print(md)
    _plot(policy_summary, image_summary, samples, out_dir / f"{args.name}.png")
    return out_dir / f"{args.name}.json"


if __name__ == "__main__":
    main()
