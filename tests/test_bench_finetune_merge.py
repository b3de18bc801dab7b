"""bench.finetune --merge: an earlier run's rows join only when its settings equal this run's."""

import json
import os

import pytest

from bench.finetune import _load_merge


def _write(tmp_path, cfg, rows):
    p = tmp_path / "finetune_x.json"
    p.write_text(json.dumps({"name": "finetune_x", "config": cfg, "rows": rows, "command": "python -m bench.finetune ...",
                             "machine": "m", "date": "d", "wall_s": 1.0}))
    (tmp_path / "finetune_x_curves.json").write_text(json.dumps([{"method": "reflow", "seed": 0, "curve": []}]))
    return str(p)


def test_merge_checks_settings_and_clashes(tmp_path):
    mine = {"task": "pick_place", "env_steps": 100, "eval": {"eval_every": 2, "seed": 5},
            "dataset": "demos.hdf5", "demo_return_mean": 1.5}
    earlier = {**mine, "dataset": "/elsewhere/data/demos.hdf5", "seeds": [0, 1]}  # same file, other checkout
    path = _write(tmp_path, earlier, [{"method": "reflow", "variant": "default", "seed": 0}])
    out = _load_merge(path, mine, [{"method": "gaussian", "variant": "default", "seed": 0}])
    assert out["methods"] == ["reflow"] and len(out["rows"]) == 1 and len(out["runs"]) == 1
    with pytest.raises(SystemExit, match="in both"):
        _load_merge(path, mine, [{"method": "reflow", "variant": "default", "seed": 0}])
    with pytest.raises(SystemExit, match=r"differ .*\['env_steps'\]"):
        _load_merge(path, {**mine, "env_steps": 200}, [])
    with pytest.raises(SystemExit, match="eval"):
        _load_merge(path, {**mine, "eval": {"eval_every": 3, "seed": 5}}, [])
    with pytest.raises(SystemExit, match="no such file"):
        _load_merge(str(tmp_path / "missing.json"), mine, [])
    (tmp_path / "finetune_x_curves.json").unlink()
    with pytest.raises(SystemExit, match="cannot read its _curves.json"):
        _load_merge(path, mine, [])


def test_variant_values_parse_as_numbers_yaml_would_leave_as_strings():
    from bench.finetune import _parse_variant

    name, over = _parse_variant("lr1:actor_lr=1e-5,clip_coef=0.05,denoise_steps=2,lr_schedule=linear,async_envs=true")
    assert name == "lr1" and over == {"actor_lr": 1e-5, "clip_coef": 0.05, "denoise_steps": 2, "lr_schedule": "linear",
                                      "async_envs": True}
    assert isinstance(over["actor_lr"], float)


def test_merge_checks_exec_horizon_and_reads_older_files_as_the_task_default(tmp_path):
    mine = {"task": "hopper_medium", "env_steps": 100, "exec_horizon": 4}
    older = _write(tmp_path, {"task": "hopper_medium", "env_steps": 100},  # written before Te was recorded
                   [{"method": "reflow", "variant": "default", "seed": 0}])
    assert _load_merge(older, mine, [], {"exec_horizon": 4})["methods"] == ["reflow"]
    with pytest.raises(SystemExit, match=r"\['exec_horizon'\]"):  # a Te = 2 run must not join Te = 4 rows
        _load_merge(older, {**mine, "exec_horizon": 2}, [], {"exec_horizon": 4})
    newer = _write(tmp_path, {**mine, "exec_horizon": 2}, [{"method": "reflow", "variant": "default", "seed": 0}])
    with pytest.raises(SystemExit, match=r"\['exec_horizon'\]"):
        _load_merge(newer, mine, [], {"exec_horizon": 4})


def test_exec_horizon_out_of_range_is_one_line(capsys):
    from bench.finetune import main

    with pytest.raises(SystemExit, match=r"--exec-horizon must be in \[1, 4\]"):
        main(["--task", "hopper_medium", "--exec-horizon", "5"])


def test_a_variant_that_changes_the_iteration_size_keeps_its_evaluation_points():
    from bench.finetune import eval_interval

    hopper = {"n_steps": 250, "num_envs": 16}  # 16k env steps per iteration at Te = 4
    assert eval_interval(hopper, 1_000_000, 4, 10) == 6  # 63 iterations
    # Te = 2 with n_steps 500 has the same 16k env steps per iteration, so the same interval
    assert eval_interval({**hopper, "n_steps": 500}, 1_000_000, 2, 10) == 6
    # twice the env steps per iteration: half the iterations between points, about as many points
    assert eval_interval({**hopper, "n_steps": 500}, 1_000_000, 4, 10) == 3
    assert eval_interval(hopper, 1000, 4, 10) == 1


