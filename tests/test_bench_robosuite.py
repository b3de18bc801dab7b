"""bench.robosuite's table from per-task bench.finetune files (synthetic; no robosuite needed): success before
and after with Wilson intervals over episodes (pooled over seeds after fine-tuning)."""

import json

import pytest


def test_robosuite_table_pools_seeds_with_wilson_intervals(tmp_path):
    from bench import robosuite
    from bench.stats import wilson_interval
    from envs.hdf5 import Episode, write_demos

    work = tmp_path / "robosuite"
    work.mkdir()
    demos = write_demos(tmp_path / "d.hdf5", [Episode([[0.0]], [[0.1]], [1.0])], {"env_name": "Lift", "type": 1},
                        meta={"num_demos": 1, "noise": 0.3, "success_rate": 0.7})
    curves = [{"seed": s, "env_steps": 1200, "wall_s": 10.0, "curve": [
        {"env_steps": 0, "return": 5.0, "success": ini}, {"env_steps": 1200, "return": 9.0, "success": fin}]}
        for s, ini, fin in ((0, 0.5, 0.75), (1, 0.25, 0.25))]
    record = {"command": "python -m bench.finetune --task robosuite_lift", "wall_s": 30.0,
              "config": {"dataset": str(demos), "pretrain_steps": 100, "pretrain_wall_s": {"reflow": 5.0},
                         "eval": {"eval_episodes": 4}}}
    (work / "finetune_robosuite_lift.json").write_text(json.dumps(record))
    (work / "finetune_robosuite_lift_curves.json").write_text(json.dumps(curves))
    robosuite.main(["--tasks", "Lift", "--reuse", "Lift", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "robosuite.json").read_text())["rows"][0]
    assert row["success_before"] == 0.375 and row["before_per_seed"] == "0.50 0.25"
    assert row["success_after"] == 0.5 and row["after_per_seed"] == "0.75 0.25"
    assert row["success_before_ci"] == pytest.approx(list(wilson_interval(3, 8)))
    assert row["success_after_ci"] == pytest.approx(list(wilson_interval(4, 8)))
    assert row["demos"] == 1 and row["expert_success"] == 0.7 and row["return_after"] == 9.0
    md = (tmp_path / "robosuite.md").read_text()
    assert "were read from the files of the earlier command" in md and (tmp_path / "robosuite.png").exists()
