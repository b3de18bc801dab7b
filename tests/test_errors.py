"""User errors: one line `error: ...` and exit code 2 from train.py, raised before any work or any write."""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.errors import UserError, is_user_error, one_line  # noqa: E402
from envs.hdf5 import DatasetError  # noqa: E402
from tests.fixture_envs import write_robomimic_file  # noqa: E402

QUIET = ["logger=none", "progress=false", "task.eval.videos=0", "task.eval.episodes=2", "task.eval.num_envs=1",
         "task.eval.denoise_steps=[1]"]


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _run(*overrides, run_dir):
    from agents.stages import run

    return run(_compose(*overrides, *QUIET), run_dir)


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    return write_robomimic_file(tmp_path_factory.mktemp("d") / "good.hdf5", 6)


@pytest.fixture(scope="module")
def checkpoint(demo_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ck")
    _run("task=robomimic", f"task.demos.path={demo_file}", "stage=pretrain", "stage.grad_steps=5", "stage.eval_every=0",
         "stage.save_every=5", "stage.val_every=5", "policy.hidden=16", "policy.depth=1", run_dir=run_dir)
    return run_dir


def _copy(path, tmp_path, name, edit):
    import shutil

    out = tmp_path / name
    shutil.copy(path, out)
    with h5py.File(out, "a") as f:
        edit(f)
    return str(out)


def test_truncated_file_is_one_line_and_exit_2_and_leaves_the_run_dir_alone(demo_file, tmp_path):
    bad = tmp_path / "truncated.hdf5"
    data = Path(demo_file).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    run_dir = tmp_path / "existing_run"
    run_dir.mkdir()
    (run_dir / "config_resolved.yaml").write_text("precious\n")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "task=robomimic", f"task.demos.path={bad}",
                          "stage=pretrain", f"hydra.run.dir={run_dir}", *QUIET],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and str(bad) in lines[-1] and "truncated or corrupt" in lines[-1]
    assert "Traceback" not in out.stderr
    assert (run_dir / "config_resolved.yaml").read_text() == "precious\n"
    assert sorted(p.name for p in run_dir.iterdir()) in (["config_resolved.yaml"], ["config_resolved.yaml", "train.log"])
    # debug=true shows the traceback instead
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "task=robomimic", f"task.demos.path={bad}",
                          "stage=pretrain", f"hydra.run.dir={run_dir}", "debug=true", *QUIET],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode != 0 and "DatasetError" in out.stderr


def test_bad_data_is_a_user_error_naming_file_demo_and_key(demo_file, tmp_path):
    def strings(f):
        del f["data/demo_1/actions"]
        f["data/demo_1/actions"] = np.array([[b"a", b"b", b"c"]] * 3)

    def nan_in_valid(f):
        valid = f["mask/valid"][0].decode()
        f[f"data/{valid}/obs/object"][1, 0] = np.nan

    not_hdf5 = tmp_path / "notes.hdf5"
    not_hdf5.write_text("not hdf5")
    cases = [(_copy(demo_file, tmp_path, "s.hdf5", strings), r"s.hdf5: data/demo_1/actions: holds \|S1 values, not numbers"),
             (_copy(demo_file, tmp_path, "n.hdf5", nan_in_valid), r"n.hdf5: data/demo_\d/obs: contains NaN or Inf \(first at step 1\)"),
             (str(not_hdf5), "notes.hdf5: not an HDF5 file")]
    for path, pattern in cases:
        with pytest.raises(DatasetError, match=pattern) as info:
            _run("task=robomimic", f"task.demos.path={path}", "stage=pretrain", run_dir=tmp_path / "r")
        assert is_user_error(info.value)
    assert not (tmp_path / "r").exists()


def test_integer_actions_are_converted_with_a_note(demo_file, tmp_path, capsys):
    from agents.stages import resolve_task

    def ints(f):
        for name in f["data"]:
            a = np.sign(f[f"data/{name}/actions"][()]).astype(np.int64)
            del f[f"data/{name}/actions"]
            f[f"data/{name}/actions"] = a

    path = _copy(demo_file, tmp_path, "i.hdf5", ints)
    resolve_task(_compose("task=robomimic", f"task.demos.path={path}"))
    assert "actions are int64; converted to float32" in capsys.readouterr().err