def test_merge_lists_a_variant_made_default_as_default_and_leaves_out_other_settings(tmp_path):
    """A setting tried as a variant and then made the task's default: its earlier runs join as this run's
    default; the earlier default runs (now other settings) are left out, never listed under the new name."""
    old_defaults, sparse = {"clip_coef": 0.05}, {"terminate_on_success": True}
    mine = {"task": "pick_place", "env_steps": 100, "finetune_defaults": {**old_defaults, **sparse}}
    rows = [{"method": m, "variant": v, "seed": 0} for m in ("reflow", "gaussian") for v in ("default", "sparse")]
    path = _write(tmp_path, {"task": "pick_place", "env_steps": 100, "finetune_defaults": old_defaults,
                             "variants": {"sparse": sparse}}, rows)
    curves = [{**r, "curve": []} for r in rows]
    (tmp_path / "finetune_x_curves.json").write_text(json.dumps(curves))
    hisig = {"sigma_max": 0.4}
    out = _load_merge(path, mine, [{"method": "reflow", "variant": "hisig", "seed": 0}], None, {"hisig": hisig})
    assert sorted((r["method"], r["variant"]) for r in out["rows"]) == [("gaussian", "default"), ("reflow", "default")]
    assert sorted((r["method"], r["variant"]) for r in out["runs"]) == [("gaussian", "default"), ("reflow", "default")]
    assert "'sparse' ran with this run's 'default'" in out["relabel_note"] and "['default'] ran with settings that are none" in out["relabel_note"]
    # the earlier sparse runs are this run's default: running the default again clashes
    with pytest.raises(SystemExit, match="in both"):
        _load_merge(path, mine, [{"method": "reflow", "variant": "default", "seed": 0}], None, {"default": {}})
    # a same-named variant with other values is not merged under that name
    mine_other = {**mine, "finetune_defaults": {"clip_coef": 0.1}}
    with pytest.raises(SystemExit, match="finetune_defaults"):
        _load_merge(path, mine_other, [], None, {"sparse": {"terminate_on_success": False}})
    # on equal defaults every earlier variant joins under its own name, as before
    same = _load_merge(path, {**mine, "finetune_defaults": old_defaults}, [], None, {"hisig": hisig})
    assert sorted({r["variant"] for r in same["rows"]}) == ["default", "sparse"] and same["relabel_note"] == ""


