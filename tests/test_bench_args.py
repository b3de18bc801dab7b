"""bench.latency, bench.scaling and bench.pretrain: a user's mistake is one line before anything is measured or
trained, and results go to --out (never over bench/results when another folder is given)."""

from __future__ import annotations

import json

import pytest


def _one_line(e, capsys) -> str:
    """The error line of a refused command: argparse's last stderr line (exit 2), or the SystemExit text."""
    if e.value.code == 2:
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert ": error: " in line
        return line
    assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code)
    return str(e.value.code)


def _nothing(*a, **k):
    raise AssertionError("measured or trained before the arguments were checked")


def test_latency_refuses_bad_arguments_before_measuring(tmp_path, monkeypatch, capsys):
    import torch

    import bench.latency as bl

    monkeypatch.setattr(bl, "latency_rows", _nothing)
    monkeypatch.setattr(bl, "rollout_rows", _nothing)
    (tmp_path / "afile").write_text("mine")
    cases = [
        (["--ks", "0"], "--ks must be >= 1, got 0"),  # was a ZeroDivisionError after measuring
        (["--ks", "1", "-2"], "--ks must be >= 1"),
        (["--batches", "-1"], "--batches must be >= 1"),
        (["--num-envs", "0"], "--num-envs must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--rollout-env", "Hoper-v5"], "--rollout-env: unknown environment name 'Hoper-v5'"),
        (["--rollout-device", "gpu"], "--rollout-device 'gpu': not a torch device"),
        (["--out", str(tmp_path / "afile")], "is a file, not a folder"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--rollout-device", "cuda"], "CUDA is not available"))
    for args, why in cases:
        with pytest.raises(SystemExit) as e:
            bl.main(["--budget", "small", "--out", str(tmp_path / "o"), *args])
        assert why in _one_line(e, capsys), args
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "o").exists()
    with pytest.raises(AssertionError, match="measured"):  # good arguments get as far as measuring
        bl.main(["--budget", "small", "--ks", "1", "--batches", "1", "--num-envs", "1", "--rollout-env",
                 "Hopper-v5", "--out", str(tmp_path / "o")])


def test_scaling_refuses_bad_arguments_before_the_first_run(tmp_path, monkeypatch, capsys):
    import bench.scaling as bs
    import envs.collect

    monkeypatch.setattr(envs.collect, "ensure_demos", _nothing)
    monkeypatch.setattr(bs, "_launch", _nothing)
    (tmp_path / "afile").write_text("mine")
    for args, why in [(["--steps", "-1"], "--steps must be >= 1, got -1"),
                      (["--steps", "0"], "--steps must be >= 1"),
                      (["--batch-size", "0"], "--batch-size must be >= 1"),
                      (["--repeats", "0"], "--repeats must be >= 1"),  # was an IndexError after the runs
                      (["--ft-envs", "0"], "--ft-envs must be >= 1"),
                      (["--ft-iterations", "-1"], "--ft-iterations must be >= 0"),
                      (["--out", str(tmp_path / "afile")], "is a file, not a folder")]:
        with pytest.raises(SystemExit) as e:
            bs.main(["--procs", "1", "--out", str(tmp_path / "o"), *args])
        assert why in _one_line(e, capsys), args
    assert (tmp_path / "afile").read_text() == "mine"


def test_pretrain_writes_under_out_and_refuses_a_file_out_before_training(tmp_path, monkeypatch, capsys):
    import bench.pretrain as bp
    from bench.common import RESULTS

    monkeypatch.setattr(bp, "run_task", _nothing)
    (tmp_path / "afile").write_text("mine")
    for args, why in [(["--out", str(tmp_path / "afile")], "is a file, not a folder"),
                      (["--seeds", "-1"], "--seeds must be distinct and >= 0")]:
        with pytest.raises(SystemExit) as e:
            bp.main(["--task", "pick_place", "--out", str(tmp_path / "o"), *args])
        assert why in _one_line(e, capsys), args

    def fake_task(name, b, seed):
        row = {"task": name, "method": "ReFlow", "steps": 4, "seed": seed, "success_rate": 0.5, "return_mean": 1.0,
               "latency_us_per_call": 10.0, "latency_ratio": 1.0, "cpu_latency_ratio": 1.0}
        return [row], {"demo_episodes": 1, "demo_steps": 10, "demo_return_mean": 1.0}

    monkeypatch.setattr(bp, "run_task", fake_task)
    committed = RESULTS / "pretrain_pick_place.json"
    before = committed.read_bytes() if committed.exists() else None
    path = bp.main(["--task", "pick_place", "--seeds", "0", "--out", str(tmp_path / "o")])
    assert path == tmp_path / "o" / "pretrain_pick_place.json"
    assert json.loads(path.read_text())["rows"][0]["method"] == "ReFlow"
    assert (tmp_path / "o" / "pretrain_pick_place.md").exists() and (tmp_path / "o" / "pretrain_pick_place.png").exists()
    assert (committed.read_bytes() if committed.exists() else None) == before


@pytest.mark.parametrize("module,option,extra", [("envs_throughput", "--out-dir", []),
                                                 ("mw_screen", "--out", ["--tasks", "push-v3"]),
                                                 ("robosuite", "--out", [])])
def test_the_other_benchmarks_refuse_a_file_out_before_measuring(module, option, extra, tmp_path, monkeypatch,
                                                                 capsys):
    import importlib

    bench = importlib.import_module(f"bench.{module}")
    for name in ("run", "_screen"):  # what measures or trains, where the module has it
        if hasattr(bench, name):
            monkeypatch.setattr(bench, name, _nothing)
    monkeypatch.setattr("multiprocessing.get_context", _nothing)
    (tmp_path / "f").write_text("a user's file")
    with pytest.raises(SystemExit) as e:
        bench.main([option, str(tmp_path / "f"), *extra])
    assert "is a file, not a folder" in _one_line(e, capsys)
    assert (tmp_path / "f").read_text() == "a user's file"