def test_budgets_and_device_fail_before_any_work(tmp_path):
    with pytest.raises(UserError, match=r"stage.finetune.total_env_steps must be >= 1, got -1"):
        _run("stage.finetune.total_env_steps=-1", run_dir=tmp_path / "a")
    with pytest.raises(UserError, match=r"stage.grad_steps must be >= 1"):
        _run("stage=pretrain", "stage.grad_steps=0", run_dir=tmp_path / "b")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"device=cuda but .*use device=cpu"):
            _run("device=cuda", run_dir=tmp_path / "c")
    with pytest.raises(UserError, match="task=metaworld needs task.env"):
        _run("task=metaworld", run_dir=tmp_path / "d")
    assert not any((tmp_path / d).exists() for d in "abcd")  # nothing written, nothing collected


def test_checkpoint_that_does_not_fit_the_env_fails_before_the_first_rollout(checkpoint, tmp_path, monkeypatch):
    import envs.factory
    from agents import evaluate

    real = envs.factory.env_meta
    # the env the checkpoint names has changed since training (say, another obs key set): 11-dim observations
    monkeypatch.setattr(envs.factory, "env_meta", lambda name, **kw: {**real(name, **kw), "obs_dim": 11})
    monkeypatch.setattr(evaluate, "rollout_episodes", lambda *a, **k: pytest.fail("rolled out"))
    with pytest.raises(UserError, match=r"expects observations of size 6 but env gym/.*PointReach-v0.* has 11"):
        _run("stage=eval", f"checkpoint={checkpoint}", run_dir=tmp_path / "e")
    with pytest.raises(UserError, match=r"expects observations of size 6"):
        _run("stage=finetune", f"checkpoint={checkpoint}", run_dir=tmp_path / "f")
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()


def test_corrupt_extra_safetensors_is_a_user_error(checkpoint, tmp_path):
    import shutil

    from agents.checkpoint import CheckpointError

    ck = tmp_path / "ck"
    shutil.copytree(checkpoint / "checkpoints" / "last", ck, symlinks=False)
    extra = sorted((ck / "extra").glob("*.safetensors"))[0]
    extra.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=extra.name) as info:
        _run("stage=eval", f"checkpoint={ck}", run_dir=tmp_path / "e")
    assert is_user_error(info.value) and one_line(info.value).startswith("error: ")
    assert not (tmp_path / "e").exists()


def test_library_errors_are_not_user_errors_and_messages_are_one_line():
    try:
        np.zeros(3).reshape(2)
    except ValueError as err:
        assert not is_user_error(err)
    assert one_line(UserError("a\n  b\n")) == "error: a; b"


@pytest.mark.parametrize("overrides, says", [
    (["stage=pretrain", "stage.clip_coef=abc"], ["stage.clip_coef", "PretrainStage"]),
    (["stage=finetune", "stage.clip_coef=abc"], ["stage.clip_coef=abc", "Float"]),
    (["task=nonexistent"], ["task/nonexistent", "pick_place", "hopper_medium"]),
    (["seed=0,1"], ["seed=0,1", "--multirun"]),
])
def test_a_bad_override_is_one_line_naming_the_key(overrides, says):
    from agents.cli import composition_error

    msg = composition_error(overrides, str(ROOT / "configs"))
    assert msg is not None and msg.startswith("error: ") and "\n" not in msg, msg
    assert all(s in msg for s in says), msg
    assert "Config search path" not in msg and "full_key" not in msg


