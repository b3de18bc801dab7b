"""rectified-flow-pytorch as the image benchmark's peer (bench/images_peer.py). Skipped unless the package is
installed (``pip install -e ".[peers]"``)."""

import pytest
import torch

from bench.images_peer import PeerOwnModel, import_peer

rfp, NOTE = import_peer()
pytestmark = pytest.mark.skipif(rfp is None, reason=f"rectified-flow-pytorch: {NOTE}")

SHAPE = (1, 8, 8)
SMALL_UNET = {"dim": 8, "dim_mults": (1, 2)}


def _midpoint(unet, x, steps):
    """K midpoint steps of the package's network on the uniform grid, written out by hand."""
    h = 1.0 / steps
    for k in range(steps):
        t = torch.full((x.shape[0],), k * h)
        x_mid = x + 0.5 * h * unet(x, times=t)
        x = x + h * unet(x_mid, times=t + 0.5 * h)
    return x


def test_own_peer_samples_with_its_midpoint_rule_and_our_value_range():
    torch.manual_seed(0)
    peer = PeerOwnModel(rfp, SHAPE, SMALL_UNET)
    assert peer.nfe_per_step == 2
    x0 = torch.randn(6, *SHAPE)
    with torch.no_grad():
        want = _midpoint(peer.unet, x0, 2)  # the package's [-1, 1] space is ours
    got = peer.generate(x0, 2)
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():  # and not Euler: the two rules differ on a non-straight field
        euler = x0 + 0.5 * peer.unet(x0, times=torch.zeros(6))
        euler = euler + 0.5 * peer.unet(euler, times=torch.full((6,), 0.5))
    assert not torch.allclose(got, euler, atol=1e-4)


def test_own_peer_trains_with_its_trainer_and_samples_from_its_ema(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    images = torch.rand(64, *SHAPE) * 2 - 1
    peer = PeerOwnModel(rfp, SHAPE, SMALL_UNET)
    before = [p.detach().clone() for p in peer.unet.parameters()]
    peer.train(images, steps=12, batch_size=16)
    assert peer.train_s > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, peer.unet.parameters()))
    sampler = peer.sampler()
    assert sampler is not peer.flow  # the trainer's EMA copy samples, as the package's own Trainer.sample does
    x = peer.generate(torch.randn(5, *SHAPE), 4)
    assert x.shape == (5, *SHAPE) and torch.isfinite(x).all()
    assert list(tmp_path.iterdir()) == []  # its checkpoints and sample grids went to a temp dir


def test_peer_only_run_merges_our_rows_from_an_earlier_run_with_the_same_judge(tmp_path):
    """--peer-only trains only the peer's rows and keeps ours from --merge, draw for draw; a merge of another
    budget, seed set, draw count or judge is refused (tests/test_images.py, which needs no peer)."""
    from bench.images import main as bench_images

    common = ["--budget", "tiny", "--seeds", "0", "--cache", str(tmp_path / "c"), "--threads", "1", "--work",
              str(tmp_path / "w")]
    ours = bench_images([*common, "--no-peer", "--out", str(tmp_path / "ours")])
    merged = bench_images([*common, "--peer-only", "--merge", str(tmp_path / "ours" / "images-tiny.json"),
                           "--out", str(tmp_path / "both")])
    impls = {e["impl"] for e in merged["draws"]}
    assert impls == {"-", "flowpolicy", "rectified-flow-pytorch"}
    key = ("model", "steps", "seed", "draw", "fd", "fd_excess", "coverage")
    mine = [[e[k] for k in key] for e in ours["draws"] if e["impl"] == "flowpolicy"]
    assert [[e[k] for k in key] for e in merged["draws"] if e["impl"] == "flowpolicy"] == mine
    assert "merged from" in merged["summary"]["peer"] and merged["summary"]["best_one_step"]["model"]
    # the head-to-head table at every step count the peer ran (tiny: 1 and 4), in the JSON and the Markdown
    assert [c["steps"] for c in merged["summary"]["vs_peer"]] == [1, 4]
    assert "Ours against the peer" in (tmp_path / "both" / "images-tiny.md").read_text()

