"""bench.latency and bench.scaling: a user's mistake is one line before anything is measured or
trained."""

from __future__ import annotations

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