@pytest.mark.parametrize("overrides, new", [
    (["stage=pretrain", "stage.steps=5"], "grad_steps, gradient steps"),
    (["stage.pretrain.steps=5"], "grad_steps, gradient steps"),
    (["stage=finetune", "stage.steps=2"], "denoise_steps, denoising steps K"),
    (["stage=eval", "stage.steps=[1]"], "denoise_steps, denoising steps K"),
    (["stage=align", "stage.K=2"], "denoise_steps, denoising steps K"),
    (["task=digits", "stage=image", "stage.train_steps=5"], "grad_steps, gradient steps"),
    (["task=digits", "stage=image", "stage.eval.steps=[1]"], "denoise_steps, denoising steps K"),
])
def test_a_renamed_setting_names_its_new_name(overrides, new):
    from agents.cli import composition_error

    msg = composition_error(overrides, str(ROOT / "configs"))
    assert msg is not None and "\n" not in msg and msg.endswith(f"(renamed: {new})"), msg
    assert "To append" not in msg  # Hydra's '+key=' advice would add a dead key


def test_old_names_in_task_files_and_finetune_settings_point_to_the_new_ones(tmp_path):
    from agents.finetune_config import FinetuneConfig

    with pytest.raises(ValueError, match=r"'steps' \(renamed: denoise_steps"):
        FinetuneConfig.from_dict({"steps": 2})
    cfg = _compose("task=pick_place", "stage=pretrain", *QUIET)
    from omegaconf import OmegaConf, open_dict

    with open_dict(cfg):  # a task file written before the rename: eval.steps instead of eval.denoise_steps
        cfg.task.eval = OmegaConf.create({k: v for k, v in cfg.task.eval.items() if k != "denoise_steps"} | {"steps": [1]})
    from agents.stages import run

    with pytest.raises(UserError, match=r"task.eval.steps \(renamed: denoise_steps"):
        run(cfg, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_saved_with_the_old_names_loads_under_the_new_ones(checkpoint, tmp_path):
    import shutil

    import yaml

    from agents.checkpoint import load_checkpoint, write_manifest

    src = load_checkpoint(str(checkpoint))["path"]
    old = shutil.copytree(src, tmp_path / "old")
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    cfg["train"]["steps"] = cfg["train"].pop("grad_steps")  # as written before the rename
    (old / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    write_manifest(old)
    train = load_checkpoint(str(old))["config"]["train"]
    assert train["grad_steps"] == 5 and "steps" not in train


def test_good_overrides_and_hydra_flags_pass_the_precheck():
    from agents.cli import composition_error

    cfg_dir = str(ROOT / "configs")
    assert composition_error(["stage=finetune", "stage.clip_coef=0.05", "task=hopper_medium"], cfg_dir) is None
    assert composition_error(["hydra.run.dir=/tmp/x", "seed=3"], cfg_dir) is None
    # Hydra's own flags and debug=true leave the report to Hydra (full traceback wanted, or --multirun sweeps)
    assert composition_error(["--multirun", "seed=0,1"], cfg_dir) is None
    assert composition_error(["stage.bogus=1", "debug=true"], cfg_dir) is None


def test_train_py_reports_a_bad_key_in_one_line_with_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "stage=pretrain", "stage.bogus=1",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "stage.bogus" in lines[0], out.stderr
    assert not (tmp_path / "run").exists()  # nothing was created


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_a_run_dir_of_another_stage_or_task_is_refused_before_anything_is_written(checkpoint, demo_file, tmp_path):
    import shutil

    run_dir = shutil.copytree(checkpoint, tmp_path / "run", symlinks=True)  # a finished stage=pretrain run (task=robomimic)
    other = shutil.copy(demo_file, tmp_path / "other.hdf5")
    before = _files(run_dir)
    same = ["task=robomimic", "stage=pretrain", "stage.grad_steps=5", "stage.eval_every=0", "stage.save_every=5",
            "stage.val_every=5", "policy.hidden=16", "policy.depth=1"]
    for stage in ("eval", "finetune"):  # another stage: its config, summary and results would be replaced
        with pytest.raises(UserError, match=rf"{run_dir} already holds a stage=pretrain run of task=robomimic "
                           rf"\({demo_file}\); stage={stage} there would overwrite .*another hydra.run.dir"):
            _run(f"stage={stage}", f"checkpoint={run_dir}", f"task.demos.path={demo_file}", run_dir=run_dir)
    # the same stage on another demo file: its checkpoint would be resumed on other data
    with pytest.raises(UserError, match=rf"not of task=robomimic \({other}\); .*or resume=false to delete"):
        _run(*same, f"task.demos.path={other}", run_dir=run_dir)
    assert _files(run_dir) == before
    # the same stage and task resumes there (finished: no step trained), and resume=false starts fresh on purpose
    assert _run(*same, f"task.demos.path={demo_file}", run_dir=run_dir)["pretrain"]["step"] == 5
    _run(*same, f"task.demos.path={other}", "resume=false", run_dir=run_dir)
    assert str(other) in (run_dir / "config_resolved.yaml").read_text()



def test_a_run_dir_evaluated_from_another_runs_checkpoint_is_refused(checkpoint, demo_file, tmp_path):
    """stage=eval twice in one run dir: the same checkpoint again (any of its run's paths) rewrites its own
    results; a checkpoint of another run would overwrite them, and is refused before anything is written."""
    import shutil

    other = shutil.copytree(checkpoint, tmp_path / "other_run", symlinks=True)  # the same weights, another run
    args = ["stage=eval", f"task.demos.path={demo_file}", "task=robomimic"]
    ev = tmp_path / "ev"
    _run(*args, f"checkpoint={checkpoint}", run_dir=ev)
    before = _files(ev)
    with pytest.raises(UserError, match=rf"{ev} already holds a stage=eval run of task=robomimic .* from "
                       rf"checkpoint={checkpoint}, a checkpoint of another run than checkpoint={other}; .*another "
                       "hydra.run.dir"):
        _run(*args, f"checkpoint={other}", run_dir=ev)
    assert _files(ev) == before
    _run(*args, f"checkpoint={checkpoint}/checkpoints/last", run_dir=ev)  # the same run's checkpoint: allowed


@pytest.mark.parametrize("override, says", [
    ("threads=0", "threads must be >= 1, got 0"),
    ("threads=abc", "threads=abc is not an integer"),
    ("seed=abc", "seed=abc is not an integer"),
    ("seed=1.5", "seed=1.5 is not an integer"),
    ("resume=maybe", "resume=maybe is not a boolean; use resume=true or resume=false"),
    ("debug=abc", "debug=abc is not a boolean"),
    ("progress=abc", "progress=abc is not a boolean"),
])
def test_top_level_settings_are_parsed_strictly_and_name_the_key(override, says, tmp_path):
    from agents.stages import run

    with pytest.raises(UserError, match=says) as info:  # the override last: QUIET sets progress=false
        run(_compose("stage=pretrain", "stage.grad_steps=1", *QUIET, override), tmp_path / "r")
    assert is_user_error(info.value) and "\n" not in one_line(info.value)
    assert not (tmp_path / "r").exists()


def test_booleans_read_yes_no_1_0_and_a_bad_debug_shows_no_traceback(monkeypatch):
    from agents.errors import full_traceback_wanted
    from agents.stages import validate_config

    cfg = _compose("stage=pretrain", *QUIET, "debug=no", "progress=0", "resume=yes", "seed=3")
    validate_config(cfg)
    assert (cfg.debug, cfg.progress, cfg.resume, cfg.stage.resume, cfg.seed) == (False, False, True, True, 3)
    cfg = _compose("stage=pretrain", "resume=NO", *QUIET)
    validate_config(cfg)
    assert cfg.stage.resume is False
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert [full_traceback_wanted(v) for v in ("abc", "no", False, "0", "yes", True, 1)] == [
        False, False, False, False, True, True, True]


@pytest.mark.parametrize("overrides, says", [
    (["stage=image"], r"stage=image needs an image task such as task=digits \(task=pick_place is a policy task"),
    (["task=digits", "stage=pretrain"], r"task=digits is an image task: use stage=image"),
    (["task=digits"], r"task=digits is an image task: use stage=image \(stage=pipeline needs a policy task"),
])
def test_a_stage_of_the_other_task_kind_is_one_line(overrides, says, tmp_path):
    from agents.stages import run

    with pytest.raises(UserError, match=says):
        run(_compose(*overrides, "logger=none"), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_a_run_dir_that_is_a_file_is_one_line_before_hydra_starts(tmp_path):
    from agents.cli import run_dir_error

    (tmp_path / "file").write_text("mine\n")
    msg = run_dir_error(["stage=pretrain", f"hydra.run.dir={tmp_path / 'file'}"])
    assert msg == f"error: hydra.run.dir={tmp_path / 'file'} is a file, not a directory; give a new or an existing directory"
    assert "is under" in run_dir_error([f"hydra.run.dir={tmp_path / 'file' / 'sub'}"])
    assert run_dir_error([f"hydra.run.dir={tmp_path / 'new' / 'sub'}", f"hydra.sweep.dir={tmp_path}"]) is None
    assert run_dir_error(["hydra.run.dir=outputs/${now:%H}"]) is None
    assert (tmp_path / "file").read_text() == "mine\n"


@pytest.mark.parametrize("overrides, says", [
    (["stage=finetune", "stage.actor_lr=-1"], r"stage: FinetuneConfig: actor_lr must be > 0, got -1"),
    (["stage=finetune", "stage.critic_lr=0"], r"critic_lr must be > 0, got 0"),
    (["stage=finetune", "stage.noise_lr=-0.1"], r"noise_lr must be > 0 \(or null: actor_lr\), got -0.1"),
    (["stage=finetune", "stage.max_grad_norm=-1"], r"max_grad_norm must be > 0"),
    (["stage.finetune.actor_lr=-1"], r"stage.finetune: FinetuneConfig: actor_lr must be > 0"),
    (["stage=pretrain", "stage.grad_clip=-1"], r"stage.grad_clip must be >= 0 \(the max gradient norm; 0: no clip"),
    (["stage.pretrain.grad_clip=-1"], r"stage.pretrain.grad_clip must be >= 0"),
    (["stage=reflow", "stage.grad_clip=-1"], r"stage.grad_clip must be >= 0 \(the max gradient norm; 0: no clip"),
    (["stage=align", "stage.image.grad_clip=-1"], r"stage.image.grad_clip must be >= 0"),
    (["task=digits", "stage=image", "stage.grad_clip=-1"], r"stage.grad_clip must be >= 0"),
])
def test_a_negative_learning_rate_or_max_norm_is_refused_before_any_work(overrides, says):
    from agents.stages import validate_config

    with pytest.raises(UserError, match=says):
        validate_config(_compose(*overrides, "checkpoint=/nonexistent"))


def test_grad_clip_0_is_accepted_as_no_clipping():
    from agents.stages import validate_config

    for overrides in (["stage=pretrain"], ["task=digits", "stage=image"], ["stage=reflow"]):
        validate_config(_compose(*overrides, "stage.grad_clip=0", "checkpoint=/nonexistent"))


def test_a_pipeline_run_dir_as_checkpoint_names_its_stage_folders(checkpoint, tmp_path):
    import shutil

    from agents.checkpoint import CheckpointError

    pipe = tmp_path / "pipe"
    shutil.copytree(checkpoint, pipe / "pretrain", symlinks=True)
    (pipe / "finetune" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=rf"is a pipeline run directory .*: give checkpoint={pipe / 'finetune'} "
                       rf"\(the fine-tuned policy\) or checkpoint={pipe / 'pretrain'} \(the pretrained policy\)$"):
        _run("stage=eval", f"checkpoint={pipe}", run_dir=tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_a_checkpoint_given_to_a_stage_that_trains_from_scratch_gets_a_note(capsys):
    from agents.stages import validate_config

    validate_config(_compose("stage=pretrain", "checkpoint=/some/run", *QUIET))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: stage=pretrain trains from scratch and does not read checkpoint=/some/run (it is ignored; "
                   "the stages that start from a checkpoint: eval, finetune, align, reflow)"]
    validate_config(_compose("stage=pretrain", *QUIET))
    assert capsys.readouterr().err == ""


def test_refused_input_leaves_no_empty_run_folder_and_keeps_an_existing_one(tmp_path):
    """Hydra creates the run directory (and an empty train.log) before train.py checks its input: a refused run
    removes what it created, and leaves a directory that existed before as it was."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine\n")
    (tmp_path / "empty").mkdir()
    for extra in ([], ["hydra.run.dir=new/sub"], ["hydra.run.dir=mine"], ["hydra.run.dir=empty"]):
        out = subprocess.run([sys.executable, str(ROOT / "train.py"), "threads=0", *extra], capture_output=True,
                             text=True, timeout=120, cwd=tmp_path, env=env)
        assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == "error: threads must be >= 1, got 0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine"]  # no outputs/<date>/..., no new/
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert not any((tmp_path / "empty").iterdir())
    # a refused run's own log lines go with its folder; a run dir that got anything else keeps it all
    from agents.cli import RunDirBefore, discard_unused_run_dir

    run = tmp_path / "new" / "r"
    run.mkdir(parents=True)
    (run / "train.log").write_text("INFO OpenGL acceleratesupport ...\n")
    assert discard_unused_run_dir(str(run), RunDirBefore(str(run), False, str(tmp_path), False))
    assert not (tmp_path / "new").exists()
    run.mkdir(parents=True)
    (run / "train.log").write_text("step 1\n")
    (run / "config_resolved.yaml").write_text("stage: {name: pretrain}\n")
    assert not discard_unused_run_dir(str(run), RunDirBefore(str(run), False, str(tmp_path), False))
    assert sorted(p.name for p in run.iterdir()) == ["config_resolved.yaml", "train.log"]


def test_a_missing_robosuite_is_one_line_and_exit_2_before_anything_is_written(no_robosuite, tmp_path):
    """task=robosuite_lift without the robosuite extra: refused in the prechecks (no config files, no run dir),
    not by a traceback from the demo collector after the run dir was written."""
    says = r'task=robosuite_lift \(env robosuite/Lift\): robosuite is not installed; install the optional extra'
    with pytest.raises(UserError, match=says):
        _run("task=robosuite_lift", "stage=pretrain", f"data_dir={tmp_path / 'data'}", run_dir=tmp_path / "a")
    assert not any(tmp_path.iterdir())
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "task=robosuite_lift", "stage=pretrain",
                          f"hydra.run.dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}", *QUIET],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=no_robosuite)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: task=robosuite_lift (env robosuite/Lift): robosuite is not")
    assert not any(tmp_path.iterdir())  # no run dir, no config files, no data dir


@pytest.mark.parametrize("override, says", [
    ("task.demos.noise=-0.5", r"task.demos.noise must be a number >= 0 \(the action noise std\), got -0.5"),
    ("task.demos.seed=-1", r"task.demos.seed must be an integer >= 0, got -1"),
    ("task.demos.num=0", r"task.demos.num must be an integer >= 1, got 0"),
    ("task.demos.quality=best", r"task.demos.quality must be 'expert' or 'medium', got 'best'"),
])
def test_settings_of_the_demos_to_collect_are_refused_before_any_work(override, says, tmp_path):
    with pytest.raises(UserError, match=says):
        _run("stage=pretrain", override, f"data_dir={tmp_path / 'data'}", run_dir=tmp_path / "r")
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def shortcut_checkpoint(demo_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sc")
    _run("task=robomimic", f"task.demos.path={demo_file}", "stage=pretrain", "policy=shortcut", "stage.grad_steps=5",
         "stage.eval_every=0", "stage.save_every=5", "stage.val_every=5", "policy.hidden=16", "policy.depth=1",
         run_dir=run_dir)
    return run_dir


def _held_run_dir(tmp_path, *overrides):
    """A run dir that holds a run of the composed stage (its config_resolved.yaml and overrides.yaml)."""
    from omegaconf import OmegaConf

    run_dir = tmp_path / "held"
    run_dir.mkdir()
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(_compose(*overrides, *QUIET), resolve=True))
    (run_dir / "overrides.yaml").write_text("- mine\n")
    return run_dir


@pytest.mark.parametrize("stage, override, says", [
    ("align", "stage.lr=0", "stage.lr must be positive, got 0"),
    ("align", "stage.grad_steps=-1", "stage.grad_steps must be >= 1, got -1"),
    ("reflow", "stage.reflow_steps=-1", "stage.reflow_steps must be >= 1, got -1"),
    ("reflow", "stage.reflow_lr=0", "stage.reflow_lr must be positive, got 0"),
])
def test_align_and_reflow_settings_are_refused_before_the_run_dir_is_written(checkpoint, demo_file, tmp_path,
                                                                             stage, override, says):
    args = [f"stage={stage}", f"checkpoint={checkpoint}", "task=robomimic", f"task.demos.path={demo_file}"]
    with pytest.raises(UserError, match=says):
        _run(*args, override, run_dir=tmp_path / "new")
    assert not (tmp_path / "new").exists()
    held = _held_run_dir(tmp_path, *args)
    before = _files(held)
    with pytest.raises(UserError, match=says):
        _run(*args, override, run_dir=held)
    assert _files(held) == before


def test_a_shortcut_checkpoint_is_refused_a_k_that_is_not_a_power_of_two_before_evaluating(shortcut_checkpoint,
                                                                                          demo_file, tmp_path):
    args = ["stage=eval", f"checkpoint={shortcut_checkpoint}", "task=robomimic", f"task.demos.path={demo_file}"]
    with pytest.raises(UserError, match=r"shortcut policy, which samples with power-of-two K; stage.denoise_steps "
                       r"has \[3\]"):
        _run(*args, "stage.denoise_steps=[3]", run_dir=tmp_path / "e")
    assert not (tmp_path / "e").exists()
    with pytest.raises(UserError, match=r"power-of-two K; stage.denoise_steps has \[3\]"):
        _run("stage=finetune", *args[1:], "stage.denoise_steps=3", run_dir=tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_a_shortcut_pipeline_is_refused_a_finetuning_k_that_is_not_a_power_of_two_before_pretraining(demo_file,
                                                                                                       tmp_path):
    args = ["policy=shortcut", "task=robomimic", f"task.demos.path={demo_file}", "task.eval.denoise_steps=[1,2]"]
    with pytest.raises(UserError, match=r"^policy=shortcut trains a shortcut policy, which samples with power-of-two "
                       r"K; stage.finetune.denoise_steps has \[3\]$"):
        _run(*args, "stage.finetune.denoise_steps=3", run_dir=tmp_path / "p")
    assert not (tmp_path / "p").exists()
    from agents.stages import validate_config

    validate_config(_compose(*args, "stage.finetune.denoise_steps=2", *QUIET))  # a power of two passes


def test_flow_dpo_of_a_shortcut_checkpoint_is_refused_before_any_rollout(shortcut_checkpoint, demo_file, tmp_path,
                                                                         monkeypatch):
    from agents import align

    monkeypatch.setattr(align, "preference_data", lambda *a, **k: pytest.fail("collected rollouts"))
    with pytest.raises(UserError, match=r"Flow-DPO trains the flow-matching velocity; a shortcut policy"):
        _run("stage=align", f"checkpoint={shortcut_checkpoint}", "stage.method=dpo", "task=robomimic",
             f"task.demos.path={demo_file}", run_dir=tmp_path / "a")
    assert not (tmp_path / "a").exists()


IMAGE_TINY = ["task=digits", "stage=image", "logger=none", "progress=false", "stage.grad_steps=2",
              "stage.batch_size=8", "stage.eval.samples=8", "stage.eval.fd=false", "stage.eval.straightness_samples=0",
              "stage.eval.denoise_steps=[1]", "stage.net.channels=[8]", "stage.net.emb_dim=8", "stage.grid_cols=4"]


@pytest.mark.parametrize("overrides, says", [
    (["stage.grad_steps=-1"], r"stage.grad_steps must be >= 1, got -1"),
    (["stage.lr=0"], r"stage.lr must be positive, got 0"),
    (["stage.lr=-1"], r"stage.lr must be positive, got -1"),
    (["stage.batch_size=0"], r"stage.batch_size must be >= 1, got 0"),
    (["stage.lr_schedule=linear"], r"stage.lr_schedule must be 'constant' or 'cosine'"),
    (["stage.eval.fd=true", "stage.classifier.grad_steps=0"], r"stage.classifier.grad_steps must be >= 1, got 0"),
    (["stage.method=reflow", "stage.reflow.lr=0"], r"stage.reflow.lr must be positive, got 0"),
    (["stage.method=reflow", "stage.reflow.grad_steps=0"], r"stage.reflow.grad_steps must be >= 1, got 0"),
    (["stage.method=reflow", "stage.reflow.couplings=0"], r"stage.reflow.couplings must be >= 1, got 0"),
    (["stage.method=reflow", "stage.distill.lr=-1"], r"stage.distill.lr must be positive, got -1"),
    (["stage.method=reflow", "stage.distill.grad_steps=-1"], r"stage.distill.grad_steps must be >= 0, got -1"),
    (["stage.method=reflow", "stage.distill.k=[0]"], r"stage.distill.k must be positive"),
    (["stage.method=shortcut", "stage.eval.denoise_steps=[3]"], r"powers of two"),
])
def test_image_budgets_and_learning_rates_are_refused_before_any_work(overrides, says, tmp_path, monkeypatch):
    from agents import images
    from agents.stages import run

    monkeypatch.setattr(images, "run", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(UserError, match=says):
        run(_compose(*IMAGE_TINY, *overrides), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_image_distill_settings_are_not_checked_when_there_is_no_distillation():
    from agents.stages import validate_config

    validate_config(_compose(*IMAGE_TINY, "stage.method=reflow", "stage.distill.grad_steps=0", "stage.distill.lr=0"))
    validate_config(_compose(*IMAGE_TINY, "stage.reflow.lr=0"))  # method=rf trains no 2-RF


def test_an_image_run_dir_of_another_seed_is_refused_before_anything_is_written(tmp_path):
    from agents.stages import run

    run_dir = tmp_path / "img"
    run(_compose(*IMAGE_TINY, "seed=0"), run_dir)
    before = _files(run_dir)
    with pytest.raises(UserError, match=r"holds 1rf trained with other settings \(stage, seed or method\)"):
        run(_compose(*IMAGE_TINY, "seed=3"), run_dir)
    assert _files(run_dir) == before
    run(_compose(*IMAGE_TINY, "seed=0"), run_dir)  # the same settings resume (nothing left to train)
    run(_compose(*IMAGE_TINY, "seed=3", "resume=false"), run_dir)  # on purpose: trained again, replaced


def test_image_align_from_a_generator_checkpoint_passes_the_prechecks_and_a_bad_lr_writes_nothing(tmp_path):
    """stage=align on an image task reads a generator checkpoint (not a policy): the prechecks load it as one."""
    from agents.stages import run

    gen = tmp_path / "img"
    run(_compose(*IMAGE_TINY), gen)
    align = ["task=digits", "stage=align", "logger=none", "progress=false", f"checkpoint={gen}/checkpoints/1rf",
             "stage.method=sft", "stage.image.num_samples=8", "stage.image.sample_steps=1", "stage.image.grad_steps=1",
             "stage.image.batch_size=4", "stage.image.eval_samples=8", "stage.image.classifier_steps=2",
             f"stage.image.classifier_cache_dir={tmp_path / 'clf'}"]
    with pytest.raises(UserError, match=r"stage.image.lr and stage.image.beta must be positive, got lr=0"):
        run(_compose(*align, "stage.image.lr=0"), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    out = run(_compose(*align), tmp_path / "a")
    assert out["align"]["method"] == "sft" and (tmp_path / "a" / "align.json").exists()
