"""Image generation with the shared flow core: datasets, the FD classifier, training and the run entry point.

Seeded and small: the whole file runs in well under a minute on 2 CPU cores.
"""

import json
import pickle

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

from agents.checkpoint import load_checkpoint, write_manifest
from agents.images import (
    FrechetScorer,
    ImageClassifier,
    ImageData,
    denormalize,
    frechet_distance,
    load_dataset,
    load_digits,
    load_generator,
    load_image_folder,
    load_or_train_classifier,
    normalize,
    run,
    save_checkpoint,
    train_classifier,
)
from agents.images.data import to_uint8
from agents.images.evaluation import HeldOutJudge, accuracy_on, fd_features, heldout_split, train_encoder
from agents.images.trainer import TrainedModel, build_flow, eval_noise, train_base
from bench.images import BUDGETS, paired_target, replicates, t_interval
from bench.images import main as bench_images
from flowpolicy import EMA
from flowpolicy.metrics import precision_recall_coverage


def _stage(**over):
    from agents.config_schema import ImageStage

    stage = OmegaConf.structured(ImageStage)  # what configs/stage/image.yaml composes to
    return OmegaConf.merge(stage, OmegaConf.create(over))


def _cfg(tmp_path, method="rf", **stage_over):
    tiny = {
        "method": method, "grad_steps": 20, "batch_size": 32, "progress": False, "log_every": 5,
        "reflow": {"couplings": 64, "couplings_steps": 4, "grad_steps": 10},
        "distill": {"couplings": 64, "grad_steps": 10, "k": [1, 2]},
        "shortcut": {"max_level": 3},
        "eval": {"denoise_steps": [1, 2], "samples": 64, "straightness_samples": 32, "straightness_steps": 4},
        "classifier": {"grad_steps": 30, "cache_dir": str(tmp_path / "cache")},
        "grid_cols": 8,
    }
    stage = OmegaConf.merge(_stage(), OmegaConf.create(tiny), OmegaConf.create(stage_over))
    return OmegaConf.create({"seed": 0, "device": "cpu", "task": OmegaConf.load("configs/task/digits.yaml"),
                             "stage": stage})


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def classifier(digits):
    model, info = train_classifier(digits, steps=400, seed=0)
    return model, info


# --- data --------------------------------------------------------------------------------------------------


def test_digits_are_8x8_in_unit_range_with_ten_classes(digits):
    assert digits.images.shape == (1797, 1, 8, 8)
    assert digits.images.dtype == torch.float32
    assert float(digits.images.min()) == -1.0 and float(digits.images.max()) == 1.0
    assert digits.labels.shape == (1797,) and set(digits.labels.tolist()) == set(range(10))
    assert digits.num_classes == 10 and digits.image_shape == (1, 8, 8)


def test_normalize_round_trips_pixel_values():
    pixels = np.arange(17, dtype=np.float64)
    x = normalize(pixels, 16.0)
    assert float(x[0]) == -1.0 and float(x[-1]) == 1.0
    assert torch.allclose(denormalize(x) * 16.0, torch.as_tensor(pixels, dtype=torch.float32), atol=1e-6)
    img = normalize(np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16), 255.0)
    assert np.array_equal(to_uint8(img)[0, :, :, 0], np.arange(256, dtype=np.uint8).reshape(16, 16))
    assert float(denormalize(torch.tensor([-3.0, 3.0])).min()) == 0.0  # overshooting samples are clamped


def test_image_folder_loads_pngs_of_any_size_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n, size in (("cats", 3, (10, 14)), ("dogs", 2, (20, 20))):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path, image_size=8, channels=3)
    assert data.images.shape == (5, 3, 8, 8)
    assert data.labels.tolist() == [0, 0, 0, 1, 1] and data.class_names == ["cats", "dogs"]
    assert float(data.images.min()) >= -1.0 and float(data.images.max()) <= 1.0
    gray = load_dataset("folder", tmp_path / "cats", image_size=4, channels=1)  # flat folder: one class
    assert gray.images.shape == (3, 1, 4, 4) and gray.num_classes == 1


def test_image_folder_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 8)
    with pytest.raises(ValueError, match="no .* images"):
        load_image_folder(tmp_path, 8)
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset("folder")
    with pytest.raises(ValueError, match="unknown image dataset"):
        load_dataset("mnist")