def test_finished_runs_are_saved_at_once_and_reused_only_by_the_same_command(tmp_path, monkeypatch, capsys):
    import bench.finetune as bf

    calls = []

    def fake(job, state_path=None):
        calls.append(job)
        return {"method": job[0], "variant": job[1], "seed": job[3], "diagnostics": [], "wall_s": 2.0,
                "eval_s": 0.0, "env_steps": 1600, "curve": [{"env_steps": 1600, "return": 1.0, "success": 0.5}]}

    monkeypatch.setattr(bf, "_finetune", fake)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights 1")
    runs = str(tmp_path / "runs")
    job = ("reflow", "default", {"clip_coef": 0.05}, 0, "pick_place", str(ckpt), 1600)
    first = bf._finetune_saved((job, runs, "commit1", True))
    out = capsys.readouterr().out  # the log line names the task's score: pick-place's success rate
    assert "final success 0.500" in out and "saved" in out and len(list((tmp_path / "runs").glob("*.json"))) == 1
    again = bf._finetune_saved((job, runs, "commit1", True))
    assert len(calls) == 1 and again.pop("reused") is True and again == first
    assert "reused" in capsys.readouterr().out
    # whatever decides the run makes a new one: its settings, the pretrained weights, the code; --no-reuse reruns
    bf._finetune_saved(((*job[:2], {"clip_coef": 0.1}, *job[3:]), runs, "commit1", True))
    bf._finetune_saved((job, runs, "commit2", True))
    bf._finetune_saved((job, runs, "commit2", False))
    (ckpt / "model.safetensors").write_bytes(b"weights 2")
    bf._finetune_saved((job, runs, "commit1", True))
    (ckpt / "config.yaml").write_text("horizons: {exec_horizon: 4}\n")  # same weights pretrained for another Te
    bf._finetune_saved((job, runs, "commit1", True))
    assert len(calls) == 6

    def killed(job, state_path=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(bf, "_finetune", killed)
    with pytest.raises(KeyboardInterrupt):
        bf._finetune_saved(((*job[:3], 7, *job[4:]), runs, "commit1", True))
    assert not list((tmp_path / "runs").glob("*seed7*"))  # a run that did not finish leaves nothing behind


def test_sb3_runs_are_saved_and_reused_like_the_fine_tuning_runs(tmp_path, monkeypatch, capsys):
    import bench.finetune as bf

    calls = []

    def fake(args):
        calls.append(args)
        return {"method": "sb3_ppo", "variant": "default", "seed": args[0], "wall_s": 1.0, "eval_s": 0.0,
                "env_steps": 2048, "curve": [{"env_steps": 2048, "return": 5.0, "success": 0.0}]}

    monkeypatch.setattr(bf, "_sb3_ppo", fake)
    runs = str(tmp_path / "runs")
    a = (0, "hopper_medium", 2048, 1024, 5, 100_000, 4)
    first = bf._sb3_saved((a, runs, "commit1", True))
    assert "final return 5.0" in capsys.readouterr().out  # Hopper's score is its return (its success is 0.0)
    again = bf._sb3_saved((a, runs, "commit1", True))
    assert len(calls) == 1 and again.pop("reused") is True and again == first
    assert [p.name.split("-")[:3] for p in (tmp_path / "runs").glob("*.json")] == [["sb3_ppo", "default", "seed0"]]
    bf._sb3_saved(((0, "hopper_medium", 2048, 1024, 10, 100_000, 4), runs, "commit1", True))  # other evaluation
    bf._sb3_saved((a, runs, "commit2", True))
    bf._sb3_saved((a, runs, "commit1", False))
    assert len(calls) == 4


def test_code_version_names_the_commit_and_uncommitted_changes(tmp_path):
    """Saved runs are keyed by it: any change to the source, committed or not, tracked or new, gives another
    version; outside git (an unpacked copy) the source files' contents decide it; prose does not."""
    import shutil
    import subprocess

    from bench.finetune import code_version

    v = code_version()
    assert v.startswith("files:") or len(v.split("+")[0]) == 40
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "a.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("notes\n")
    plain = code_version(tmp_path)  # not a git checkout
    assert plain.startswith("files:")
    (tmp_path / "README.md").write_text("other notes\n")
    assert code_version(tmp_path) == plain
    (tmp_path / "agents" / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) != plain
    if shutil.which("git") is None:
        return
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "c"]):
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True, env=env)
    clean = code_version(tmp_path)
    assert len(clean) == 40
    (tmp_path / "agents" / "b.py").write_text("y = 1\n")  # a new module, not yet added to git
    untracked = code_version(tmp_path)
    assert untracked.startswith(clean + "+")
    (tmp_path / "agents" / "a.py").write_text("x = 3\n")
    assert code_version(tmp_path) not in (clean, untracked)


def test_rerunning_a_benchmark_command_reuses_its_finished_runs(tmp_path):
    from bench.finetune import main

    cmd = ["--task", "pick_place", "--env-steps", "32", "--pretrain-steps", "10", "--seeds", "0",
           "--methods", "gaussian", "--skip-default", "--variant",
           "tiny:n_steps=8,num_envs=2,eval_num_envs=2,minibatch_size=16,update_epochs=1,critic_warmup_iters=0",
           "--eval-episodes", "2", "--eval-points", "1", "--workers", "1", "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work")]
    main(cmd)
    saved = list((tmp_path / "work" / "pick_place" / "runs").glob("gaussian-tiny-seed0-*.json"))
    first = json.loads((tmp_path / "out" / "finetune_pick_place.json").read_text())
    assert len(saved) == 1 and "reused" not in (tmp_path / "out" / "finetune_pick_place.md").read_text()
    main(cmd)
    md = (tmp_path / "out" / "finetune_pick_place.md").read_text()
    assert "1 of 1 runs were reused" in md
    again = json.loads((tmp_path / "out" / "finetune_pick_place.json").read_text())
    assert again["rows"] == first["rows"]


