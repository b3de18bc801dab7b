"""Checkpoints never lose work: kills injected at every point of the save sequence, fallback past a broken
``last``, integrity checks, the run lock, disk handling, atomic run files (agents/checkpoint.py, which
re-exports agents/checkpoint_save.py, agents/checkpoint_load.py and agents/runfiles.py)."""

import errno
import os
import shutil
import signal
import time

import pytest
import torch

import agents.checkpoint_save as S
import agents.runfiles as R
from agents.checkpoint import (
    CheckpointError,
    RunLock,
    RunLockedError,
    atomic_write_json,
    load_checkpoint,
    open_checkpoints,
    read_json,
    save_checkpoint,
)


def _model(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(4, 3)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def _save(root, step, value, **kw):
    return save_checkpoint(root, step, {"kind": "test"}, _model(value), {"name": "env"},
                           {"value": float(value), "t": torch.full((3,), float(value))},
                           {"aux": _model(-value)}, **kw)


def _value(ck) -> float:
    """The checkpoint's value, after checking that all its files agree on it."""
    v = ck["training_state"]["value"]
    assert all(torch.all(t == v) for t in ck["model"].values())
    assert all(torch.all(t == -v) for t in ck["extras"]["aux"].values())
    return v


def _points(scenario, root):
    """The names of the fault points of one save (recorded on a throwaway copy)."""
    seen = []
    S._fault_hook = seen.append
    try:
        _do(scenario, root)
    finally:
        S._fault_hook = None
    return seen


def _do(scenario, root):
    if scenario == "resave":  # the same step saved again (end of a run, Ctrl-C at a save step)
        _save(root, 2, 3.0, tags=("last", "best"))
    else:  # the next step, with pruning at keep_last=2
        _save(root, 3, 3.0, keep_last=2)


def _setup(root):
    _save(root, 1, 1.0)
    _save(root, 2, 2.0)


@pytest.mark.parametrize("scenario", ["resave", "new_step"])
def test_a_kill_at_any_point_of_a_save_never_loses_a_resumable_checkpoint(tmp_path, scenario, capsys):
    _setup(tmp_path / "probe")
    points = _points(scenario, tmp_path / "probe")
    assert {"wrote model.safetensors", "wrote manifest.json", "renamed", "tagged last", "pruned"} <= set(points)
    for i, point in enumerate(points):
        root = tmp_path / f"k{i}" / "checkpoints"
        _setup(root)
        pid = os.fork()
        if pid == 0:  # the child dies (like SIGKILL: no cleanup, no finally) at this point of the save
            try:
                S._fault_hook = lambda p, point=point: os._exit(9) if p == point else None
                _do(scenario, root)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 9, point
        ck = open_checkpoints(root)  # what the next run does: clean temporaries, resolve, verify
        value = _value(ck)
        before_swap = points.index("tagged last")
        assert value == (2.0 if i < before_swap else 3.0), (point, value)
        assert not [p for p in root.iterdir() if p.name.startswith(".")], point  # temporaries removed
        assert _value(load_checkpoint(root / "last")) == value
        if scenario == "resave":
            assert ck["config"]["step"] == 2
    assert "fallback" not in capsys.readouterr().err  # `last` was never broken


def test_resave_and_pruning_keep_the_promised_checkpoints(tmp_path):
    seen = {}

    def count(point):
        if point == "wrote config.yaml":  # while writing: the older ones were pruned first (room for keep_last)
            seen[len(seen)] = len(S._step_dirs(tmp_path))

    S._fault_hook = count
    try:
        for step in range(1, 7):
            _save(tmp_path, step, float(step), keep_last=3)
    finally:
        S._fault_hook = None
    assert max(seen.values()) <= 2
    assert [p.name for _, _, p in S._step_dirs(tmp_path)] == [f"step_00000000{i}" for i in (4, 5, 6)]
    again = _save(tmp_path, 6, 60.0, keep_last=3)
    assert again.name == "step_000000006-1" and os.readlink(tmp_path / "last") == again.name
    assert [p.name for _, _, p in S._step_dirs(tmp_path)] == ["step_000000004", "step_000000005", again.name]
    assert _value(load_checkpoint(tmp_path)) == 60.0
    assert again.stat().st_mode & 0o777 == 0o777 & ~R._UMASK  # the umask's mode, not mkdtemp's 0700


@pytest.mark.parametrize("broken", ["dangling", "missing", "corrupt"])
def test_a_broken_last_falls_back_to_the_newest_intact_step_with_one_line(tmp_path, broken, capsys):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(root, step, float(step))
    if broken == "dangling":
        shutil.rmtree(root / "step_000000003")
    elif broken == "missing":
        (root / "last").unlink()
    else:
        with open(root / "step_000000003" / "model.safetensors", "r+b") as f:
            f.seek(200)
            f.write(b"\xff\xfe")
    want = 2.0 if broken != "missing" else 3.0
    assert _value(load_checkpoint(tmp_path)) == want  # read-only: a run directory, e.g. checkpoint=<run>
    err = capsys.readouterr().err
    assert err.count("checkpoint fallback") == 1 and broken in err
    ck = open_checkpoints(root)
    err = capsys.readouterr().err.strip().splitlines()
    assert _value(ck) == want and ck["config"]["step"] == int(want)
    assert err[-1] == f"resuming from {ck['path']} (step {int(want)})"
    assert os.readlink(root / "last") == f"step_00000000{int(want)}"  # repaired
    if broken == "corrupt":
        assert (root / "corrupt_step_000000003").is_dir()  # kept for inspection, out of the fallback order


def test_only_corrupt_checkpoints_are_an_error_and_resume_false_starts_fresh(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    _save(root, 1, 1.0)
    (root / "step_000000001" / "training_state.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*resume=false"):
        open_checkpoints(root)
    assert open_checkpoints(root, resume=False) is None
    assert "deleting the 1 checkpoints" in capsys.readouterr().err
    assert not list(root.iterdir())


def test_flipped_bytes_in_every_checkpoint_file_are_detected_and_named(tmp_path):
    good = _save(tmp_path / "ck", 1, 1.0)
    files = sorted(p.relative_to(good).as_posix() for p in good.rglob("*") if p.is_file())
    assert files == ["config.yaml", "env_meta.json", "extra/aux.safetensors", "manifest.json",
                     "model.safetensors", "training_state.pt"]
    for i, rel in enumerate(files):
        bad = shutil.copytree(good, tmp_path / f"bad{i}" / good.name)
        f = bad / rel
        data = bytearray(f.read_bytes())
        for k in range(len(data) // 2, min(len(data) // 2 + 8, len(data))):
            data[k] ^= 0xFF
        f.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=rel.replace(".", r"\.")) as err:
            load_checkpoint(bad)
        assert "fall back" in str(err.value) or rel == "training_state.pt", str(err.value)


def test_second_process_on_a_run_dir_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            held = RunLock(tmp_path).acquire()
            os.write(ready_w, b"x")
            time.sleep(60)
            held.release()
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        with pytest.raises(RunLockedError, match=f"in use by process {pid} "):
            RunLock(tmp_path).acquire()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with RunLock(tmp_path) as lock:  # the holder died without releasing: taken over
        assert lock.held
        assert f"took over the stale lock of process {pid}" in capsys.readouterr().err
        with RunLock(tmp_path):  # re-entrant within one process
            pass
    assert (tmp_path / ".lock").read_text() == ""  # released cleanly


def test_disk_space_is_checked_before_a_save_and_write_errors_name_the_checkpoint(tmp_path, monkeypatch):
    first = _save(tmp_path, 1, 1.0)
    monkeypatch.setattr(S.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 100, 100))
    with pytest.raises(CheckpointError, match=rf"not enough disk space to save step 2 in {tmp_path}: about \d+ bytes"):
        _save(tmp_path, 2, 2.0)
    monkeypatch.undo()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(S, "save_file", full)
    with pytest.raises(CheckpointError, match="step 2 .* failed while writing model.safetensors: disk full"):
        _save(tmp_path, 2, 2.0)
    assert os.readlink(tmp_path / "last") == first.name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_temporaries_of_crashed_saves_are_removed_at_the_next_start(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    _save(root, 1, 1.0)
    (root / ".tmp_step_000000002_abc").mkdir()
    (root / ".tmp_step_000000002_abc" / "model.safetensors").write_bytes(b"x" * 1000)
    (root / ".old_step_000000001_123").mkdir()
    (tmp_path / ".history.json.x1.tmp").write_text("[")
    open_checkpoints(root)
    assert "removed 2 temporaries (1000 bytes)" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == ["last", "step_000000001"]
    assert not (tmp_path / ".history.json.x1.tmp").exists()


def test_run_files_are_written_atomically_and_damaged_json_names_the_file(tmp_path, monkeypatch):
    path = atomic_write_json(tmp_path / "history.json", [{"a": 1}])
    assert read_json(path) == [{"a": 1}]

    def crash(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(R.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, [{"a": 2}])
    monkeypatch.undo()
    assert read_json(path) == [{"a": 1}] and [p.name for p in tmp_path.iterdir()] == ["history.json"]
    path.write_text("")
    with pytest.raises(CheckpointError, match="history.json: damaged"):
        read_json(path)
