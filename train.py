"""flowpolicy's single entry point (Hydra).

    python train.py                                   # the embedded default pipeline (pick-place)
    python train.py stage=pretrain policy=shortcut    # pretrain only
    python train.py stage=eval checkpoint=outputs/.../pretrain task.eval.steps=[1,2,4,8]
    python train.py stage=finetune checkpoint=...     # ReinFlow PPO
    python train.py stage=reflow checkpoint=...       # 2-rectified flow + 1-step distillation of a policy
    python train.py task=digits stage=image           # image generation with the same flow core
    python train.py --multirun seed=0,1,2
"""

from __future__ import annotations

import ctypes.util
import os
import sys

# MuJoCo picks its GL backend at import: headless machines need osmesa (CPU) or egl (GPU) for videos.
if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
    os.environ["MUJOCO_GL"] = "osmesa" if ctypes.util.find_library("OSMesa") else "egl"
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from agents.stages import run

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        out = run(cfg, run_dir)
    except KeyboardInterrupt as err:
        print(f"\nstopped: {err}", file=sys.stderr)
        sys.exit(130)
    for key in ("eval", "eval_finetuned", "align"):
        if isinstance(out.get(key), dict) and out[key].get("markdown"):
            print(f"\n## {key}\n{out[key]['markdown']}")
    print(f"\nrun directory: {run_dir}")


if __name__ == "__main__":
    main()