def test_cifar10_batches_load_from_the_named_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in (1, 2):
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}
        with open(tmp_path / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f)
    data = load_dataset("cifar10", tmp_path)
    assert data.images.shape == (8, 3, 32, 32) and data.labels.tolist() == [0, 1, 2, 9] * 2
    assert float(data.images.min()) >= -1.0 and float(data.images.max()) <= 1.0
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(ValueError, match="not a CIFAR-10 batch"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_dataset("cifar10", tmp_path / "empty")


# --- classifier and FD ------------------------------------------------------------------------------------


def test_classifier_is_accurate_on_held_out_digits(classifier):
    _, info = classifier
    assert info["task"] == "labels"
    assert info["holdout_accuracy"] > 0.9


def test_classifier_log_prob_is_a_differentiable_reward(classifier, digits):
    model, _ = classifier
    x = digits.images[:8].clone().requires_grad_(True)
    logp = model.log_prob(x, 3)
    assert logp.shape == (8,) and bool((logp <= 0).all())
    logp.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    every = torch.stack([model.log_prob(digits.images[:8], c) for c in range(10)], 1)
    assert torch.allclose(every.logsumexp(1), torch.zeros(8), atol=1e-5)
    per_sample = model.log_prob(digits.images[:8], digits.labels[:8])
    assert torch.allclose(per_sample, every.gather(1, digits.labels[:8, None]).squeeze(1))


def test_classifier_cache_is_reused_and_keyed_by_settings(tmp_path, digits):
    a, info_a = load_or_train_classifier(digits, cache_dir=tmp_path, steps=5)
    b, info_b = load_or_train_classifier(digits, cache_dir=tmp_path, steps=5)
    assert not info_a["cached"] and info_b["cached"] and info_a["cache"] == info_b["cache"]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    _, info_c = load_or_train_classifier(digits, cache_dir=tmp_path, steps=6)
    assert info_c["cache"] != info_a["cache"] and not info_c["cached"]


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    d = 5
    # N(0, I) vs N(m, 4 I): ||m||^2 + tr(I + 4I - 2 * 2I) = ||m||^2 + d
    m = np.arange(d, dtype=np.float64)
    assert frechet_distance(np.zeros(d), np.eye(d), m, 4 * np.eye(d)) == pytest.approx(float(m @ m) + d)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(d, d))
    s = a @ a.T  # a rank-deficient covariance must not break the square root
    s[:, 0] = s[0, :] = 0.0
    assert frechet_distance(m, s, m, s) == pytest.approx(0.0, abs=1e-6)
    s2 = np.diag(rng.uniform(0.5, 2.0, d))
    assert frechet_distance(m, s, 0 * m, s2) == pytest.approx(frechet_distance(0 * m, s2, m, s), rel=1e-6)


def test_fd_between_real_halves_is_much_smaller_than_to_noise(classifier, digits):
    model, _ = classifier
    perm = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    half_a, half_b = digits.images[perm[:898]], digits.images[perm[898:1796]]
    scorer = FrechetScorer(model, half_a)
    fd_real = scorer(half_b)
    fd_noise = scorer(torch.randn(898, 1, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1))
    assert 0 < fd_real < fd_noise / 10
    assert scorer(torch.full((898, 1, 8, 8), float("nan"))) == float("inf")


# --- training ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_rf(digits):
    torch.manual_seed(0)
    return train_base("1rf", "rf", digits, _stage(grad_steps=300, batch_size=64, progress=False), "cpu")


def test_short_rectified_flow_training_lowers_fd(short_rf, classifier, digits):
    model, _ = classifier
    scorer = FrechetScorer(model, digits.images)
    x0 = eval_noise(500, (1, 8, 8), seed=7)
    torch.manual_seed(0)
    flow, spec = build_flow("rf", (1, 8, 8), _stage())
    untrained = TrainedModel("untrained", flow, EMA(flow.net), spec)
    fd_untrained = scorer(untrained.generate(x0, 8))
    fd_trained = scorer(short_rf.generate(x0, 8))
    assert fd_trained < 0.5 * fd_untrained


