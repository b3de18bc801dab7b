"""Environment throughput and default-dataset collection cost.

    python -m bench.envs_throughput [--budget small|full]

Measures env steps per second with random actions (episode resets included) for each family, with one env
and with N envs in Gymnasium's SyncVectorEnv and AsyncVectorEnv, and the time and file size to collect the
default Meta-World dataset (pick-place-v3, 20 scripted demos, noise 0.3). Writes
``bench/results/envs_throughput.{json,md,png}`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from envs.collect import ensure_demos
from envs.factory import make_env, make_vec_env
from envs.hdf5 import read_meta

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BUDGETS = {
    "small": {"envs": ["Hopper-v5", "metaworld/pick-place-v3"], "num_envs": 4, "steps": 2_000, "seeds": [0]},
    "full": {"envs": ["Hopper-v5", "metaworld/pick-place-v3"], "num_envs": 8, "steps": 20_000, "seeds": [0, 1, 2]},
}
DEFAULT_DATASET = {"name": "metaworld/pick-place-v3", "num_demos": 20, "noise": 0.3}


def machine() -> str:
    return f"{platform.node()} | {os.cpu_count()} CPUs | {platform.processor() or platform.machine()} | " \
           f"Python {platform.python_version()}"


def single_env_steps_per_s(name: str, steps: int, seed: int) -> float:
    env = make_env(name, seed=seed)
    env.reset()
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed


def vec_env_steps_per_s(name: str, num_envs: int, steps: int, seed: int, asynchronous: bool) -> float:
    venv = make_vec_env(name, num_envs, seed=seed, asynchronous=asynchronous)
    try:
        venv.reset()
        venv.action_space.seed(seed)
        n_calls = max(1, steps // num_envs)
        start = time.perf_counter()
        for _ in range(n_calls):
            venv.step(venv.action_space.sample())
        elapsed = time.perf_counter() - start
    finally:
        venv.close()
    return n_calls * num_envs / elapsed


def collection_row(seed: int) -> dict:
    make_env(DEFAULT_DATASET["name"]).close()  # warm up: imports and Meta-World's task list are not timed
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = ensure_demos(DEFAULT_DATASET["name"], DEFAULT_DATASET["num_demos"], DEFAULT_DATASET["noise"], seed,
                            data_dir=tmp, progress=False)
        wall = time.perf_counter() - start
        meta = read_meta(path)
        size = path.stat().st_size
    return {
        "kind": "collection", "env": DEFAULT_DATASET["name"], "mode": "scripted expert, noise 0.3", "seed": seed,
        "num_demos": meta["num_demos"], "num_steps": meta["num_steps"], "success_rate": meta["success_rate"],
        "wall_s": wall, "file_kib": size / 1024, "steps_per_s": meta["num_steps"] / wall,
    }


def run(budget: str) -> dict:
    cfg = BUDGETS[budget]
    rows = []
    for name in cfg["envs"]:
        for seed in cfg["seeds"]:
            n = cfg["num_envs"]
            rows.append({"kind": "throughput", "env": name, "mode": "single", "num_envs": 1, "seed": seed,
                         "steps_per_s": single_env_steps_per_s(name, cfg["steps"], seed)})
            for asynchronous in (False, True):
                mode = "async" if asynchronous else "sync"
                sps = vec_env_steps_per_s(name, n, cfg["steps"], seed, asynchronous)
                rows.append({"kind": "throughput", "env": name, "mode": mode, "num_envs": n, "seed": seed,
                             "steps_per_s": sps})
    for seed in cfg["seeds"]:
        rows.append(collection_row(seed))
    return {"config": {"budget": budget, **cfg, "dataset": DEFAULT_DATASET, "actions": "uniform random"},
            "rows": rows}


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean (and std over seeds) per (env, mode, num_envs)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["env"], row["mode"], row.get("num_envs", 1)), []).append(row)
    out = []
    for (env, mode, n), group in groups.items():
        sps = np.array([r["steps_per_s"] for r in group])
        item = {"env": env, "mode": mode, "num_envs": n, "steps_per_s": float(sps.mean()),
                "steps_per_s_std": float(sps.std()), "seeds": len(group)}
        if group[0]["kind"] == "collection":
            item.update(wall_s=float(np.mean([r["wall_s"] for r in group])),
                        file_kib=float(np.mean([r["file_kib"] for r in group])),
                        num_steps=float(np.mean([r["num_steps"] for r in group])))
        out.append(item)
    return out


def markdown(result: dict) -> str:
    lines = [
        f"# Environment throughput ({result['config']['budget']} budget)", "",
        f"`{result['command']}` on {result['machine']}, {result['date']}, {result['wall_s']:.1f} s.", "",
        "| env | mode | envs | steps/s | collection |", "| --- | --- | ---: | ---: | --- |",
    ]
    for item in aggregate(result["rows"]):
        extra = ""
        if "wall_s" in item:
            extra = (f"20 demos, {item['num_steps']:.0f} steps in {item['wall_s']:.2f} s, "
                     f"{item['file_kib']:.0f} KiB")
        std = f" ± {item['steps_per_s_std']:.0f}" if item["seeds"] > 1 else ""
        lines.append(f"| {item['env']} | {item['mode']} | {item['num_envs']} | {item['steps_per_s']:.0f}{std} "
                     f"| {extra} |")
    lines += ["", "Random actions; episode resets are included in the step rate. Collection: scripted expert "
              "with success filter, written to HDF5."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [i for i in aggregate(result["rows"]) if "wall_s" not in i]
    envs = list(dict.fromkeys(i["env"] for i in items))
    modes = list(dict.fromkeys(f"{i['mode']} x{i['num_envs']}" for i in items))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        values = [next((i["steps_per_s"] for i in items if i["env"] == env
                        and f"{i['mode']} x{i['num_envs']}" == mode), 0.0) for env in envs]
        ax.bar(np.arange(len(envs)) + k * width, values, width, label=mode)
    ax.set_xticks(np.arange(len(envs)) + width * (len(modes) - 1) / 2, envs)
    ax.set_ylabel("env steps / s")
    ax.set_title(f"Environment throughput ({result['config']['budget']} budget, random actions)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.envs_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    from bench.common import check_out_dir

    check_out_dir(args.out_dir, "--out-dir")  # before measuring: the results must have somewhere to go
    load_before = os.getloadavg()[0]  # other processes on the machine lower the rates; recorded for context
    start = time.perf_counter()
    measured = run(args.budget)
    measured["config"]["load_avg_1min_before"] = load_before
    result = {
        "name": "envs_throughput",
        "command": "python -m bench.envs_throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - start,
        **measured,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "envs_throughput.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "envs_throughput.md").write_text(table)
    plot(result, out / "envs_throughput.png")
    print(table)
    return result


if __name__ == "__main__":
    main()
