"""What ``train.py`` needs before Hydra composes a config: ``--help`` text and the run-name resolver.

Kept free of torch/MuJoCo imports so ``python train.py --help`` answers at once.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .renamed import hint

HELP = """\
usage: python train.py [key=value ...] [--multirun key=a,b]

flowpolicy: flow-matching robot policies (behavior cloning, ReinFlow fine-tuning, alignment, few-step eval).
Every option is a Hydra override; the run directory is outputs/<date>/<time>_<task>[_<env>]_<stage>/.

stages (stage=...):
  pipeline   (default) demos -> pretrain -> eval -> ReinFlow fine-tuning -> eval
  pretrain   behavior cloning on demos, then evaluation at task.eval.denoise_steps
  eval       evaluate checkpoint=DIR on the env stored with it (stage.denoise_steps=[1,2,4])
  finetune   ReinFlow PPO from checkpoint=DIR; prints a before/after table
  reflow     2-rectified flow + 1-step distillation of checkpoint=DIR
  align      Flow-DPO / Flow-RWR from checkpoint=DIR
  image      image generation with the same flow core (task=digits)

task families (task=...):
  metaworld  task.env=metaworld/<any Meta-World v3 task>   scripted-expert demos, collected on first use
  mujoco     task.env=<gymnasium MuJoCo v5 env>             PPO expert + demos made on first use
             (task.demos.expert_steps=..., task.demos.quality=expert|medium)
  robosuite  task.env=robosuite/Lift|robosuite/Can         scripted-expert demos made on first use
             (the robosuite extra: pip install -e ".[robosuite]")
  robomimic  task.demos.path=FILE                           a robomimic low-dim HDF5 file; the env comes
             from its env_args, obs keys = all low-dim keys (sorted) unless task.obs_keys=[a,b]
  presets    pick_place (default), hopper_medium, walker2d_medium, robosuite_lift, robosuite_can,
             digits (images)

examples:
  python train.py                                                   # default pick-place pipeline
  python train.py task=metaworld task.env=metaworld/door-open-v3 stage=pretrain
  python train.py task=mujoco task.env=HalfCheetah-v5 task.demos.expert_steps=1000000
  python train.py task=robomimic task.demos.path=/data/lift/low_dim.hdf5 task.obs_keys=[object,robot0_eef_pos]
  python train.py stage=eval checkpoint=outputs/2026-01-01/12-00-00_pick_place_pipeline/pretrain

several processes (data-parallel pretrain, finetune and image; the batch and num_envs stay global):
  torchrun --standalone --nproc_per_node=2 train.py stage=pretrain

other keys: policy=reflow|shortcut|gaussian  device=cpu|cuda  seed=0  logger=tensorboard|wandb|none
            data_dir=DIR  progress=false  debug=true (full tracebacks; also HYDRA_FULL_ERROR=1)
