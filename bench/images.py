"""Image generation benchmark on scikit-learn's digits: few-step quality of 1-RF, 2-RF, distilled 2-RF and
shortcut models, with the rectified-flow-pytorch package as a peer on the same data and budget: end to end (its
own U-Net, trainer, EMA and default sampler) and, as an ablation, its loss and Euler sampler on our network.

    python -m bench.images [--budget small|full] [--seeds 0 1 2] [--draws 5] [--no-peer] [--workers 2]

Measured on held-out data (agents/images/evaluation.py):

- The digits are split, stratified and seeded, into a training part (60%: the generators and the feature
  network train on it) and a held-out part (40%) that nothing trains on.
- Features come from a small CNN of its own architecture and seed trained on the training part's labels, not
  from the reward classifier that alignment uses.
- Every score compares n generated images with n held-out real images, n = half the held-out part. The
  floor is the FD between the two disjoint real halves (what a perfect generator scores with n samples);
  "FD - floor" is paired with it split by split. Each draw averages over 4 random splits.
- Precision, recall, density and coverage (k = 5 nearest neighbours in the same features) show
  unrealistic samples and dropped modes; "NN ratio" (median pixel distance of a sample to its nearest
  training image over the same median for held-out real images: 1 for fresh images, 0 for copies) and
  "copy rate" show memorisation, which FD cannot see (the "training images" row scores the floor).
- Each (model, steps) is sampled in ``--draws`` independent draws of noise for every training seed (each seed
  its own draws; within a draw, the same noise and splits for every model). The interval is a Student-t 95% interval over the seeds' means when
  there are several seeds, else over the draws of the one seed (sampling noise only; says ``over``).

Straightness is flowpolicy.reflow.straightness. Writes bench/results/images.{json,md,png} (``images-small.*``
etc. for other budgets) and prints the table. "training s" is each model's own stage: the 2-RF's includes
solving its couplings; the distilled students start from the trained 2-RF, which starts from the 1-RF.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from agents.config_schema import ImageStage
from agents.images.data import load_digits
from agents.images.evaluation import HeldOutJudge, accuracy_on, heldout_split, load_or_train_encoder
from agents.images.trainer import eval_noise, evaluate, image_grid, train_base, train_distilled, train_reflow
from bench.common import check_not_written, check_out_dir, code_version, load_result, write_json_atomic
from bench.images_peer import OWN_UNET, PeerModel, PeerOwnModel, import_peer
from flowpolicy import RectifiedFlow

ROOT = Path(__file__).resolve().parents[1]
# per budget: overrides of the image stage's schema (agents.config_schema.ImageStage: "stage") and the benchmark's own settings. "tiny" is a
# seconds-long smoke test of the whole pipeline (tests/test_images.py); its numbers mean nothing.
BUDGETS = {
    "tiny": {"stage": {"grad_steps": 10, "batch_size": 32, "net": {"channels": [8, 16], "emb_dim": 16},
                       "reflow": {"couplings": 64, "couplings_steps": 2, "grad_steps": 10},
                       "distill": {"grad_steps": 10}, "shortcut": {"max_level": 2},
                       "eval": {"straightness_samples": 16, "straightness_steps": 4}},
             "seeds": [0], "draws": 2, "samples": 40, "encoder_steps": 30,
             "rf_steps": [1, 4], "reflow_steps": [1], "shortcut_steps": [1, 4]},
    "small": {"stage": {"grad_steps": 300, "reflow": {"couplings": 2000, "grad_steps": 300},
                        "distill": {"grad_steps": 300},
                        "eval": {"straightness_samples": 200, "straightness_steps": 16}},
              "seeds": [0], "draws": 5, "samples": None, "encoder_steps": 1500,
              "rf_steps": [1, 2, 4, 8, 100], "reflow_steps": [1, 2], "shortcut_steps": [1, 4, 128]},
    "full": {"stage": {"grad_steps": 3000, "reflow": {"couplings": 20000, "grad_steps": 3000},
                       "distill": {"grad_steps": 3000},
                       "eval": {"straightness_samples": 500, "straightness_steps": 32}},
             "seeds": [0, 1, 2], "draws": 5, "samples": None, "encoder_steps": 1500,
             "rf_steps": [1, 2, 4, 8, 100], "reflow_steps": [1, 2, 4], "shortcut_steps": [1, 4, 128]},
}
HELDOUT_FRACTION = 0.4   # of each class; nothing trains on it
SPLIT_SEED = 0           # the train / held-out split (the same for every training seed)
ENCODER_SEED = 1         # the feature network (the reward classifier of agents/images/align.py uses 0 and 1,
                         # with another architecture, on all images)
SPLITS_PER_DRAW = 4
METRICS = ("fd", "floor", "fd_excess", "precision", "recall", "density", "coverage", "nn_ratio", "copy_rate")
UNIT_METRICS = ("precision", "recall", "coverage", "copy_rate")  # shares, in [0, 1]


# --- statistics ------------------------------------------------------------------------------------------


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): the Student-t interval of the mean of ``values`` (one per independent replicate).

    One value gives (v, nan, nan); any non-finite value gives (inf or nan) for all three.
    """
    from scipy import stats

    x = np.asarray([float(v) for v in values], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    if not np.isfinite(x).all():
        m = float(np.mean(x)) if not np.isnan(x).any() else math.nan
        return m, m, m
    m = float(x.mean())
    if len(x) == 1:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def replicates(entries: list[dict], key) -> tuple[list[float], str]:
    """The independent replicates of ``key`` (a name or a function of an entry) over ``entries`` (one per
    seed and draw): each training seed's mean over its draws when there are several seeds, else the draws."""
    get = key if callable(key) else (lambda e: e[key])
    seeds = list(dict.fromkeys(e["seed"] for e in entries))
    if len(seeds) >= 2:
        return [float(np.mean([get(e) for e in entries if e["seed"] == s])) for s in seeds], "seeds"
    return [get(e) for e in entries], "draws"


def aggregate(raw: list[dict]) -> list[dict]:
    """One row per (model, steps) in order of first appearance: the mean and interval of every metric."""
    groups: dict[tuple, list[dict]] = {}
    for e in raw:
        groups.setdefault((e["model"], e["steps"]), []).append(e)
    rows = []
    for (model, steps), entries in groups.items():
        first = entries[0]
        seeds = list(dict.fromkeys(e["seed"] for e in entries))
        row = {"method": first["method"], "model": model, "impl": first["impl"], "steps": steps,
               "nfe": steps * first.get("nfe_per_step", 1), "n_seeds": len(seeds), "n_draws": len(entries) // len(seeds)}
        for m in METRICS:
            values, over = replicates(entries, m)
            mean, lo, hi = t_interval(values)
            if m != "fd_excess":  # the interval stays in the metric's range
                lo = max(lo, 0.0)
                hi = min(hi, 1.0) if m in UNIT_METRICS else hi
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = mean, lo, hi
        row["over"] = over
        for m in ("sample_s", "train_s", "straightness"):
            vals = [e[m] for e in entries if e.get(m) is not None]
            row[m] = float(np.mean(vals)) if vals else None
        rows.append(row)
    return rows


def paired_target(raw: list[dict], one_step: str, reference: tuple[str, int], factor: float = 1.5) -> dict:
    """Interval of ``excess(one_step @ 1) - factor * excess(reference)``, paired by seed and draw (the same
    noise and splits): entirely <= 0 means the target "1-step excess <= factor x reference excess" is met."""
    a = {(e["seed"], e["draw"]): e["fd_excess"] for e in raw if e["model"] == one_step and e["steps"] == 1}
    b = {(e["seed"], e["draw"]): e["fd_excess"] for e in raw
         if e["model"] == reference[0] and e["steps"] == reference[1]}
    entries = [{"seed": s, "draw": d, "diff": a[(s, d)] - factor * b[(s, d)]} for s, d in a if (s, d) in b]
    values, over = replicates(entries, "diff")
    mean, lo, hi = t_interval(values)
    verdict = ("met" if hi <= 0 else "not met" if lo > 0 else "not decided by the intervals"
               ) if math.isfinite(lo) else "no interval"
    return {"model": one_step, "diff": mean, "diff_lo": lo, "diff_hi": hi, "over": over, "verdict": verdict}


def peer_comparison(raw: list[dict], peer: str = "peer_own") -> list[dict]:
    """At every step count the peer was scored at: our best model there (lowest mean FD − floor) against the
    peer, as the paired difference ours − peer (the same noise and splits in each draw) with its interval
    (over the training seeds' means, or over the draws of one seed) and a verdict."""
    ours = sorted({e["model"] for e in raw if e["impl"] == "flowpolicy"})

    def at(model, k):
        return {(e["seed"], e["draw"]): e for e in raw if e["model"] == model and e["steps"] == k}

    out = []
    for k in sorted({e["steps"] for e in raw if e["model"] == peer}):
        scored = {m: at(m, k) for m in ours if at(m, k)}
        if not scored:
            continue
        best = min(scored, key=lambda m: float(np.mean([e["fd_excess"] for e in scored[m].values()])))
        a, b = scored[best], at(peer, k)
        entries = [{"seed": s, "draw": d, "diff": a[(s, d)]["fd_excess"] - b[(s, d)]["fd_excess"]}
                   for s, d in a if (s, d) in b]
        if not entries:
            continue
        values, over = replicates(entries, "diff")
        mean, lo, hi = t_interval(values)
        verdict = ("ours lower" if hi < 0 else "peer lower" if lo > 0 else "matched (the interval holds 0)"
                   ) if math.isfinite(lo) else "no interval"
        nfe = {m: next(iter(x.values())).get("nfe_per_step", 1) * k for m, x in ((best, a), (peer, b))}
        out.append({"steps": k, "ours": best, "ours_nfe": nfe[best], "peer_nfe": nfe[peer], "diff": mean,
                    "diff_lo": lo, "diff_hi": hi, "over": over, "pairs": len(entries), "verdict": verdict})
    return out


def _peer_markdown(comparison: list[dict], rows: list[dict]) -> str:
    if not comparison:
        return ""
    row = {(r["model"], r["steps"]): r for r in rows}
    lines = ["\n\n**Ours against the peer end to end**, at equal sampling steps (our best model at each step count; "
             "FD − floor; the difference is paired draw by draw, same noise and splits):\n",
             "| steps | ours: model | ours: FD − floor | NFE | peer: FD − floor | NFE | ours − peer | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for c in comparison:
        o, p = row[(c["ours"], c["steps"])], row[("peer_own", c["steps"])]
        lines.append(f"| {c['steps']} | {o['method']} | {_ci(o, 'fd_excess', '.1f')} | {c['ours_nfe']} | "
                     f"{_ci(p, 'fd_excess', '.1f')} | {c['peer_nfe']} | {c['diff']:.1f} [{c['diff_lo']:.1f}, "
                     f"{c['diff_hi']:.1f}] | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def _is_images(rec: dict) -> bool:
    """Whether a result JSON is this benchmark's (every budget's is named "images")."""
    return rec.get("name") == "images"


def add_peer_table(path: Path) -> dict:
    """The comparison of :func:`peer_comparison` for a finished run: into its JSON's summary and, once, at the
    end of the Markdown beside it; printed. Nothing is trained or rescored."""
    result = load_result(path, "--add-peer-table", "bench.images", _is_images, ("draws", "rows", "summary"))
    comparison = peer_comparison(result["draws"])
    if not comparison:
        raise SystemExit(f"error: --add-peer-table {path}: the run has no peer rows to compare with")
    result["summary"]["vs_peer"] = comparison
    text = _peer_markdown(comparison, result["rows"])
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=2)
    os.replace(f.name, path)
    md = path.with_suffix(".md")
    if md.is_file():
        old = md.read_text()
        cut = old.find("\n\n**Ours against the peer end to end**")
        md.write_text((old if cut < 0 else old[:cut]).rstrip("\n") + text)
    print(text)
    return result


# --- the benchmark --------------------------------------------------------------------------------------


LABELS = {"1rf": "1-RF", "2rf": "2-RF", "shortcut": "shortcut",
          "peer_1rf": "1-RF, rectified-flow-pytorch's loss and Euler sampler on our U-Net",
          "peer_own": "rectified-flow-pytorch end to end (its U-Net, Trainer, EMA, midpoint sampler)",
          "data": "held-out real images (the floor)", "train_copy": "training images (a perfect memoriser)"}


def _label(name: str, info: dict | None = None) -> str:
    """Row label; a distilled student also says whose pairs it learned (``distill.pairs``)."""
    info = info or {}
    if "k" in info:
        pairs = {"reflow": "1-RF pairs", "teacher": "2-RF pairs"}.get(info.get("pairs"), info.get("pairs"))
        return f"2-RF + distill (k={info['k']}, {pairs})"
    return LABELS.get(name, name)


def _ci(r: dict, m: str, fmt: str) -> str:
    mean, lo, hi = r[m], r[f"{m}_lo"], r[f"{m}_hi"]
    if not math.isfinite(mean):
        return str(mean)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return format(mean, fmt)
    return f"{mean:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _markdown(rows: list[dict]) -> str:
    lines = ["| method | impl | steps | NFE | FD | FD − floor | precision | recall | coverage | NN ratio "
             "| sampling s | training s | straightness |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = "" if r.get("straightness") is None else f"{r['straightness']:.4f}"
        train = "" if r["train_s"] is None else f"{r['train_s']:.1f}"
        samp = "" if r["sample_s"] is None else f"{r['sample_s']:.2f}"
        lines.append(f"| {r['method']} | {r['impl']} | {r['steps']} | {r['nfe']} | {_ci(r, 'fd', '.1f')} | "
                     f"{_ci(r, 'fd_excess', '.1f')} | {_ci(r, 'precision', '.2f')} | "
                     f"{_ci(r, 'recall', '.2f')} | "
                     f"{_ci(r, 'coverage', '.2f')} | {_ci(r, 'nn_ratio', '.2f')} | {samp} | {train} | {s} |")
    return "\n".join(lines)


def _short(label: str) -> str:
    """The peer rows' labels, short enough for the figure (the Markdown keeps the long ones)."""
    for long, short in ((LABELS["peer_1rf"], "peer's loss + Euler on our U-Net"),
                        (LABELS["peer_own"], "rectified-flow-pytorch end to end")):
        label = label.replace(long, short)
    return label


def _plot(rows: list[dict], strips: list[tuple[str, torch.Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_h, gap, strip_h = 3.4, 0.8, 0.42  # inches
    height = 0.4 + plot_h + gap + strip_h * len(strips) + 0.1
    fig = plt.figure(figsize=(8, height))
    ax = fig.add_axes((0.1, 1 - (0.4 + plot_h) / height, 0.5, plot_h / height))  # the legend goes right of it
    grid = fig.add_gridspec(len(strips), 1, hspace=0.25, left=0.3, right=0.97,
                            top=1 - (0.4 + plot_h + gap) / height, bottom=0.1 / height)
    for model in dict.fromkeys(r["model"] for r in rows if r["steps"] > 0):
        rs = [r for r in rows if r["model"] == model]
        x = [r["steps"] for r in rs]
        y = np.array([r["fd_excess"] for r in rs])
        lo = np.array([r["fd_excess_lo"] for r in rs])
        hi = np.array([r["fd_excess_hi"] for r in rs])
        err = np.nan_to_num(np.stack([y - lo, hi - y]))
        ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, label=_short(rs[0]["method"]))
    ax.axhline(0.0, color="k", lw=0.8, ls="--", label="the floor (real vs real)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("sampling steps (Euler; the end-to-end peer: midpoint, 2 evaluations each)")
    ax.set_ylabel("FD − floor (95% interval)", fontsize=8)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    for i, (label, imgs) in enumerate(strips):
        a = fig.add_subplot(grid[i])
        a.imshow(image_grid([imgs], scale=1), cmap="gray", vmin=0, vmax=255, interpolation="nearest",
                 aspect="auto")
        a.set_xticks([])
        a.set_yticks([])
        a.set_ylabel(_short(label), rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("digits: FD above the held-out floor; samples from the same noise (model @ Euler steps)",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stage(budget: dict, progress: bool = False):
    stage = OmegaConf.merge(OmegaConf.structured(ImageStage), OmegaConf.create(budget["stage"]))
    stage.progress = progress
    return stage


def _run_config(budget_name: str, seeds: list[int], draws: int) -> dict:
    """What makes two runs' rows comparable: the budget's settings (the stage's and the step counts scored)
    with this run's seeds and draws (recorded in the result's config, compared by --merge)."""
    budget = BUDGETS[budget_name]
    stage = OmegaConf.to_container(_stage(budget), resolve=True)
    return {**{k: v for k, v in budget.items() if k != "stage"}, "budget": budget_name, "seeds": seeds,
            "draws": draws, "stage": stage}


def _setup(budget_name: str, draws_arg, seeds: list[int], cache: str, progress: bool):
    """What every training seed's run shares: the stage, the held-out split, the judge and the noise draws
    (deterministic, so that worker processes rebuild exactly what the parent has)."""
    budget = BUDGETS[budget_name]
    draws = int(draws_arg or budget["draws"])
    stage = _stage(budget, progress)
    data = load_digits()
    train, held = heldout_split(data, HELDOUT_FRACTION, SPLIT_SEED)
    n = int(budget["samples"] or len(held) // 2)
    start = time.perf_counter()
    encoder, einfo = load_or_train_encoder(train, cache_dir=Path(cache), steps=int(budget["encoder_steps"]),
                                           seed=ENCODER_SEED)
    einfo.update(wall_s=time.perf_counter() - start)
    judge = HeldOutJudge(encoder, train.images, held.images, n, k=5, splits_per_draw=SPLITS_PER_DRAW,
                         split_seed=SPLIT_SEED + 1000)
    # draw d of the i-th training seed is draw i * draws + d: every seed gets its own noise and splits (so the
    # seeds' means are independent replicates); within a draw every model gets the same noise and splits
    noises = [eval_noise(n, data.image_shape, 12345 + d) for d in range(draws * len(seeds))]
    ev = {"straightness_samples": int(stage.eval.straightness_samples),
          "straightness_steps": int(stage.eval.straightness_steps)}
    return {"budget": budget, "stage": stage, "data": data, "train": train, "held": held, "n": n,
            "encoder": encoder, "einfo": einfo, "judge": judge, "noises": noises, "ev": ev, "seeds": seeds,
            "draws": draws}


def _check_merge(earlier: dict, raw: list[dict], path) -> None:
    """Refuse to merge rows scored by another judge: the real-image scores of every draw must agree."""
    real = ("data", "train_copy")
    old_real = {(e["model"], e["draw"]): e["fd"] for e in earlier["draws"] if e["model"] in real}
    new_real = {(e["model"], e["draw"]): e["fd"] for e in raw if e["model"] in real}
    if old_real.keys() != new_real.keys() or any(abs(old_real[k] - new_real[k]) > 1e-6 for k in new_real):
        raise SystemExit(f"error: --merge {path}: its real-image scores differ from this run's (another held-out "
                         "split, feature network, noise or torch build): the rows would not be comparable")


def _seed_worker(job):
    budget_name, draws_arg, seeds, cache, progress, no_peer, seed, wall, peer_only, path, reuse = job
    torch.set_num_threads(1)

    def run():
        ctx = {**_setup(budget_name, draws_arg, seeds, cache, progress), "wall": wall, "peer_only": peer_only}
        return _train_and_score_seed(ctx, seed, None if no_peer else import_peer()[0])

    return _seed_saved(Path(path), seed, run, reuse)


def _peer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rectified-flow-pytorch")
    except PackageNotFoundError:
        return "unknown"


def _seed_key(run_config: dict, judge_rows: list[dict], mode: str, peer_version: str | None) -> str:
    """What decides one training seed's rows: the budget's settings with the run's seeds and draws (a seed's
    draws depend on its place in ``--seeds``), the judge (its real-image scores, which differ with another
    split, feature network or CPU), which models are trained (``mode``), the peer's version, torch's and the
    code's."""
    import hashlib

    judge = hashlib.sha256(json.dumps([[e["model"], e["draw"], round(float(e["fd"]), 6)] for e in judge_rows])
                           .encode()).hexdigest()
    key = {"config": run_config, "judge": judge, "mode": mode, "peer": peer_version, "torch": torch.__version__,
           "code": code_version()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _seed_saved(path: Path, seed: int, run_fn, reuse: bool):
    """One training seed's (rows, strips, students, peer sizes): the saved ones when ``reuse`` and they exist,
    else ``run_fn()``, saved the moment it ends. A benchmark stopped or failed after some seeds keeps them:
    the same command again trains only the rest."""
    if reuse and path.exists():
        saved = json.loads(path.read_text())
        print(f"[bench.images] seed {seed}: reused {path}", flush=True)
        strips = [(label, torch.tensor(x, dtype=torch.float32)) for label, x in saved["strips"]]
        return saved["raw"], strips, saved["students"], saved["peer_params"]
    raw, strips, students, peer_params = run_fn()
    write_json_atomic(path, {"seed": seed, "raw": raw, "strips": [[label, x.tolist()] for label, x in strips],
                             "students": students, "peer_params": peer_params})
    print(f"[bench.images] seed {seed}: saved {path}", flush=True)
    return raw, strips, students, peer_params


def _train_and_score_seed(ctx: dict, seed: int, rfp) -> tuple[list[dict], list, list[str], dict]:
    """Train every model of one training seed and score its draws: (raw entries, image strips (draw 0 only),
    the distilled students' names, the peer's parameter counts)."""
    budget, stage, train, judge, noises, ev = (ctx[k] for k in ("budget", "stage", "train", "judge", "noises",
                                                                 "ev"))
    seeds, draws, wall = ctx["seeds"], ctx["draws"], ctx["wall"]
    shape = ctx["data"].image_shape
    raw: list[dict] = []
    strips: list[tuple[str, torch.Tensor]] = []

    def record(model, steps_list, seed: int, impl: str = "flowpolicy", straight: bool = True) -> None:
        info = getattr(model, "info", {})
        label = _label(model.name, info)
        s = None
        if straight:
            s = evaluate(model, noises[0][:1], [], None, seed=seed, **ev)[0].get("straightness")
        first = seeds.index(seed) * draws
        for k in steps_list:
            for d in range(first, first + draws):
                t0 = time.perf_counter()
                x = model.generate(noises[d], k)
                raw.append({"model": model.name, "method": label, "impl": impl, "steps": k, "seed": seed,
                            "draw": d, "nfe_per_step": getattr(model, "nfe_per_step", 1), "sample_s": time.perf_counter() - t0, "train_s": model.train_s,
                            "straightness": s, **{key: v for key, v in info.items() if key in ("k", "pairs")},
                            **judge.score(x, d)})
                if d == 0:
                    strips.append((f"{label} @ {k}", x[:16]))
        mine = [e for e in raw if e["model"] == model.name and e["seed"] == seed]
        excess = {k: round(float(np.mean([e["fd_excess"] for e in mine if e["steps"] == k])), 1)
                  for k in steps_list}
        print(f"[{time.perf_counter() - wall:6.0f}s] seed {seed} {model.name}: train {model.train_s:.0f}s, "
              f"FD - floor {excess}", flush=True)

    peer_params = {}
    progress = bool(stage.progress)
    students = []
    if not ctx.get("peer_only"):  # --peer-only: our rows come from an earlier run (--merge)
        torch.manual_seed(seed)
        rf1 = train_base("1rf", "rf", train, stage, "cpu", progress=progress)
        record(rf1, budget["rf_steps"], seed)
        rf2 = train_reflow(rf1, stage, seed, progress=progress)
        record(rf2, budget["reflow_steps"], seed)
        students = train_distilled(rf2, stage, seed, progress=progress)
        for student in students:
            record(student, budget["reflow_steps"], seed, straight=False)
        torch.manual_seed(seed)
        shortcut = train_base("shortcut", "shortcut", train, stage, "cpu", progress=progress)
        record(shortcut, budget["shortcut_steps"], seed, straight=False)
    if rfp is not None:
        torch.manual_seed(seed)
        peer = PeerModel(rfp, shape, stage)
        # same network, same convention: before training, the peer's sampler must reproduce ours exactly
        ours = RectifiedFlow(peer.ema.model.net, shape).sample(steps=4, x0=noises[0][:64])
        if not torch.allclose(peer.generate(noises[0][:64], 4), ours, atol=1e-5):
            raise RuntimeError("rectified-flow-pytorch's Euler sampler disagrees with flowpolicy's on "
                               "one network")
        peer.train(train.images, int(stage.grad_steps), int(stage.batch_size), float(stage.lr),
                   float(stage.grad_clip), str(stage.lr_schedule))
        record(peer, budget["rf_steps"], seed, impl="rectified-flow-pytorch", straight=False)
        torch.manual_seed(seed)
        own = PeerOwnModel(rfp, shape, budget.get("peer_unet", OWN_UNET))
        own.train(train.images, int(stage.grad_steps), int(stage.batch_size))
        record(own, budget["rf_steps"], seed, impl="rectified-flow-pytorch", straight=False)
        peer_params = {"peer_own": own.num_params(), "ours": sum(p.numel() for p in peer.ema.model.net.parameters())}
    return raw, strips, [s.name for s in students], peer_params


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the budget's)")
    parser.add_argument("--draws", type=int,
                        help="sampling draws per model and steps (default: the budget's)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--cache", default=str(ROOT / "data" / "classifiers"),
                        help="where the trained feature network is cached")
    parser.add_argument("--no-peer", action="store_true", help="skip rectified-flow-pytorch")
    parser.add_argument("--peer-only", action="store_true",
                        help="train and score only the peer's rows and take ours from --merge (an earlier run of "
                             "this budget, seeds and draws without the peer)")
    parser.add_argument("--merge", default=None,
                        help="with --peer-only: the earlier images JSON whose rows of our models are kept")
    parser.add_argument("--add-peer-table", default=None, metavar="JSON",
                        help="train nothing: add the ours-against-the-peer comparison to a finished run's JSON "
                             "summary and Markdown (for runs made before the benchmark computed it)")
    parser.add_argument("--work", default="/tmp/flowpolicy_bench",
                        help="folder for finished training seeds (images/runs/): rerunning the same command with "
                             "the same code reuses the seeds it finished")
    parser.add_argument("--no-reuse", action="store_true",
                        help="retrain every seed, even those saved under --work by the same command")
    parser.add_argument("--progress", action="store_true", help="tqdm bars while training")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--workers", type=int, default=1,
                        help="train the seeds in this many processes at once (one torch thread each; the same "
                             "results as one process with --threads 1)")
    args = parser.parse_args(argv)
    if args.add_peer_table:
        return add_peer_table(Path(args.add_peer_table))
    out = check_out_dir(args.out)  # before training: results that cannot be written would be lost
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    budget = BUDGETS[args.budget]
    seeds = list(dict.fromkeys(args.seeds or budget["seeds"]))
    draws = int(args.draws or budget["draws"])
    if draws < 2:
        raise SystemExit("error: --draws must be at least 2 (an interval needs replicates)")
    earlier = None
    if args.peer_only or args.merge:
        if not (args.peer_only and args.merge and not args.no_peer):
            raise SystemExit("error: --peer-only and --merge go together (and without --no-peer): the peer's rows from "
                             "this run, ours from the merged one")
        stem = "images" if args.budget == "full" else f"images-{args.budget}"
        check_not_written(args.merge, [out / f"{stem}.json"])
        earlier = load_result(args.merge, "--merge", "bench.images", _is_images,
                              ("config", "draws", "command", "date", "wall_s"))
        mine = _run_config(args.budget, seeds, draws)
        mine["stage"].pop("progress")
        theirs = {k: earlier["config"].get(k) for k in mine}
        if isinstance(theirs["stage"], dict):
            theirs["stage"].pop("progress", None)
        differ = sorted(k for k in mine if theirs[k] != mine[k])
        if differ:
            def show(cfg, k):
                if k == "stage" and isinstance(cfg[k], dict):  # only the stage settings that differ
                    return "stage " + str({s: cfg[k].get(s) for s in sorted(set(mine[k]) | set(theirs[k] or {}))
                                           if mine[k].get(s) != (theirs[k] or {}).get(s)})
                return f"{k}={cfg[k]}"
            raise SystemExit(f"error: --merge {args.merge}: its {', '.join(show(theirs, k) for k in differ)} differ "
                             f"from this run's {', '.join(show(mine, k) for k in differ)}")
    ctx = _setup(args.budget, args.draws, seeds, args.cache, args.progress)
    stage, data, train, held, n, encoder, einfo, judge, noises = (
        ctx[k] for k in ("stage", "data", "train", "held", "n", "encoder", "einfo", "judge", "noises"))
    einfo.update(heldout_accuracy=accuracy_on(encoder, held), train_accuracy=accuracy_on(encoder, train))
    total = draws * len(seeds)

    raw: list[dict] = []
    strips: list[tuple[str, torch.Tensor]] = []
    for d in range(total):  # the two reference rows: real held-out images and copies of training images
        raw.append({"model": "data", "method": LABELS["data"], "impl": "-", "steps": 0, "seed": None,
                    "draw": d, **judge.score_real(d)})
    for d in range(total):
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(54321 + d))[:n]
        copies = train.images[pick]
        raw.append({"model": "train_copy", "method": LABELS["train_copy"], "impl": "-", "steps": 0,
                    "seed": None, "draw": d, **judge.score(copies, d)})
        if d == 0:
            strips.append(("training images", copies[:16]))
    strips.insert(0, ("held-out real", held.images[judge.split(0)["other"][:16]]))
    if earlier is not None:  # before any training: the merged run's judge must be this one, draw for draw
        _check_merge(earlier, raw, args.merge)

    rfp, peer_note = (None, "skipped (--no-peer)") if args.no_peer else import_peer()
    if args.peer_only and rfp is None:
        raise SystemExit(f"error: --peer-only: the peer is {peer_note}")
    ctx["wall"], ctx["peer_only"] = wall, bool(args.peer_only)
    mode = "peer" if args.peer_only else ("ours" if rfp is None else "ours+peer")
    key = _seed_key(_run_config(args.budget, seeds, draws), raw, mode, _peer_version() if rfp is not None else None)
    runs = Path(args.work) / "images" / "runs"
    paths = {seed: runs / f"{args.budget}-{mode}-seed{seed}-{key}.json" for seed in seeds}
    reuse = not args.no_reuse
    n_reused = sum(reuse and paths[s].exists() for s in seeds)
    workers = max(1, min(int(args.workers), len(seeds)))
    if workers == 1:
        outs = [_seed_saved(paths[seed], seed, lambda seed=seed: _train_and_score_seed(ctx, seed, rfp), reuse)
                for seed in seeds]
    else:  # one process per training seed; each rebuilds the same judge and noises (same results as serial)
        import multiprocessing as mp

        jobs = [(args.budget, args.draws, seeds, args.cache, args.progress, args.no_peer, seed, wall,
                 bool(args.peer_only), str(paths[seed]), reuse) for seed in seeds]
        with mp.get_context("spawn").Pool(workers) as pool:
            outs = pool.map(_seed_worker, jobs, chunksize=1)
    students, peer_params = [], {}
    for seed_raw, seed_strips, names, params in outs:
        raw.extend(seed_raw)
        strips.extend(seed_strips)
        students, peer_params = names or students, params or peer_params

    if earlier is not None:  # ours from the merged run (its judge was checked before training)
        raw += [e for e in earlier["draws"] if e["impl"] == "flowpolicy"]
        students = sorted({e["model"] for e in raw if "_distill_" in e["model"]})
        peer_note += f"; our rows merged from `{earlier['command']}` ({earlier['date']}, {earlier['wall_s']:.0f} s)"
    rows = aggregate(raw)

    def row(model, k):
        return next(r for r in rows if r["model"] == model and r["steps"] == k)

    reference = ("1rf", max(budget["rf_steps"]))
    candidates = list(students) + ["shortcut"]
    best = min(candidates, key=lambda m: row(m, 1)["fd_excess"])
    targets = {m: paired_target(raw, m, reference) for m in candidates}
    floors = [judge.split(i)["floor"] for i in range(total * SPLITS_PER_DRAW)]
    floor_mean, floor_lo, floor_hi = t_interval(judge.floors(total))
    at_floor = [f"{r['method']} @ {r['steps']}" for r in rows
                if r["model"] not in ("data", "train_copy") and math.isfinite(r["fd_excess_lo"])
                and r["fd_excess_lo"] <= 0]
    summary = {
        "floor": {"n": n, "mean": floor_mean, "lo": floor_lo, "hi": floor_hi,
                  "split_sd": float(np.std(floors, ddof=1)), "splits": len(floors),
                  "per_draw_splits": SPLITS_PER_DRAW},
        "reference": {"model": reference[0], "steps": reference[1],
                      **{k: row(*reference)[k] for k in ("fd_excess", "fd_excess_lo", "fd_excess_hi")}},
        "best_one_step": {"model": best,
                          **{k: row(best, 1)[k] for k in ("fd_excess", "fd_excess_lo", "fd_excess_hi")},
                          "ratio_of_means": row(best, 1)["fd_excess"] / row(*reference)["fd_excess"]},
        "target": "1-step FD excess over the floor (distilled 2-RF or shortcut) <= 1.5 x the 1-RF's at "
                  f"{reference[1]} steps",
        "target_check": targets,
        "at_floor": at_floor,
        "split": {"heldout_fraction": HELDOUT_FRACTION, "seed": SPLIT_SEED, "train_images": len(train),
                  "heldout_images": len(held)},
        "encoder": einfo,
        "peer": peer_note,
        "peer_params": peer_params,
        "vs_peer": peer_comparison(raw),
    }
    # the full budget's files feed the README; a quick check must not overwrite them
    stem = "images" if args.budget == "full" else f"images-{args.budget}"
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.images " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "name": "images",
        "command": command.strip(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - wall,
        "reused_seeds": n_reused,
        "config": {"dataset": data.name, "samples_per_score": n, **_run_config(args.budget, seeds, draws),
                   "stage": OmegaConf.to_container(stage, resolve=True)},
        "rows": rows,
        "summary": summary,
        "draws": raw,
    }
    over = rows[-1]["over"]
    t = targets[best]
    ref_row, best_row = row(*reference), row(best, 1)
    header = (f"# images\n\n`{result['command']}` on {result['machine']['platform']} ({os.cpu_count()} "
              f"CPUs, {torch.get_num_threads()} torch threads), torch {torch.__version__}, {result['date']}, "
              f"wall time {result['wall_s']:.1f} s"
              + (f" ({n_reused} of {len(seeds)} training seeds reused from an earlier invocation of this "
                 "command; their models' training s are from that one)" if n_reused else "") + ".\n\n")
    interval = (f"Student-t 95% over the means of {len(seeds)} training seeds (each its own {draws} draws of "
                f"noise and splits; the two real rows over their {total} draws)"
                if over == "seeds" else
                f"Student-t 95% over {draws} draws of noise of one training seed: sampling noise only, not "
                "the spread between training seeds")
    floor_text = (f"{floor_mean:.1f} (sd {summary['floor']['split_sd']:.1f} over {len(floors)} random "
                  f"splits; each draw averages {SPLITS_PER_DRAW} splits)")
    notes = (
        f"\n\n**Held out.** The digits are split per class: {len(train)} training images (the generators and "
        f"the feature network train on them) and {len(held)} held-out images that nothing trains on. "
        f"Features: a ReLU/max-pool CNN with 32 features (seed {ENCODER_SEED}), trained on the training "
        f"images only, accuracy {einfo['heldout_accuracy']:.3f} on the held-out images; it is not the reward "
        "classifier that alignment uses.\n\n"
        f"**The floor.** Every score compares n = {n} samples with n held-out real images. The floor is the "
        f"FD between two disjoint real halves of n: {floor_text}. It is what a perfect generator scores at "
        "this n. FD − floor is paired with the floor split by split; a row whose FD − floor interval reaches "
        "0 cannot be told from held-out real images by FD at this n"
        + (f": {', '.join(at_floor)}." if at_floor else "; no generated row does.") + "\n\n"
        f"**Intervals** (in brackets): {interval}.\n\n"
        "**Precision, recall, coverage** (k = 5 nearest neighbours, same features, against the reference "
        "half): the held-out real row is what real images score at this n; lower precision means unrealistic "
        "samples, lower recall or coverage dropped modes. **NN ratio**: median pixel distance of a sample to "
        "its nearest training image over the same for held-out real images (1: as far from the training set "
        "as new digits; 0: copies). The training-images row shows that FD − floor cannot see memorisation; "
        "the NN ratio can.\n\n"
        f"**Target** ({summary['target']}): best 1-step {best_row['method']} FD − floor "
        f"{_ci(best_row, 'fd_excess', '.1f')} vs {ref_row['method']} @ {reference[1]} "
        f"{_ci(ref_row, 'fd_excess', '.1f')}; paired difference (1-step − 1.5 × {reference[1]}-step) "
        f"{t['diff']:.1f} [{t['diff_lo']:.1f}, {t['diff_hi']:.1f}]: {t['verdict']}. Peer: {peer_note}. "
        f"Budget {args.budget}.\n")
    table = _markdown(rows)
    notes = notes.rstrip("\n") + _peer_markdown(summary["vs_peer"], rows) if summary["vs_peer"] else notes
    with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=2)
    os.replace(f.name, out / f"{stem}.json")
    (out / f"{stem}.md").write_text(header + table + notes)
    _plot(rows, strips, out / f"{stem}.png")
    print(table + notes)
    return result


if __name__ == "__main__":
    main()
