"""Train image generators with the flowpolicy core: 1-RF, reflow (2-RF) + distillation, shortcut models.

The flow math lives in ``flowpolicy`` only: ``RectifiedFlow.loss``/``sample``, ``make_couplings``,
``distillation_loss``, ``straightness``, ``ShortcutFlow``. This module only feeds batches, runs Adam, keeps an
EMA of the weights (used for every sample), logs, evaluates and writes checkpoints: building and fitting in
:mod:`agents.images.fitting`, evaluation, sample grids and checkpoints in :mod:`agents.images.sampling`, the
stage (:func:`run`) here; this module re-exports the names of both.

Methods (``stage.method``):

- ``rf``: 1-rectified flow on the data.
- ``reflow``: 1-RF; couplings (x0, ODE(x0)) from its EMA network; 2-RF initialized from 1-RF and trained on
  the fixed pairs; then couplings from the 2-RF and K-step distillations of it (``2rf_distill_k<K>``).
- ``shortcut``: a shortcut model (network also takes the step size), sampled with powers-of-two steps.

A run directory receives ``checkpoints/<model>/`` (the policies' atomic checkpoint format, kind
``image_generator``: ``last`` -> ``step_<N>/``; see :func:`save_checkpoint`), ``samples/<model>.png``
(one row per number of sampling steps, same noise for every model and row), TensorBoard scalars under ``tb/``
(not with ``logger=none``) and ``eval.json``.

Resume (``resume=true``, the default): re-running the command in the same run directory (``hydra.run.dir=...``)
loads every model an earlier run finished (weights, EMA, its evaluation and the global RNG state after it, so
what follows trains exactly as in one uninterrupted run) and trains the rest. A model that was stopped part way
(Ctrl-C) is trained again from its start. Finished models trained with other settings stop the run with one
line (use a new run directory or ``resume=false``, which retrains and replaces them).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from .. import distributed
from ..checkpoint import (
    StopOnInterrupt,
    TrainingInterrupted,
    atomic_write_json,
    load_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
)
from ..errors import UserError, check_at_least, check_positive
from ..runfiles import CheckpointError
from ..tblog import tensorboard_wanted
from .classifier import FrechetScorer, load_or_train_classifier
from .data import load_dataset
from .fitting import (  # noqa: F401 - agents.images.trainer API
    CHECKPOINT_FORMAT,
    METHODS,
    TrainedModel,
    _Logger,
    _Stopped,
    build_flow,
    distill_ks,
    fit,
    train_base,
    train_distilled,
    train_reflow,
)
from .sampling import (  # noqa: F401 - agents.images.trainer API
    check_steps,
    eval_noise,
    evaluate,
    image_grid,
    load_generator,
    save_checkpoint,
)

# --- the entry point ----------------------------------------------------------------------------------------


def _run_dir(cfg: DictConfig, run_dir: str | Path | None) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
    except ImportError:
        pass
    return Path(cfg.get("run_dir") or os.getcwd())


def _abs_path(p: str) -> Path:
    """Relative paths resolve against the launch directory, also under Hydra with ``job.chdir=True``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import to_absolute_path

        if HydraConfig.initialized():
            return Path(to_absolute_path(p))
    except ImportError:
        pass
    return Path(p)


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Train and evaluate image generators as ``cfg.stage`` says, on ``cfg.task``'s dataset.

    ``cfg`` needs ``task`` (dataset, path, image_size, channels), ``stage`` (agents.config_schema.ImageStage),
    and optionally ``seed`` and ``device``. ``run_dir``: explicit output folder; else Hydra's run dir, else
    ``cfg.run_dir``, else the working directory. Returns (and writes to ``eval.json``) a summary:
    ``{"method", "run_dir", "dataset", "classifier", "models": {name: {"fd": {K: FD}, "sample_s": {K: s},
    "straightness", "train_s", "checkpoint", "samples"}}}``.
    """
    task, stage = cfg.task, cfg.stage
    method = str(stage.method)
    steps_list = check_stage(stage)
    out = _run_dir(cfg, run_dir)
    out.mkdir(parents=True, exist_ok=True)
    # torchrun: every rank trains (data-parallel, agents.images.fitting.fit); rank 0 alone evaluates and writes
    main = distributed.info().is_main
    seed = int(cfg.get("seed", 0))
    device = torch.device(str(cfg.get("device", "cpu")))
    progress = bool(stage.get("progress") if stage.get("progress") is not None else cfg.get("progress", True))

    data = load_dataset(str(task.dataset), task.get("path"), task.get("image_size"), int(task.get("channels", 3)))
    summary: dict = {"method": method, "run_dir": str(out), "seed": seed, "device": str(device),
                     "dataset": {"name": data.name, "num_images": len(data), "image_shape": list(data.image_shape),
                                 "num_classes": data.num_classes},
                     "models": {}}
    scorer = None
    if stage.eval.get("fd", True) and main:
        ccfg = stage.classifier
        cache = ccfg.get("cache_dir")
        clf, cinfo = load_or_train_classifier(data, cache_dir=_abs_path(cache) if cache else None,
                                              steps=int(ccfg.grad_steps), seed=int(ccfg.get("seed", 0)))
        scorer = FrechetScorer(clf, data.images)
        summary["classifier"] = cinfo
    x0_eval = eval_noise(int(stage.eval.samples), data.image_shape, seed + 12345)
    # seeded after the classifier: loading a cached one draws initial weights from the global RNG, training one
    # does not, so the generators must not depend on whether the classifier was cached
    seed_everything(seed)
    logger = _Logger(out / "tb" if tensorboard_wanted(cfg) else None) if main else None  # logger=none: no files
    settings = _settings(stage)
    resume = bool(cfg.get("resume", True)) and bool(stage.get("checkpoint", True))
    restored: dict[str, tuple[dict, dict]] = {}  # model name -> (its eval.json entry, training state after it)

    def restore(model: TrainedModel) -> bool:
        """Load ``model`` finished by an earlier run in this run directory, if there is one."""
        ck = _finished(out / "checkpoints" / model.name, (settings, seed, method), say=main) if resume else None
        if ck is None:
            return False
        c = ck["config"]
        model.flow.net.load_state_dict(ck["model"])
        model.ema.model.load_state_dict(ck["extras"]["ema"])
        model.ema.num_updates = int(c["ema_updates"])
        model.train_s = float(c["train_s"])
        restored[model.name] = (c["entry"], ck["training_state"])
        if main:
            print(f"resumed {model.name} from {ck['path']}", flush=True)
        return True
    data_meta = {"data": {"dataset": str(task.dataset), "name": data.name, "range": [-1.0, 1.0],
                          "num_classes": data.num_classes, "class_names": data.class_names}}

    def finish(model: TrainedModel) -> None:
        if model.name in restored:  # evaluated by the run that trained it; continue from the RNG state after it
            entry, state = restored.pop(model.name)
            set_rng_state(state["rng"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(list(state["cuda"]))
            if main:  # config.yaml keeps mapping keys as strings: K keys (fd, sample_s) back to ints
                summary["models"][model.name] = {k: {int(a) if str(a).isdigit() else a: b for a, b in v.items()}
                                                 if isinstance(v, dict) else v for k, v in entry.items()}
            return
        if not main:
            return
        metrics, samples = evaluate(model, x0_eval, steps_list, scorer,
                                    int(stage.eval.get("straightness_samples", 0)),
                                    int(stage.eval.get("straightness_steps", 32)), seed)
        for k, v in metrics["fd"].items():
            logger.scalar(f"eval/{model.name}/fd_steps_{k}", v)
        if "straightness" in metrics:
            logger.scalar(f"eval/{model.name}/straightness", metrics["straightness"])
        cols = int(stage.get("grid_cols", 16))
        png = out / "samples" / f"{model.name}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        image_grid([samples[k][:cols] for k in steps_list]).save(png)
        entry = {**metrics, "train_s": model.train_s, "samples": str(png), **model.info}
        if stage.get("checkpoint", True):
            entry["checkpoint"] = str(out / "checkpoints" / model.name)
            state = {"rng": rng_state()}  # the state the next model starts from (evaluation included)
            if device.type == "cuda":
                state["cuda"] = torch.cuda.get_rng_state_all()
            save_checkpoint(model, out / "checkpoints" / model.name, {**data_meta, "method": method, "seed": seed,
                            "settings": settings, "entry": entry}, training_state=state)
        summary["models"][model.name] = entry

    stop = StopOnInterrupt("image training").__enter__()
    try:
        if method == "shortcut":
            finish(train_base("shortcut", "shortcut", data, stage, device, logger, progress, restore))
        else:
            rf1 = train_base("1rf", "rf", data, stage, device, logger, progress, restore)
            finish(rf1)
            if method == "reflow":
                rf2 = train_reflow(rf1, stage, seed, logger, progress, restore)
                finish(rf2)
                if int(stage.distill.get("grad_steps", 0)) > 0:
                    for student in train_distilled(rf2, stage, seed, logger, progress, restore):
                        finish(student)
    except _Stopped as s:  # Ctrl-C: save the model being trained, once, with the step it reached
        if not main:
            raise TrainingInterrupted(f"stopped at step {s.step}; rank 0 saves") from None
        path = save_checkpoint(s.model, out / "checkpoints" / s.model.name,
                               {**data_meta, "method": method, "seed": seed, "stopped_at_step": s.step})
        summary["stopped"] = {"model": s.model.name, "step": s.step, "checkpoint": str(path)}
        atomic_write_json(out / "eval.json", summary)
        raise TrainingInterrupted(f"stopped at step {s.step}; saved {path}") from None
    finally:
        stop.__exit__()
        if logger is not None:
            logger.close()
    if main:
        atomic_write_json(out / "eval.json", summary)
    return summary


def check_stage(stage: DictConfig) -> list[int]:
    """Every setting of ``stage`` (agents.config_schema.ImageStage) that could fail or silently do nothing, checked
    before any work: the method, the evaluation K list (returned), the step counts and the learning rates of each
    training section the method runs. UserError naming the key (``stage.reflow.lr must be positive, got 0``)."""
    method = str(stage.method)
    if method not in METHODS:
        raise UserError(f"unknown stage.method {method!r}; choose from {METHODS}")
    try:
        steps_list = check_steps(method, stage.eval.denoise_steps)
    except ValueError as err:
        raise UserError(str(err)) from err
    ev, clf = stage.eval, stage.classifier
    check_at_least({"grad_steps": stage.grad_steps, "batch_size": stage.batch_size,
                    "log_every": stage.get("log_every", 50)}, 1, "stage.")
    check_at_least({"samples": ev.samples, "straightness_steps": ev.get("straightness_steps", 32)}, 1, "stage.eval.")
    check_at_least({"straightness_samples": ev.get("straightness_samples", 0)}, 0, "stage.eval.")
    if ev.get("fd", True):
        check_at_least({"grad_steps": clf.grad_steps}, 1, "stage.classifier.")
    check_positive({"lr": stage.lr}, "stage.")
    sections = {"": stage}
    if method == "reflow":
        r, d = stage.reflow, stage.distill
        sections["reflow."] = r
        check_at_least({"couplings": r.couplings, "couplings_steps": r.couplings_steps, "grad_steps": r.grad_steps},
                       1, "stage.reflow.")
        check_at_least({"grad_steps": d.grad_steps}, 0, "stage.distill.")  # 0: no distillation
        if int(d.grad_steps) > 0:
            sections["distill."] = d
            try:
                distill_ks(stage)
            except ValueError as err:
                raise UserError(str(err)) from err
            if str(d.get("pairs", "teacher")) not in ("teacher", "reflow"):
                raise UserError(f"stage.distill.pairs must be 'teacher' or 'reflow', got {d.pairs!r}")
            if str(d.get("pairs", "teacher")) == "teacher":
                check_at_least({"couplings": d.couplings, "couplings_steps": d.couplings_steps}, 1,
                               "stage.distill.")
    for prefix, section in sections.items():  # a section's lr 0 would silently fall back to the stage's
        check_positive({"lr": section.get("lr")}, f"stage.{prefix}")
        schedule = section.get("lr_schedule")
        if schedule is not None and str(schedule) not in ("constant", "cosine"):
            raise UserError(f"stage.{prefix}lr_schedule must be 'constant' or 'cosine', got {schedule!r}")
    return steps_list


def model_names(stage: DictConfig) -> list[str]:
    """The models ``stage.method`` trains, in order (their folders under ``checkpoints/``)."""
    method = str(stage.method)
    if method == "shortcut":
        return ["shortcut"]
    if method != "reflow":
        return ["1rf"]
    ks = distill_ks(stage) if int(stage.distill.get("grad_steps", 0)) > 0 else []
    return ["1rf", "2rf", *(f"2rf_distill_k{k}" for k in ks)]


def _finished(root: Path, trained_with: tuple, say: bool = True) -> dict | None:
    """The checkpoint in ``root`` of a model an earlier run finished with ``trained_with`` (settings, seed, method);
    None when there is none to resume (absent, unreadable, or stopped part way: trained again, said when ``say``).
    UserError when it was finished with other settings."""
    if not root.exists():
        return None
    try:
        ck = load_checkpoint(root)
    except CheckpointError as err:
        if say:
            print(f"{root.name}: {err}; training it again", flush=True)
        return None
    c = ck["config"]
    if c.get("stopped_at_step") is not None or "entry" not in c or ck["training_state"] is None:
        why = (f"stopped at step {c['stopped_at_step']} last time" if c.get("stopped_at_step") is not None
               else "saved without what resuming needs (an older flowpolicy)")
        if say:
            print(f"{root.name}: {why}; training it again from its start", flush=True)
        return None
    if (c.get("settings"), c.get("seed"), c.get("method")) != trained_with:
        raise UserError(f"{root} holds {root.name} trained with other settings (stage, seed or method); "
                        "use a new hydra.run.dir, or resume=false to train it again and replace it")
    return ck


def check_resume(cfg: DictConfig, run_dir: str | Path) -> None:
    """UserError, before anything is written, when ``run_dir`` holds a model this run would resume that an earlier
    run finished with other settings, seed or method (what :func:`run` would refuse only when it reached it)."""
    stage = cfg.stage
    if not (bool(cfg.get("resume", True)) and bool(stage.get("checkpoint", True))):
        return
    trained_with = (_settings(stage), int(cfg.get("seed", 0)), str(stage.method))
    for name in model_names(stage):
        _finished(Path(run_dir) / "checkpoints" / name, trained_with, say=False)


# settings that do not change what a model learns (presentation, evaluation, logging)
_NOT_TRAINING = ("name", "eval", "classifier", "checkpoint", "grid_cols", "log_every", "progress")


def _settings(stage: DictConfig) -> dict:
    """The stage settings a saved model must have been trained with for a run to resume from it."""
    from omegaconf import OmegaConf

    return {k: v for k, v in OmegaConf.to_container(stage, resolve=True).items() if k not in _NOT_TRAINING}