def _refused_before_anything_runs(monkeypatch, capsys, args, tmp_path):
    """The one error line bench.finetune stops with (exit 2 or an ``error:`` SystemExit); fails if it got as
    far as the demos (collected before pretraining and every run)."""
    import envs.collect

    def no_demos(*a, **k):
        raise AssertionError("reached the demos: the arguments were not checked first")

    monkeypatch.setattr(envs.collect, "ensure_demos", no_demos)
    from bench.finetune import main

    with pytest.raises(SystemExit) as e:
        main(["--task", "pick_place", "--methods", "reflow", "--workers", "1", "--work", str(tmp_path / "w"),
              "--out", str(tmp_path / "out"), *args])
    if e.value.code == 2:  # argparse: the usage, then one "prog: error: ..." line
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert ": error: " in line
    else:
        line = str(e.value.code)
        assert line.startswith("error: ") and "\n" not in line
    return line


@pytest.mark.parametrize("variant, why", [
    ("lowsig:foo=1", "unknown setting 'foo'"),
    ("lowsig:sigma_mn=0.1", "did you mean sigma_min"),
    ("lowsig:steps=2", "renamed: denoise_steps"),
    ("lowsig:sigma_min", "'sigma_min' is not key=value"),
    ("lowsig:clip_coef=abc", "clip_coef='abc': expected float"),
    ("lowsig:clip_coef=-1", "clip_coef must be > 0"),
    ("lowsig:sigma_min=0.5", "sigma_min <= sigma_max"),  # against the task's sigma_max 0.4: the whole settings
    ("lowsig:terminate_on_success=2", "expected bool"),
    ("lowsig", "no ':' after the name"),
    ("lowsig:", "an empty setting"),
    ("default:clip_coef=0.1", "'default' is the name"),
    ("a/b:clip_coef=0.1", "letters, digits"),
    ("lowsig:seed=3", "--seeds"),
])
def test_a_bad_variant_is_refused_in_one_line_naming_it_before_anything_runs(variant, why, tmp_path, monkeypatch,
                                                                            capsys):
    line = _refused_before_anything_runs(monkeypatch, capsys, ["--variant", variant], tmp_path)
    assert f"--variant {variant!r}" in line and why in line


def test_good_variants_pass_the_check_and_a_repeated_name_does_not(tmp_path, monkeypatch, capsys):
    import envs.collect
    from bench.finetune import main

    def demos(*a, **k):
        raise RuntimeError("demos")

    monkeypatch.setattr(envs.collect, "ensure_demos", demos)
    good = ["lr1:actor_lr=1e-5,clip_coef=0.05,denoise_steps=2,lr_schedule=linear,async_envs=true",
            "wide:clip_action=2.0,success_reward=null", "hisig:sigma_min=0.2,sigma_max=0.6,sigma_max_final=0.3"]
    with pytest.raises(RuntimeError, match="demos"):  # checked, then on to the demos
        main(["--task", "pick_place", "--methods", "reflow", "fpo", "--workers", "1", "--work", str(tmp_path / "w"),
              "--out", str(tmp_path / "out"), *[a for v in good for a in ("--variant", v)]])
    line = _refused_before_anything_runs(monkeypatch, capsys, ["--variant", "a:clip_coef=0.1", "--variant",
                                                               "a:clip_coef=0.2"], tmp_path)
    assert "'a' is given twice" in line