def test_checkpoint_round_trip_reproduces_the_samples(short_rf, tmp_path):
    path = save_checkpoint(short_rf, tmp_path / "ckpt")
    save_checkpoint(short_rf, tmp_path / "ckpt")  # overwriting an existing checkpoint works
    # one checkpoint in the policies' format (the second save replaced the first), no temp dirs left behind
    assert sorted(p.name for p in path.iterdir()) == ["last", f"step_{short_rf.ema.num_updates:09d}-1"]
    assert sorted(p.name for p in (path / "last").iterdir()) == ["config.yaml", "env_meta.json", "extra",
                                                                  "manifest.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    flow, cfg = load_generator(path)
    assert cfg.model == "1rf" and cfg.flow["class"] == "RectifiedFlow"
    x0 = eval_noise(16, (1, 8, 8), seed=3)
    assert torch.allclose(flow.sample(steps=4, x0=x0), short_rf.generate(x0, 4), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="not an image generator checkpoint"):
        load_generator(tmp_path)


def test_generators_saved_in_format_1_still_load(short_rf, tmp_path):
    """Before image generators used the policies' checkpoint format: config.yaml + one model.safetensors with
    ema.* (sampling) and net.* (training) weights."""
    from safetensors.torch import save_file

    path = tmp_path / "old"
    path.mkdir()
    tensors = {f"ema.{k}": v.contiguous() for k, v in short_rf.ema.model.state_dict().items()}
    tensors.update({f"net.{k}": v.contiguous() for k, v in short_rf.flow.net.state_dict().items()})
    save_file(tensors, str(path / "model.safetensors"))
    OmegaConf.save(OmegaConf.create({"format_version": 1, "kind": "image_generator", "model": short_rf.name,
                                     "flow": short_rf.spec}), path / "config.yaml")
    flow, cfg = load_generator(path)
    x0 = eval_noise(8, (1, 8, 8), seed=3)
    assert cfg.model == "1rf" and torch.equal(flow.sample(steps=4, x0=x0), short_rf.generate(x0, 4))


@pytest.mark.parametrize("method, over, models", [
    ("rf", {}, ["1rf"]),
    ("reflow", {}, ["1rf", "2rf", "2rf_distill_k1", "2rf_distill_k2"]),
    ("reflow", {"distill": {"pairs": "teacher", "k": 1}}, ["1rf", "2rf", "2rf_distill_k1"]),
    ("shortcut", {}, ["shortcut"]),
])
def test_run_end_to_end_writes_checkpoints_grids_and_metrics(tmp_path, method, over, models):
    out = tmp_path / "run"
    summary = run(_cfg(tmp_path, method, **over), run_dir=out)
    assert list(summary["models"]) == models
    for name in models:
        entry = summary["models"][name]
        assert (out / "checkpoints" / name / "last" / "model.safetensors").exists()
        assert (out / "checkpoints" / name / "last" / "config.yaml").exists()
        with Image.open(out / "samples" / f"{name}.png") as im:
            assert im.size[0] > 8 and im.size[1] > 8
        assert set(entry["fd"]) == {1, 2} and all(np.isfinite(v) for v in entry["fd"].values())
        assert ("straightness" in entry) == (name != "shortcut")
        flow, _ = load_generator(out / "checkpoints" / name)
        assert flow.sample(steps=2, batch=3).shape == (3, 1, 8, 8)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert json.loads((out / "eval.json").read_text())["method"] == method
    assert summary["classifier"]["holdout_accuracy"] > 0.3
    if method == "reflow":
        assert summary["models"]["2rf_distill_k1"]["pairs"] == over.get("distill", {}).get("pairs", "reflow")


def test_a_rerun_resumes_finished_models_and_matches_one_uninterrupted_run(tmp_path, capsys):
    import shutil

    from agents.errors import UserError

    cfg = _cfg(tmp_path, "reflow", distill={"k": 1})
    one = run(cfg, run_dir=tmp_path / "one")
    two = tmp_path / "two"
    run(cfg, run_dir=two)
    # as if the run died while training the 2-RF: the 1-RF finished; the 2-RF was saved part way (Ctrl-C)
    shutil.rmtree(two / "checkpoints" / "2rf_distill_k1")
    partial = load_checkpoint(two / "checkpoints" / "2rf")
    stopped = {**partial["config"], "stopped_at_step": 3}
    stopped.pop("entry")
    (partial["path"] / "config.yaml").write_text(yaml.safe_dump(stopped, sort_keys=False))
    write_manifest(partial["path"])
    capsys.readouterr()
    resumed = run(cfg, run_dir=two)
    said = capsys.readouterr().out
    assert "resumed 1rf" in said and "2rf: stopped at step 3 last time; training it again" in said
    assert list(resumed["models"]) == list(one["models"])
    for name in one["models"]:  # the same weights and metrics as the uninterrupted run
        a, b = load_generator(tmp_path / "one" / "checkpoints" / name)[0], load_generator(two / "checkpoints" / name)[0]
        assert all(torch.equal(x, y) for x, y in zip(a.net.state_dict().values(), b.net.state_dict().values())), name
        assert resumed["models"][name]["fd"] == one["models"][name]["fd"], name
    with pytest.raises(UserError, match="trained with other settings"):  # another lr: not the same 1-RF
        run(_cfg(tmp_path, "reflow", distill={"k": 1}, lr=5e-4), run_dir=two)


def test_run_rejects_bad_settings_before_training(tmp_path):
    with pytest.raises(ValueError, match="powers of two"):
        run(_cfg(tmp_path, "shortcut", eval={"denoise_steps": [1, 3]}), run_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="unknown stage.method"):
        run(_cfg(tmp_path, "ddpm"), run_dir=tmp_path / "b")
    assert not (tmp_path / "a" / "checkpoints").exists()


# --- held-out metrics (agents/images/evaluation.py, flowpolicy/metrics.py, bench/images.py) ---------------


class _PixelFeatures(torch.nn.Module):
    """The identity feature map (pixels as features): held-out metrics without training a network."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def features(self, images):
        return images.flatten(1)


def test_heldout_split_is_disjoint_stratified_and_seeded(digits):
    ids = ImageData(torch.arange(300.0).reshape(300, 1, 1, 1), torch.arange(300) % 3, 3, "ids", ["a", "b", "c"])
    train, held = heldout_split(ids, 0.4, seed=0)
    a, b = set(train.images.flatten().tolist()), set(held.images.flatten().tolist())
    assert not a & b and a | b == set(range(300))
    assert held.labels.bincount().tolist() == [40, 40, 40]
    assert torch.equal(heldout_split(ids, 0.4, seed=0)[1].images, held.images)
    assert not torch.equal(heldout_split(ids, 0.4, seed=1)[1].images, held.images)
    train, held = heldout_split(digits, 0.4)
    assert len(train) + len(held) == len(digits) and len(held) == 719
    assert train.name != held.name != digits.name  # caches keyed by name never mix the parts


def test_feature_network_trains_on_the_training_part_only_and_differs_from_the_reward_classifier(digits):
    train, held = heldout_split(digits, 0.4)
    enc, info = train_encoder(train, steps=150, seed=1)
    assert info["train_images"] == len(train) and info["train_fingerprint"] == train.fingerprint()
    assert info["feature_dim"] == 32 and not isinstance(enc, ImageClassifier)
    assert accuracy_on(enc, held) > 0.7  # features that see digits, measured on images it never saw
    again, _ = train_encoder(train, steps=150, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(enc.state_dict().values(), again.state_dict().values()))


def test_fd_floor_is_zero_for_identical_samples_and_positive_for_disjoint_real_halves(digits):
    feats = digits.images.flatten(1)[:500]
    assert fd_features(feats, feats) == pytest.approx(0.0, abs=1e-6)
    train, held = heldout_split(digits, 0.4)
    judge = HeldOutJudge(_PixelFeatures(), train.images, held.images, n=300, splits_per_draw=1)
    floors = judge.floors(5)
    assert all(f > 0.1 for f in floors) and len(set(floors)) == 5  # disjoint halves differ; the floor spreads
    s = judge.split(0)
    assert not set(s["ref"].tolist()) & set(s["other"].tolist())
    real = judge.score(held.images[s["other"]], 0)  # the other half scored like samples: exactly the floor
    assert real["fd"] == pytest.approx(floors[0]) and real["fd_excess"] == pytest.approx(0.0, abs=1e-9)
    assert judge.score_real(0)["fd_excess"] == 0.0
    noise = judge.score(torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, 0)
    assert noise["fd_excess"] > 10 * floors[0] and noise["precision"] < 0.2 and noise["coverage"] < 0.2
    with pytest.raises(ValueError, match="2 x 400 held-out"):
        HeldOutJudge(_PixelFeatures(), train.images, held.images, n=400)


def test_copies_of_training_images_reach_the_floor_but_not_the_memorisation_measure(digits):
    train, held = heldout_split(digits, 0.4)
    judge = HeldOutJudge(_PixelFeatures(), train.images, held.images, n=300, splits_per_draw=4)
    copies = judge.score(train.images[:300], 0)
    fresh = judge.score_real(0)
    assert copies["nn_ratio"] == 0.0 and copies["copy_rate"] == 1.0
    assert 0.8 < fresh["nn_ratio"] < 1.2 and fresh["copy_rate"] < 0.15
    assert abs(copies["fd_excess"]) < 0.5 * copies["floor"]  # FD alone cannot tell copies from new digits


def test_precision_recall_of_a_copy_is_one_and_lower_for_shifted_or_mode_dropped_samples():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [8.0, 0.0]])
    real = torch.randn(400, 2, generator=g) + centres[torch.arange(400) % 2]
    copy = precision_recall_coverage(real, real.clone())
    assert copy["precision"] == copy["recall"] == copy["coverage"] == 1.0
    fresh = precision_recall_coverage(real, torch.randn(400, 2, generator=g) + centres[torch.arange(400) % 2])
    assert min(fresh["precision"], fresh["recall"], fresh["coverage"]) > 0.85 and 0.7 < fresh["density"] < 1.3
    shifted = precision_recall_coverage(real, real + torch.tensor([0.0, 3.0]))  # 3 sd off
    assert shifted["precision"] < fresh["precision"] and shifted["recall"] < fresh["recall"] - 0.1
    assert shifted["coverage"] < 0.4 and shifted["density"] < 0.6  # the outlier-robust pair drops most
    far = precision_recall_coverage(real, real + torch.tensor([0.0, 50.0]))
    assert far["precision"] == far["recall"] == far["coverage"] == far["density"] == 0.0
    one_mode = precision_recall_coverage(real, torch.randn(400, 2, generator=g))  # the mode at 8 dropped
    assert one_mode["precision"] > 0.9 and one_mode["recall"] < 0.6 and one_mode["coverage"] < 0.6


def test_bench_intervals_use_seed_means_and_the_target_is_paired():
    from scipy import stats

    mean, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3))
    assert t_interval([5.0])[0] == 5.0 and np.isnan(t_interval([5.0])[1])
    one_seed = [{"seed": 0, "v": v} for v in (1.0, 2.0, 3.0)]
    assert replicates(one_seed, "v") == ([1.0, 2.0, 3.0], "draws")
    two_seeds = one_seed + [{"seed": 1, "v": v} for v in (5.0, 6.0, 7.0)]
    assert replicates(two_seeds, "v") == ([2.0, 6.0], "seeds")
    raw = [{"model": m, "steps": k, "seed": 0, "draw": d, "fd_excess": x + 0.1 * d}
           for d in range(5) for m, k, x in (("a", 1, 10.0), ("ref", 100, 10.0), ("b", 1, 20.0))]
    assert paired_target(raw, "a", ("ref", 100))["verdict"] == "met"       # 10 <= 1.5 x 10
    assert paired_target(raw, "b", ("ref", 100))["verdict"] == "not met"   # 20 > 1.5 x 10
    assert all(BUDGETS[b]["draws"] >= 5 for b in ("small", "full"))


def test_image_bench_writes_floor_intervals_and_coverage(tmp_path):
    out = tmp_path / "results"
    result = bench_images(["--budget", "tiny", "--no-peer", "--seeds", "0", "1", "--out", str(out),
                           "--cache", str(tmp_path / "c"), "--threads", "1", "--work", str(tmp_path / "w")])
    rows = {(r["model"], r["steps"]): r for r in result["rows"]}
    assert {("data", 0), ("train_copy", 0), ("1rf", 4), ("2rf_distill_k1", 1), ("shortcut", 1)} <= set(rows)
    for r in rows.values():
        real = r["model"] in ("data", "train_copy")
        assert (r["n_seeds"], r["n_draws"], r["over"]) == ((1, 4, "draws") if real else (2, 2, "seeds"))
        assert r["fd_excess_lo"] <= r["fd_excess"] <= r["fd_excess_hi"]
        assert 0.0 <= r["precision_lo"] <= r["precision"] <= r["precision_hi"] <= 1.0
    assert rows[("data", 0)]["fd_excess"] == 0.0 and rows[("train_copy", 0)]["nn_ratio"] == 0.0
    draws = [e for e in result["draws"] if e["model"] == "1rf" and e["steps"] == 4]
    # each training seed has its own noise and splits: the seeds' means are independent replicates
    assert [(e["seed"], e["draw"]) for e in draws] == [(0, 0), (0, 1), (1, 2), (1, 3)]
    assert all(e["fd_excess"] == e["fd"] - e["floor"] for e in draws)
    assert result["summary"]["split"]["heldout_images"] == 719 and result["config"]["samples_per_score"] == 40
    md = (out / "images-tiny.md").read_text()
    assert "FD − floor" in md and "The floor" in md and "Student-t 95%" in md
    assert json.loads((out / "images-tiny.json").read_text())["summary"]["floor"]["n"] == 40
    with Image.open(out / "images-tiny.png") as im:
        assert im.size[0] > 100
    # the seeds trained in parallel processes (one thread each) give the same scores, draw for draw
    par = bench_images(["--budget", "tiny", "--no-peer", "--seeds", "0", "1", "--out", str(tmp_path / "par"),
                        "--cache", str(tmp_path / "c"), "--workers", "2", "--work", str(tmp_path / "w2")])
    assert par["reused_seeds"] == 0
    key = ("model", "steps", "seed", "draw", "fd", "fd_excess", "precision", "coverage", "nn_ratio")
    assert [[e[k] for k in key] for e in par["draws"]] == [[e[k] for k in key] for e in result["draws"]]


def test_image_bench_merge_is_refused_before_training_unless_every_setting_and_the_judge_match(tmp_path,
                                                                                              monkeypatch):
    """--peer-only --merge keeps our rows only from a run of the same budget settings (stage and step counts
    scored), seeds, draws and judge; anything else stops with one line before a model trains (no peer needed)."""
    import bench.images as bi

    common = ["--budget", "tiny", "--seeds", "0", "1", "--cache", str(tmp_path / "c"), "--threads", "1",
              "--work", str(tmp_path / "w")]
    ours = bench_images([*common, "--no-peer", "--out", str(tmp_path / "ours")])
    assert ours["config"]["seeds"] == [0, 1] and ours["config"]["reflow_steps"] == BUDGETS["tiny"]["reflow_steps"]
    path = str(tmp_path / "ours" / "images-tiny.json")

    def no_training(*a, **k):
        raise AssertionError("trained before the merge was checked")

    monkeypatch.setattr(bi, "_train_and_score_seed", no_training)
    for extra, match in ((["--seeds", "0"], "seeds=\\[0, 1\\] differ from this run's seeds=\\[0\\]"),
                         (["--draws", "3"], "draws=2"), (["--no-peer"], "go together")):
        with pytest.raises(SystemExit, match=match):
            bench_images([*common, "--peer-only", "--merge", path, *extra, "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="is the file this run would write"):  # the merged run is never overwritten
        bench_images([*common, "--peer-only", "--merge", path, "--out", str(tmp_path / "ours")])
    with pytest.raises(SystemExit, match="no such file"):
        bench_images([*common, "--peer-only", "--merge", str(tmp_path / "nope.json"), "--out", str(tmp_path / "bad")])
    monkeypatch.setitem(bi.BUDGETS["tiny"], "reflow_steps", [1, 2])          # a row set the merged run lacks
    with pytest.raises(SystemExit, match="reflow_steps=\\[1\\] differ"):
        bench_images([*common, "--peer-only", "--merge", path, "--out", str(tmp_path / "bad")])
    monkeypatch.setitem(bi.BUDGETS["tiny"], "reflow_steps", [1])
    monkeypatch.setitem(bi.BUDGETS["tiny"], "stage", {**bi.BUDGETS["tiny"]["stage"], "grad_steps": 11})
    with pytest.raises(SystemExit, match="stage {'grad_steps': 10}"):
        bench_images([*common, "--peer-only", "--merge", path, "--out", str(tmp_path / "bad")])
    monkeypatch.setitem(bi.BUDGETS["tiny"], "stage", {**bi.BUDGETS["tiny"]["stage"], "grad_steps": 10})
    # another judge (here: one tampered real-image score) is refused after scoring the real images only
    tampered = json.loads((tmp_path / "ours" / "images-tiny.json").read_text())
    next(e for e in tampered["draws"] if e["model"] == "data")["fd"] += 1.0
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    with pytest.raises(SystemExit, match="real-image scores differ"):
        bench_images([*common, "--peer-only", "--merge", str(tmp_path / "tampered.json"), "--out",
                      str(tmp_path / "bad")])


def test_image_bench_saves_each_seed_so_a_stopped_run_trains_only_the_rest(tmp_path, monkeypatch, capsys):
    """Every training seed is saved the moment it is scored: after a failure on the second seed, the same
    command trains only that seed and gives the rows of one uninterrupted run; changed settings or --no-reuse
    train again."""
    import bench.images as bi

    real = bi._train_and_score_seed
    trained = []

    def fail_on_seed_1(ctx, seed, rfp):
        trained.append(seed)
        if seed == 1:
            raise RuntimeError("stopped")
        return real(ctx, seed, rfp)

    common = ["--budget", "tiny", "--no-peer", "--seeds", "0", "1", "--cache", str(tmp_path / "c"), "--threads",
              "1", "--out", str(tmp_path / "o")]
    monkeypatch.setattr(bi, "_train_and_score_seed", fail_on_seed_1)
    with pytest.raises(RuntimeError, match="stopped"):
        bench_images([*common, "--work", str(tmp_path / "w")])
    saved = sorted(p.name for p in (tmp_path / "w" / "images" / "runs").iterdir())
    assert len(saved) == 1 and saved[0].startswith("tiny-ours-seed0-")

    def count(ctx, seed, rfp):
        trained.append(seed)
        return real(ctx, seed, rfp)

    trained.clear()
    monkeypatch.setattr(bi, "_train_and_score_seed", count)
    resumed = bench_images([*common, "--work", str(tmp_path / "w")])
    assert trained == [1] and resumed["reused_seeds"] == 1 and "seed 0: reused" in capsys.readouterr().out
    assert "1 of 2 training seeds reused" in (tmp_path / "o" / "images-tiny.md").read_text()
    whole = bench_images([*common, "--work", str(tmp_path / "fresh")])
    key = ("model", "steps", "seed", "draw", "fd", "fd_excess", "precision", "coverage", "nn_ratio")
    assert [[e[k] for k in key] for e in resumed["draws"]] == [[e[k] for k in key] for e in whole["draws"]]

    def no_training(*a, **k):
        raise AssertionError("trained")

    monkeypatch.setattr(bi, "_train_and_score_seed", no_training)
    again = bench_images([*common, "--work", str(tmp_path / "w")])  # both seeds saved: nothing trains
    assert again["reused_seeds"] == 2 and again["rows"] == resumed["rows"]
    for extra in (["--no-reuse"], ["--draws", "3"]):  # asked to, or other settings (their own draws): train
        with pytest.raises(AssertionError, match="trained"):
            bench_images([*common, "--work", str(tmp_path / "w"), *extra])


def test_peer_comparison_pairs_draws_and_picks_our_best_model_at_each_step_count(tmp_path):
    """ours − peer is paired by (seed, draw) and uses our lowest-excess model at each step count; the verdict
    follows the interval; --add-peer-table writes it into a finished run's JSON and Markdown once."""
    from bench.images import aggregate, peer_comparison

    raw = []
    for seed in (0, 1, 2):
        for d in range(3):
            draw = seed * 3 + d
            common = draw * 0.5  # the shared noise moves every model alike within a draw
            for model, impl, k, x, nfe in (("a", "flowpolicy", 1, 10.0, 1), ("b", "flowpolicy", 1, 30.0, 1),
                                           ("a", "flowpolicy", 2, 20.0, 1), ("a", "flowpolicy", 4, 40.0, 1),
                                           ("peer_own", "rectified-flow-pytorch", 1, 20.0, 2),
                                           ("peer_own", "rectified-flow-pytorch", 2, 20.0, 2),
                                           ("peer_own", "rectified-flow-pytorch", 4, 10.0, 2)):
                wobble = 0.3 * (seed - 1) if k == 2 else 0.1 * seed
                raw.append({"model": model, "method": model, "impl": impl, "steps": k, "seed": seed, "draw": draw,
                            "nfe_per_step": nfe, "fd": x + common, "floor": 0.0, "fd_excess": x + common
                            + (wobble if model == "a" else 0.0)})
    comp = {c["steps"]: c for c in peer_comparison(raw)}
    assert comp[1]["ours"] == "a" and comp[1]["diff"] < 0 and comp[1]["verdict"] == "ours lower"
    assert (comp[1]["ours_nfe"], comp[1]["peer_nfe"], comp[1]["over"], comp[1]["pairs"]) == (1, 2, "seeds", 9)
    assert comp[2]["verdict"].startswith("matched") and comp[2]["diff_lo"] < 0 < comp[2]["diff_hi"]
    assert comp[4]["verdict"] == "peer lower"
    # a finished run without the table: added to its summary and, once, to its Markdown
    for e in raw:
        e.update({k: 0.0 for k in ("precision", "recall", "density", "coverage", "nn_ratio", "copy_rate")})
    path = tmp_path / "images.json"
    path.write_text(json.dumps({"name": "images", "draws": raw, "rows": aggregate(raw), "summary": {}}))
    (tmp_path / "images.md").write_text("# images\n\ntable\n")
    for _ in range(2):
        bench_images(["--add-peer-table", str(path)])
    assert [c["verdict"] for c in json.loads(path.read_text())["summary"]["vs_peer"]][0] == "ours lower"
    md = (tmp_path / "images.md").read_text()
    assert md.startswith("# images\n\ntable") and md.count("Ours against the peer") == 1 and "| 4 |" in md
    with pytest.raises(SystemExit, match="no such file"):
        bench_images(["--add-peer-table", str(tmp_path / "missing.json")])
    path.write_text(json.dumps({"name": "images", "draws": [e for e in raw if e["model"] != "peer_own"], "rows": [],
                                "summary": {}}))
    with pytest.raises(SystemExit, match="no peer rows"):
        bench_images(["--add-peer-table", str(path)])


def test_image_bench_refuses_a_file_out_and_files_that_are_not_its_results_in_one_line_before_anything(
        tmp_path, monkeypatch):
    """--out naming a file, and --merge / --add-peer-table of a text file or another benchmark's result, stop
    with one line before the judge is built or a model trains; the files are left as they are."""
    import bench.images as bi
    from bench.common import RESULTS

    def nothing(*a, **k):
        raise AssertionError("started before the arguments were checked")

    monkeypatch.setattr(bi, "_setup", nothing)
    monkeypatch.setattr(bi, "_train_and_score_seed", nothing)
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    common = ["--budget", "tiny", "--seeds", "0", "--work", str(tmp_path / "w"), "--cache", str(tmp_path / "c")]
    cases = [
        (["--out", str(tmp_path / "afile")], "--out .*afile: it is a file, not a folder"),
        (["--out", str(tmp_path / "afile" / "sub")], "afile is a file, not a folder"),
        (["--peer-only", "--merge", str(tmp_path / "text.json")], "text.json: not a JSON file"),
        (["--peer-only", "--merge", str(RESULTS / "latency.json")],
         "latency.json: not a bench.images result \\(its name is 'latency'\\)$"),
        (["--add-peer-table", str(RESULTS / "latency.json")], "not a bench.images result"),
        (["--add-peer-table", str(tmp_path / "text.json")], "not a JSON file"),
        (["--add-peer-table", str(tmp_path / "list.json")], "not a bench.images result \\(it holds an array\\)"),
    ]
    for args, why in cases:
        with pytest.raises(SystemExit, match=why) as e:
            bench_images([*common, "--out", str(tmp_path / "o"), *args])
        assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code)
    assert (tmp_path / "afile").read_text() == "mine" and (tmp_path / "text.json").read_text() == "not json"
    assert not (tmp_path / "o").exists()


def test_logger_none_writes_no_tensorboard_files(tmp_path):
    """stage=image honours logger=none as pretrain and finetune do; tensorboard and wandb (its mirror) write tb/."""
    from agents.tblog import tensorboard_wanted

    assert not tensorboard_wanted(OmegaConf.create({"logger": {"name": "none"}}))
    assert tensorboard_wanted(OmegaConf.create({"logger": {"name": "tensorboard"}}))
    assert tensorboard_wanted(OmegaConf.create({"logger": {"name": "wandb"}}))
    assert tensorboard_wanted(OmegaConf.create({}))  # the Python API without a logger: as before
    cfg = _cfg(tmp_path, "rf", grad_steps=5, eval={"fd": False, "straightness_samples": 0})
    cfg.logger = {"name": "none"}
    summary = run(cfg, run_dir=tmp_path / "run")
    assert list(summary["models"]) == ["1rf"] and (tmp_path / "run" / "eval.json").exists()
    assert not (tmp_path / "run" / "tb").exists()
