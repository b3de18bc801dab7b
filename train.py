"""flowpolicy's single entry point (Hydra). ``python train.py --help`` lists stages, task families, examples.

    python train.py                                   # the embedded default pipeline (pick-place)
    python train.py stage=pretrain policy=shortcut    # pretrain only
    python train.py task=metaworld task.env=metaworld/door-open-v3
    python train.py task=mujoco task.env=HalfCheetah-v5
    python train.py task=robomimic task.demos.path=/path/to/low_dim.hdf5
    python train.py stage=eval checkpoint=outputs/.../pretrain task.eval.denoise_steps=[1,2,4,8]
    python train.py stage=finetune checkpoint=...     # ReinFlow PPO
    python train.py stage=reflow checkpoint=...       # 2-rectified flow + 1-step distillation of a policy
    python train.py task=digits stage=image           # image generation with the same flow core
    python train.py --multirun seed=0,1,2

A user error (bad file, key, value) prints one line ``error: ...`` and exits with code 2; ``debug=true`` or
``HYDRA_FULL_ERROR=1`` shows the full traceback instead.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

# MuJoCo picks its GL backend at import: headless machines need osmesa (CPU) or egl (GPU, or CPU through Mesa).
if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
    os.environ["MUJOCO_GL"] = "osmesa" if ctypes.util.find_library("OSMesa") else "egl"
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

from agents.cli import HELP, register_resolvers  # noqa: E402

if __name__ == "__main__" and any(a in ("--help", "-h") for a in sys.argv[1:]):
    try:
        print(HELP)
    except BrokenPipeError:  # python train.py --help | head
        pass
    sys.exit(0)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

register_resolvers()
# the run directory as the command line gave it, seen before Hydra creates it (set in __main__ below)
RUN_DIR_GIVEN = None
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from agents.errors import EXIT_USER_ERROR, full_traceback_wanted, is_user_error, one_line
    from agents.stages import run

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        out = run(cfg, run_dir)
    except KeyboardInterrupt as err:  # the stage saved once and says where ("stopped at step N; saved <dir>")
        print(f"\n{err}" if str(err) else "\nstopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if full_traceback_wanted(cfg.get("debug", False)) or not is_user_error(err):
            raise
        print(one_line(err), file=sys.stderr)
        from agents.cli import discard_unused_run_dir

        if RUN_DIR_GIVEN is not None:
            discard_unused_run_dir(run_dir, RUN_DIR_GIVEN)  # refused before writing: no empty run folder is left
        sys.exit(EXIT_USER_ERROR)
    if out.get("rank", 0) != 0:  # torchrun: rank 0 prints the results
        return
    for key in ("eval", "finetune_table", "eval_finetuned", "align"):
        if isinstance(out.get(key), dict) and out[key].get("markdown"):
            print(f"\n## {key}\n{out[key]['markdown']}")
    print(f"\nrun directory: {run_dir}")


if __name__ == "__main__":
    from agents import distributed
    from agents.cli import composition_error, given_run_dir, run_dir_error
    from agents.errors import EXIT_USER_ERROR, full_traceback_wanted

    # a bad key, value or group option, or a run dir that is a file: one line and exit 2, before Hydra prints
    # its multi-line report
    problem = None if full_traceback_wanted() else (composition_error(sys.argv[1:], CONFIG_DIR)
                                                    or run_dir_error(sys.argv[1:]))
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)

    if not distributed.launched():
        RUN_DIR_GIVEN = given_run_dir(sys.argv[1:])
        main()
    else:  # a torchrun worker
        import shutil
        import tempfile

        scratch = None
        if int(os.environ.get("RANK", "0")) != 0:  # rank 0 owns the run directory; the others get a scratch one
            scratch = tempfile.mkdtemp(prefix=f"flowpolicy_rank{os.environ['RANK']}_")
            sys.argv.append(f"hydra.run.dir={scratch}")
        try:
            main()
            code = 0
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        distributed.exit_process(code)  # without interpreter teardown (see agents.distributed.exit_process)