@pytest.mark.parametrize("args, why", [
    (["--seeds", "-1"], "--seeds must be distinct and >= 0"),
    (["--seeds", "0", "0"], "--seeds must be distinct"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--pretrain-steps", "-3"], "--pretrain-steps must be >= 1"),
    (["--pretrain-steps", "0"], "--pretrain-steps must be >= 1, got 0"),  # 0 is not "the budget's"
    (["--env-steps", "-5"], "--env-steps must be >= 1"),
    (["--env-steps", "0"], "--env-steps must be >= 1, got 0"),
    (["--eval-episodes", "0"], "--eval-episodes must be >= 1"),
    (["--eval-points", "0"], "--eval-points must be >= 1"),
    (["--eval-seed", "-1"], "--eval-seed must be >= 0"),
])
def test_bad_counts_and_seeds_are_refused_before_anything_runs(args, why, tmp_path, monkeypatch, capsys):
    assert why in _refused_before_anything_runs(monkeypatch, capsys, args, tmp_path)


def test_out_and_merge_files_are_checked_before_anything_runs_and_the_merged_file_is_never_rewritten(
        tmp_path, monkeypatch, capsys):
    import shutil

    from bench.common import RESULTS

    (tmp_path / "afile").write_text("mine")
    for out in ("afile", "afile/sub"):
        line = _refused_before_anything_runs(monkeypatch, capsys, ["--out", str(tmp_path / out)], tmp_path)
        assert "is a file, not a folder" in line
    assert (tmp_path / "afile").read_text() == "mine"
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "list.json").write_text("[1, 2]")
    for merge, why in ((RESULTS / "latency.json", "not a bench.finetune result (its name is 'latency')"),
                       (tmp_path / "empty.json", "not a bench.finetune result"),
                       (tmp_path / "list.json", "not a bench.finetune result (it holds an array)"),
                       (RESULTS / "finetune_pick_place_curves.json", "not a bench.finetune result"),
                       (tmp_path / "text.json", "not a JSON file"), (tmp_path / "nope.json", "no such file")):
        line = _refused_before_anything_runs(monkeypatch, capsys, ["--merge", str(merge)], tmp_path)
        assert f"--merge {merge}: {why}" in line
    # --merge of the file this run would write (its --out is the merged file's folder): refused, left as it is
    out = tmp_path / "out"
    out.mkdir()
    for f in ("finetune_pick_place.json", "finetune_pick_place_curves.json"):
        shutil.copy(RESULTS / f, out / f)
    before = (out / "finetune_pick_place.json").read_bytes()
    line = _refused_before_anything_runs(monkeypatch, capsys, ["--merge", str(out / "finetune_pick_place.json")],
                                         tmp_path)
    assert "is the file this run would write" in line
    assert (out / "finetune_pick_place.json").read_bytes() == before


def test_a_run_cut_off_mid_way_resumes_where_it_stopped_with_the_uninterrupted_results(
        tiny_pick_place_checkpoint, tmp_path, monkeypatch, capsys):
    """A benchmark run killed after its second iteration is resumed by a rerun of the command from its saved
    state: only the missing iteration runs, and the curve and diagnostics equal an uninterrupted run's. The state
    is removed once the run is saved; --no-reuse starts over."""
    import bench.finetune as bf
    from agents.finetune import ReinFlowPPO

    tiny = {"n_steps": 8, "num_envs": 2, "eval_num_envs": 2, "minibatch_size": 16, "update_epochs": 1,
            "critic_warmup_iters": 0, "eval_every": 1, "eval_episodes": 2}
    job = ("reflow", "tiny", tiny, 0, "pick_place", tiny_pick_place_checkpoint, 96)  # 3 iterations of 32
    whole = bf._finetune(job)
    iterations, real = [], ReinFlowPPO.train_iteration

    def counted(self, limit=None):
        iterations.append(self.iteration)
        if limit is not None and len(iterations) > limit:
            raise KeyboardInterrupt  # the machine goes down during the third iteration
        return real(self)

    monkeypatch.setattr(ReinFlowPPO, "train_iteration", lambda self: counted(self, limit=2))
    runs = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        bf._finetune_saved((job, str(runs), "c1", True))
    [state] = runs.glob("*.state.pt")
    assert not list(runs.glob("*.json"))  # not finished, so not a result
    iterations.clear()
    monkeypatch.setattr(ReinFlowPPO, "train_iteration", lambda self: counted(self))
    run = bf._finetune_saved((job, str(runs), "c1", True))
    assert iterations == [2] and run["resumed_at"] == 64 and "resumed at 64 env steps" in capsys.readouterr().out
    strip = [{k: v for k, v in p.items() if k != "wall_s"} for p in whole["curve"]]
    assert [{k: v for k, v in p.items() if k != "wall_s"} for p in run["curve"]] == strip
    assert run["diagnostics"] == whole["diagnostics"] and run["env_steps"] == whole["env_steps"] == 96
    assert run["wall_s"] >= run["curve"][-2]["wall_s"] > 0  # the parts that ran, summed
    assert not state.exists() and len(list(runs.glob("*.json"))) == 1
    # a state left by a cut-off run is not resumed with --no-reuse: the run starts over
    monkeypatch.setattr(ReinFlowPPO, "train_iteration", lambda self: counted(self, limit=1))
    with pytest.raises(KeyboardInterrupt):
        bf._finetune_saved((job, str(runs), "c2", True))
    iterations.clear()
    monkeypatch.setattr(ReinFlowPPO, "train_iteration", lambda self: counted(self))
    fresh = bf._finetune_saved((job, str(runs), "c2", False))
    assert iterations == [0, 1, 2] and "resumed_at" not in fresh and not list(runs.glob("*.state.pt"))
