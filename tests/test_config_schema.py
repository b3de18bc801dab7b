"""The stage configs' schema is the settings dataclasses (agents.config_schema): types and names are checked at
composition, tasks choose their own defaults through ``task_or``, and no YAML repeats a dataclass default."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import agents  # noqa: F401 - registers the schemas
from agents.config_schema import SCHEMAS, FinetuneStage
from agents.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _compose(*overrides):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_task_defaults_win_over_the_schema_and_the_command_line_over_both():
    default = FinetuneStage().clip_coef
    assert _compose("task=hopper_medium", "stage=finetune").stage.clip_coef == 0.02  # the task's
    assert _compose("task=mujoco", "task.env=HalfCheetah-v5", "stage=finetune").stage.clip_coef == default
    assert _compose("task=hopper_medium", "stage=finetune", "stage.clip_coef=0.3").stage.clip_coef == 0.3
    pipe = _compose("task=pick_place", "stage=pipeline")
    assert pipe.stage.finetune.sigma_max == 0.4 and pipe.stage.pretrain.grad_steps == 3000
    assert pipe.stage.finetune.gamma == FinetuneStage().gamma
    # Meta-World trains on the sparse success reward, ending episodes at success; other families keep theirs
    for task in (("task=pick_place",), ("task=metaworld", "task.env=metaworld/reach-v3")):
        ft = _compose(*task, "stage=finetune").stage
        assert ft.terminate_on_success is True and ft.success_reward == 1.0
    hop = _compose("task=hopper_medium", "stage=finetune").stage
    assert hop.terminate_on_success is False and hop.success_reward is None
    # where the noise goes and the Gaussian's starting std are a task's to choose too
    own = _compose("task=pick_place", "+task.finetune.noise_steps=1", "+task.finetune.gaussian_init_std=0.5")
    assert (own.stage.finetune.noise_steps, own.stage.finetune.gaussian_init_std) == (1, 0.5)
    assert _compose("task=pick_place", "stage=finetune").stage.noise_steps is None


@pytest.mark.parametrize("override", ["stage.pretrain.grad_steps=3x", "stage.pretrain.stepz=3",
                                      "stage.finetune.clip_coef=abc"])
def test_bad_names_and_types_stop_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        _compose("stage=pipeline", override)


def test_a_misspelt_task_finetune_key_is_a_user_error():
    from agents.stages import validate_config

    cfg = _compose("task=pick_place", "stage=pipeline", "+task.finetune.clip_cof=0.1")
    with pytest.raises(UserError, match="clip_cof"):
        validate_config(cfg)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_no_stage_yaml_repeats_a_dataclass_default(name):
    text = yaml.safe_load((ROOT / "configs" / "stage" / f"{name}.yaml").read_text())
    fields = {f.name: f for f in dataclasses.fields(SCHEMAS[name])}
    assert text["defaults"][0] == f"/schema/{name}@_here_"
    for key, value in text.items():
        if key in ("defaults", "name"):
            continue
        assert key in fields, key
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert value != default, f"configs/stage/{name}.yaml repeats the default of {key}"


def test_the_hopper_1m_preset_is_the_reported_runs_settings_and_reaches_every_stage():
    """``+experiment=hopper_1m`` sets exactly the settings of the reported 1M run (so the preset cannot drift from
    the figures that justify it), in the finetune stage and the pipeline alike, and the command line still wins."""
    from agents.finetune_config import FinetuneConfig
    from agents.stages import validate_config

    rec = json.loads((ROOT / "bench/results/hopper_1m_widedec/finetune_hopper_medium.json").read_text())
    reported = rec["config"]["variants"]["widedec"]
    preset = yaml.safe_load((ROOT / "configs/experiment/hopper_1m.yaml").read_text())["task"]["finetune"]
    assert preset == {**reported, "total_env_steps": rec["config"]["env_steps"]}
    ft = _compose("+experiment=hopper_1m", "stage=finetune")
    assert ft.task.name == "hopper_medium"
    assert all(ft.stage[k] == v for k, v in preset.items())
    pipe = _compose("+experiment=hopper_1m")
    validate_config(pipe)
    assert all(pipe.stage.finetune[k] == v for k, v in preset.items())
    assert _compose("+experiment=hopper_1m", "stage=finetune", "stage.clip_coef=0.05").stage.clip_coef == 0.05
    # the schedule it asks for: wide bounds for 40% of the run, [0.1, 0.2] from 80% on, a constant lr
    cfg = FinetuneConfig.from_dict({k: ft.stage[k] for k in preset if k != "total_env_steps"})
    assert cfg.noise_bounds(0, 100) == cfg.noise_bounds(39, 100) == (0.6, 1.2)
    for it in (80, 99):
        assert cfg.noise_bounds(it, 100) == pytest.approx((0.1, 0.2))
    assert cfg.noise_bounds(60, 100) == pytest.approx((0.35, 0.7))
    assert cfg.schedule_iters(100)[:2] == (40, 40) and cfg.lr_schedule == "constant"