errors: a bad input prints one line `error: ...` and exits with code 2.
Hydra's own help: python train.py --hydra-help; the composed config: python train.py --cfg job
"""


def slug(text: str) -> str:
    """A path-safe piece of a run name: ``metaworld/door-open-v3`` -> ``door-open-v3``."""
    text = str(text).split("@")[0].split("{")[0]
    text = text.rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "env"


def run_tag(name, env=None, demos_path=None) -> str:
    """``<task.name>_<env>`` for the run directory (the env is read from a demo file's env_args when the task
    names none, as for task=robomimic); just the name when it already says the env (pick_place)."""
    env_name = env
    if env_name in (None, "None", "null", "") and demos_path not in (None, "None", "null", ""):
        try:
            import json

            import h5py

            with h5py.File(demos_path, "r") as f:
                env_name = json.loads(f["data"].attrs["env_args"])["env_name"]
        except Exception:  # noqa: BLE001 - the run name must never fail; train.py reports the file itself
            env_name = str(demos_path).rsplit("/", 1)[-1].split(".")[0]
    if env_name in (None, "None", "null", ""):
        return str(name)
    tag = slug(env_name)
    base = re.sub(r"_v\d+$", "", tag.lower().replace("-", "_"))
    if str(name).lower().startswith(base):  # pick_place / pick-place-v3, hopper_medium / Hopper-v5
        return str(name)
    return f"{name}_{tag}"


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("run_tag"):
        OmegaConf.register_new_resolver("run_tag", run_tag)


_NOISE = ("full_key:", "object_type=", "reference_type=", "Set the environment variable", "Config search path",
          "provider=")


def composition_error(argv: list[str], config_dir: str) -> str | None:
    """Compose the config from ``argv``'s overrides the way ``train.py`` will, and return Hydra's complaint as
    one line ``error: ...`` (None when it composes, or when the command uses Hydra flags, ``--multirun`` sweeps
    or asks for full errors, which Hydra itself then reports)."""
    if any(a.startswith("-") for a in argv) or any(a.lstrip("+~").startswith("debug=") and a.split("=", 1)[1]
                                                    .lower() in ("true", "1", "yes") for a in argv):
        return None
    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        msg = hydra_one_line(err)
        for a in overrides:  # a setting that was renamed: say its new name
            key = a.lstrip("+~").split("=", 1)[0]
            last = key.rsplit(".", 1)[-1]
            if hint(last) and (f"'{key}'" in msg or f"'{last}'" in msg):
                m = re.search(r"not in '(\w+)Stage'", msg)
                where = m.group(1).lower() if m else ("image" if "stage=image" in argv else None)
                if where == "image" and "." in key.removeprefix("stage."):
                    where = "image." + key.removeprefix("stage.").split(".")[0]
                msg = "; ".join(p for p in msg.split("; ") if not p.startswith("To append to your config"))
                return f"{msg}; {key}{hint(last, where)}"
        return msg
    return None


def run_dir_error(argv: list[str]) -> str | None:
    """``hydra.run.dir=PATH`` (or ``hydra.sweep.dir``) that cannot be a directory, as one line ``error: ...``:
    an existing file, or a path under one (Hydra would fail creating it, with a traceback, before train.py's
    main runs). None when the path is fine or is not a plain path."""
    import os

    for arg in argv:
        key, eq, value = arg.lstrip("+~").partition("=")
        if not eq or key not in ("hydra.run.dir", "hydra.sweep.dir") or "${" in value:
            continue
        path = os.path.abspath(os.path.expanduser(value.strip().strip("'\"")))
        probe = path
        while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        if os.path.lexists(probe) and not os.path.isdir(probe):
            where = "is a file" if probe == path else f"is under {probe}, a file"
            return f"error: {key}={value} {where}, not a directory; give a new or an existing directory"
    return None


class RunDirBefore(NamedTuple):
    """``hydra.run.dir`` as the command line gave it, seen before Hydra creates it (:func:`given_run_dir`)."""

    path: str | None  # its absolute path; None: not given (a new dated one); "": not a plain path
    existed: bool  # it existed already
    anchor: str  # its deepest folder that existed (the working directory when not given)
    log_existed: bool  # it held a train.log already


def given_run_dir(argv: list[str]) -> RunDirBefore:
    """What :func:`discard_unused_run_dir` needs to know about the run directory before Hydra creates it."""
    import os

    path = None
    for arg in argv:
        key, eq, value = arg.lstrip("+~").partition("=")
        if eq and key == "hydra.run.dir":
            path = "" if "${" in value else os.path.abspath(os.path.expanduser(value.strip().strip("'\"")))
    if not path:
        return RunDirBefore(path, path == "", os.getcwd(), True)
    anchor = path
    while not os.path.isdir(anchor) and os.path.dirname(anchor) != anchor:
        anchor = os.path.dirname(anchor)
    return RunDirBefore(path, os.path.lexists(path), anchor, os.path.lexists(os.path.join(path, "train.log")))


def discard_unused_run_dir(run_dir: str, before: RunDirBefore) -> bool:
    """Undo what Hydra created for a run refused before it wrote anything, so that bad input leaves no run folder
    behind: the run directory when it holds nothing but this run's ``train.log`` (log lines of the refused run,
    such as a library's INFO line), and the parent folders it created (``outputs/<date>``) when they are left
    empty. A directory that existed before the run keeps all it had; only a ``train.log`` that Hydra added to it
    goes. Returns whether the run directory was removed."""
    from pathlib import Path

    here = Path(run_dir).resolve()
    if before.path == "" or (before.path is not None and Path(before.path).resolve() != here) or not here.is_dir():
        return False
    log = here / "train.log"
    if before.existed:
        if not before.log_existed and log.is_file() and not log.is_symlink():
            log.unlink()
        return False
    entries = list(here.iterdir())
    if any(e.name != "train.log" or e.is_symlink() or not e.is_file() for e in entries):
        return False
    for e in entries:
        e.unlink()
    here.rmdir()
    anchor, parent = Path(before.anchor).resolve(), here.parent
    while parent != anchor and anchor in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
    return True


def hydra_one_line(err: BaseException) -> str:
    """Hydra's multi-line composition message (and its cause's) as ``error: ...`` on one line."""
    chain, e = [], err
    while e is not None and len(chain) < 4:
        chain.append(e)
        e = e.__cause__ or e.__context__
    parts: list[str] = []
    for e in chain:
        text = str(e)
        if "Available options in" in text:  # a missing group option: name the choices on the same line
            head, _, opts = text.partition("Available options in")
            group, _, names = opts.split("Config search path")[0].partition(":")
            choices = ", ".join(n.strip() for n in names.split() if n.strip())
            text = f"{head.strip()}; options in {group.strip()}: {choices}"
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("In 'config': "):
                line = line[len("In 'config': "):]
            line = line.rstrip(".")
            if line and line != "None" and "$VALUE" not in line and not line.startswith(_NOISE) and line not in parts:
                parts.append(line)
    return "error: " + "; ".join(parts or [type(err).__name__])
