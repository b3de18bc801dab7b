"""Regenerate the README's Results section from bench/results/*.md (never typed by hand).

    python -m bench.report            # rewrites README.md between the results markers
"""

from __future__ import annotations

import re
from pathlib import Path

from bench.common import RESULTS

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
# order and one-line context for each benchmark; files that do not exist yet are skipped
SECTIONS = [
    ("flow2d", "Flow core on 2-D 8 Gaussians (issue: foundation)"),
    ("envs_throughput", "Environment throughput and demo collection"),
    ("pretrain_pick_place", "Behavior cloning on pick-place: few-step evaluation, peers on the same HDF5 and budget"),
    ("pretrain_hopper_medium", "Behavior cloning on Hopper-v5 medium demos: few-step evaluation and peers"),
    ("finetune_hopper_medium", "Online fine-tuning on Hopper-v5 from medium demos (ReinFlow vs peers)"),
    ("fpo_hopper/finetune_hopper_medium_fpo_200k", "FPO beside ReinFlow and the Gaussian on Hopper-v5 (200k env "
                                                   "steps, 5 seeds)"),
    ("hopper_1m/finetune_hopper_medium_1m", "Online fine-tuning on Hopper-v5 up to 1M env steps (3 seeds; wall "
                                            "times not comparable: other jobs shared the cores)"),
    ("hopper_1m_wide/finetune_hopper_medium", "Online fine-tuning on Hopper-v5 up to 1M env steps with wide "
     "exploration: ReFlow with noise in the last step only and the Gaussian with SB3's std, the same larger PPO "
     "steps (3 seeds)"),
    ("hopper_1m_widedec/finetune_hopper_medium", "Online fine-tuning on Hopper-v5 up to 1M env steps with wide "
     "exploration and a late noise decay to [0.1, 0.2]: ReFlow, the Gaussian with SB3's std on the same PPO, and SB3 "
     "PPO from scratch in one command (3 seeds; the AMD EPYC's demos, not the Xeon's above; wall times not "
     "comparable: newcomer.sh and CI shared the 2 cores)"),
    ("hopper_1m_cos/finetune_hopper_medium", "Online fine-tuning on Hopper-v5 up to 1M env steps: the late noise decay "
     "with a cosine learning-rate decay to 0.1x (wdeccos) for ReFlow and the Gaussian, merged with the run above "
     "(widedec, the settings of `+experiment=hopper_1m`, and SB3 PPO; same demos, seeds and evaluation episodes; "
     "3 seeds; the merged rows' wall times are not comparable)"),
    ("hopper_1m_env/finetune_hopper_medium", "Online fine-tuning on Hopper-v5 up to 1M env steps: the reported settings "
     "with the env's whole action range (wdecenv, action_limits=env) for ReFlow and the Gaussian, merged with the "
     "demos' range run above (widedec and SB3 PPO; same demos, seeds and evaluation episodes; 3 seeds; wall times "
     "not comparable)"),
    ("pick_place_300k_clip05/finetune_pick_place_300k_clip05", "Online fine-tuning on Meta-World pick-place, 300k "
     "env steps, 5 seeds, clip 0.05 for every actor: ReFlow and the Gaussian, constant vs annealed noise and "
     "learning rate (wall times: an alignment benchmark shared the 2 cores for 27 of the 102 minutes)"),
    ("pick_place_300k/finetune_pick_place_300k", "Online fine-tuning on Meta-World pick-place, 300k env steps, 5 "
                                                 "seeds, noise bounds [0.15, 0.30]: ReFlow (clip 0.1 and 0.05) and the Gaussian"),
    ("pick_place_300k_sparse/finetune_pick_place_300k_sparse", "Online fine-tuning on Meta-World pick-place, "
     "300k env steps, 5 seeds: the sparse success reward with episodes ended at success (now the Meta-World "
     "default), beside the dense-reward runs (merged; the two runs ran on different CPUs, so wall times differ)"),
    ("peg_insert_300k/finetune_metaworld_peg-insert-side-v3", "Online fine-tuning on Meta-World "
     "peg-insert-side, 300k env steps, 5 seeds, the Meta-World defaults before the sparse reward (clip 0.05, dense "
     "reward): ReFlow and the Gaussian"),
    ("peg_insert_300k_sparse/finetune_metaworld_peg-insert-side-v3", "Online fine-tuning on Meta-World "
     "peg-insert-side, 300k env steps, 5 seeds: the sparse success reward with episodes ended at success "
     "(now the Meta-World default), beside the earlier dense-reward defaults (merged; the two runs ran on different CPUs, so wall times differ)"),
    ("pick_place_300k_hisig/finetune_pick_place", "Online fine-tuning on Meta-World pick-place, 300k env steps, "
     "5 seeds: ReFlow with noise bounds [0.2, 0.4] (now the Meta-World default) beside the sparse defaults of the "
     "time (merged; the two runs ran on different CPUs, so wall times differ)"),
    ("peg_insert_300k_hisig/finetune_metaworld_peg-insert-side-v3", "Online fine-tuning on Meta-World "
     "peg-insert-side, 300k env steps, 5 seeds: ReFlow with noise bounds [0.2, 0.4] (now the Meta-World default) "
     "beside the sparse defaults of the time (merged; the two runs ran on different CPUs, so wall times differ)"),
    ("basketball_300k/finetune_metaworld_basketball-v3", "Online fine-tuning on Meta-World basketball, 300k "
     "env steps, 5 seeds, the Meta-World defaults before the sparse reward (clip 0.05, dense reward): ReFlow and "
     "the Gaussian"),
    ("basketball_300k_sparse/finetune_metaworld_basketball-v3", "Online fine-tuning on Meta-World basketball, "
     "300k env steps, 5 seeds, the Meta-World defaults with the sparse success reward: ReFlow and the Gaussian "
     "(wall times: newcomer.sh shared the 2 cores for the first 16 of 31 minutes)"),
    ("basketball_300k_hisig/finetune_metaworld_basketball-v3", "Online fine-tuning on Meta-World basketball, "
     "300k env steps, 5 seeds: ReFlow with noise bounds [0.2, 0.4] (now the Meta-World default) beside the sparse "
     "defaults of the time (merged; the two runs ran on different CPUs, so wall times differ)"),
    ("mw_screen", "Meta-World tasks screened for fine-tuning: BC success from 20 noisy scripted demos (held-out "
                  "env seeds)"),
    ("robosuite", "robosuite Lift and Can: scripted-expert demos, BC, then ReinFlow fine-tuning (success before "
                  "and after)"),
    ("finetune_pick_place", "Online fine-tuning on Meta-World pick-place: settings compared side by side "
                            "(2026-11-26, before log-probs were normalized by the executed action dims)"),
    ("latency", "Policy latency: eager vs fast K-step sampling, and policies in the env loop"),
    ("gpu_latency", "Policy latency on a GPU machine (H200): eager vs fast vs CUDA graph, CPU vs CUDA "
                    "(`bash bench/gpu_check.sh 1`)"),
    ("gpu_finetune_hopper_medium", "Fine-tuning with the policy on the GPU and 16 env workers, beside the CPU-only "
                                   "runs and SB3 PPO on the same machine (`bash bench/gpu_check.sh 1`)"),
    ("scaling", "Data-parallel training (torchrun): throughput and equivalence"),
    ("gpu_scaling", "Data-parallel training on the GPU machine's 16 cores (`bash bench/gpu_check.sh 2`)"),
    ("images", "Image generation on digits with the same flow core"),
    ("align", "Reward and preference alignment"),
    ("align_digits", "Reward alignment on digits: drift, held-out pair accuracy and diversity within the target "
                     "class (3 seeds)"),
    ("align_branches", "Preference alignment on pick-place from same-state pairs (source=branches, 3 seeds)"),
]


def build() -> str:
    parts = []
    for name, title in SECTIONS:
        md = RESULTS / f"{name}.md"
        if not md.exists():
            continue
        body = md.read_text().strip()
        body = re.sub(r"^# .*\n+", "", body)  # drop the file's own title
        plot = RESULTS / f"{name}.png"
        img = f"\n\n![{name}](bench/results/{name}.png)" if plot.exists() else ""
        parts.append(f"### {title}\n\n{body}{img}\n")
    return "\n".join(parts)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{build()}\n{END}{tail}")
    print("README.md results section regenerated")


if __name__ == "__main__":
    main()
