"""bench.align's new paths end to end at a tiny budget (numbers meaningless), and the drift measures
(agents/align_metrics.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch


def test_policy_drift_is_zero_for_the_same_policy_and_grows_with_a_changed_one():
    from agents.align_metrics import observation_sample, policy_drift, sample_drift
    from agents.policies import build_policy

    torch.manual_seed(0)
    ref = build_policy({"kind": "reflow", "hidden": 16, "depth": 1, "default_steps": 4}, 3, 2, 1, 4)
    obs = observation_sample(torch.randn(50, 1, 3), 20, seed=1)
    assert obs.shape == (20, 1, 3)
    same = copy.deepcopy(ref)
    assert policy_drift(same, ref, obs, 4) == 0.0
    moved = copy.deepcopy(ref)
    with torch.no_grad():
        for p in moved.flow.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = policy_drift(moved, ref, obs, 4, seed=3)
    assert d > 0 and d == policy_drift(moved, ref, obs, 4, seed=3)  # same noise: reproducible
    x = torch.randn(8, 1, 4, 4)
    assert sample_drift(x, x) == 0.0 and abs(sample_drift(x + 0.5, x) - 0.25) < 1e-6


def test_implicit_reward_accuracy_is_half_for_the_reference_and_high_after_learning_the_winners():
    from agents.align_metrics import implicit_reward_accuracy
    from flowpolicy import RectifiedFlow
    from flowpolicy.nets import MLPVelocity

    torch.manual_seed(0)
    ref = RectifiedFlow(MLPVelocity((2,), hidden=32, depth=2, emb_dim=16), (2,))
    x_w = torch.tensor([1.0, 1.0]) + 0.1 * torch.randn(64, 2)    # winners near (1, 1), losers near (-1, -1)
    x_l = -torch.tensor([1.0, 1.0]) + 0.1 * torch.randn(64, 2)
    same = implicit_reward_accuracy(copy.deepcopy(ref), ref.net, x_w, x_l, draws=4)
    assert same == {"pair_accuracy": 0.5, "implicit_margin": 0.0}   # every pair ties
    tuned = copy.deepcopy(ref)   # flow matching on the winners only: their error falls, the losers' rises
    opt = torch.optim.Adam(tuned.net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        opt.zero_grad()
        tuned.loss(x_w, generator=gen)[0].backward()
        opt.step()
    held_w = torch.tensor([1.0, 1.0]) + 0.1 * torch.randn(32, 2)
    held_l = -torch.tensor([1.0, 1.0]) + 0.1 * torch.randn(32, 2)
    acc = implicit_reward_accuracy(tuned, ref.net, held_w, held_l, draws=8, seed=2)
    assert acc["pair_accuracy"] > 0.9 and acc["implicit_margin"] > 0
    flipped = implicit_reward_accuracy(tuned, ref.net, held_l, held_w, draws=8, seed=2)
    assert flipped["pair_accuracy"] < 0.1 and abs(flipped["implicit_margin"] + acc["implicit_margin"]) < 1e-9


def test_pairwise_diversity_is_zero_for_copies_and_scales_with_spread():
    from agents.align_metrics import pairwise_diversity

    x = torch.randn(50, 8)
    assert pairwise_diversity(x[:1].repeat(20, 1)) == 0.0     # mode collapse: one sample repeated
    assert abs(pairwise_diversity(3 * x) / pairwise_diversity(x) - 3) < 1e-6
    assert pairwise_diversity(torch.tensor([[0.0], [2.0]])) == 2.0
    assert pairwise_diversity(x[:1]) != pairwise_diversity(x[:1])  # NaN with one sample


def test_bench_align_tiny_run_reports_drift_equal_samples_and_paired_tests(tmp_path):
    from bench.align import main

    out = main(["--budget", "tiny", "--seeds", "0", "--betas", "20", "--policy-betas", "2000",
                "--beta-schedules", "constant", "diffusion_dpo", "--states", "3", "--pairing", "all",
                "--out", str(tmp_path), "--classifier-cache", str(tmp_path / "clf"), "--name", "t"])
    rec = json.loads(out.read_text())
    per_seed = rec["per_seed"]
    pp = [r for r in per_seed if r["domain"] == "pick_place"]
    dg = [r for r in per_seed if r["domain"] == "digits"]
    assert pp[0]["method"] == "pretrained (BC)" and pp[0]["drift"] == 0.0
    methods = [r["method"] for r in pp]
    assert "Flow-DPO β=2000" in methods and "Flow-DPO β=2000, β_t = β t²" in methods
    for r in pp[1:]:
        assert r["drift"] >= 0 and 0 <= r["p_mcnemar"] <= 1 and r["b"] + r["c"] <= r["n_eval"]
        assert len(r["successes"]) == r["n_eval"] == pp[0]["n_eval"]
        assert r["success_lo"] <= r["success_rate"] <= r["success_hi"]
        assert "same start state" in r["pref_source"]
    seen = {r["variant"]: r["samples_seen"] for r in pp[1:]}
    assert seen["dpo"] == seen["sft"] == seen["rwr"]  # equal chunks seen at equal steps
    seen = {r["variant"]: r["samples_seen"] for r in dg if r["variant"] in ("dpo", "rwr", "sft")}
    assert seen["dpo"] == seen["sft"] == seen["rwr"]
    steps = {r["variant"]: r["steps"] for r in dg if r["variant"] in ("dpo", "sft")}
    assert steps["sft"] == 2 * steps["dpo"]  # DPO sees two images per pair
    assert all(r["drift"] > 0 for r in dg if r["variant"] in ("dpo", "rwr", "sft"))
    assert all("reward_heldout" in r and "diversity" in r for r in dg)
    for r in dg:
        if r["variant"] in ("dpo", "rwr", "sft"):
            assert 0 <= r["pair_accuracy"] <= 1 and r["heldout_pairs"] > 0
        else:
            assert "pair_accuracy" not in r
    digits = {r["method"]: r for r in rec["rows"] if r["domain"] == "digits"}
    assert digits["Flow-DPO β=20"]["vs_sft"] == "fewer than 3 seeds"
    policy = {r["method"]: r for r in rec["rows"] if r["domain"] == "pick_place"}
    assert all("p_holm" in r and "verdict" in r for m, r in policy.items() if m != "pretrained (BC)")
    md = (tmp_path / "t.md").read_text()
    assert "classifier B" in md and "McNemar" in md and "Wilson" in md
    assert (tmp_path / "t.png").exists()

    # a second run's seeds merged with the first's (digits only here, to stay fast)
    out2 = main(["--budget", "tiny", "--seeds", "1", "--betas", "20", "--policy-betas", "2000",
                 "--beta-schedules", "constant", "diffusion_dpo", "--states", "3", "--pairing", "all",
                 "--skip-policy", "--out", str(tmp_path), "--classifier-cache", str(tmp_path / "clf"),
                 "--name", "t2", "--merge", str(out)])
    rec2 = json.loads(out2.read_text())
    assert rec2["config"]["seeds"] == [0, 1] and {r["seed"] for r in rec2["per_seed"]} == {0, 1}
    assert all(r["seeds"] == 2 for r in rec2["rows"]) and "merged from" in (tmp_path / "t2.md").read_text()


def test_bench_align_same_state_branch_pairs_name_their_source(tmp_path, monkeypatch):
    from bench.align import main

    out = main(["--budget", "tiny", "--seeds", "0", "--policy-betas", "2000", "--states", "2", "--pairing", "all",
                "--pairs-from", "branches", "--branch-points", "2", "--skip-images", "--out", str(tmp_path),
                "--name", "b", "--rounds", "2", "--methods", "dpo", "sft"])
    rec = json.loads(out.read_text())
    meta = rec["config"]["pick_place"]["per_seed"][0]
    assert meta["pairs_from"] == "branches" and meta["rollouts"] == 2 * 2 * 4
    assert "same restored state" in meta["pref_source"] and "2 online rounds" in meta["pref_source"]
    assert "branch points" in (tmp_path / "b.md").read_text()
    # --methods: only DPO and SFT; --rounds 2: each evaluated after both rounds, twice the samples of one round
    rows = {r["variant"]: r for r in rec["per_seed"]}
    assert sorted(rows) == ["base", "dpo", "sft"]
    for v in ("dpo", "sft"):
        assert [x["round"] for x in rows[v]["rounds"]] == [1, 2] and rows[v]["rounds"][1]["collect_s"] > 0
        assert rows[v]["success_rate"] == rows[v]["rounds"][-1]["success_rate"]
    assert rows["dpo"]["samples_seen"] == 2 * 3 * 32 * 4 * 2  # tiny: 3 steps a round
    # a merge of another setting, or too many start states, is refused before anything trains
    import bench.align as ba

    def no_training(*a, **k):
        raise AssertionError("trained before the settings were checked")

    monkeypatch.setattr(ba, "policy_part", no_training)
    with pytest.raises(SystemExit, match="rounds"):
        main(["--budget", "tiny", "--seeds", "1", "--policy-betas", "2000", "--states", "2", "--pairing", "all",
              "--pairs-from", "branches", "--branch-points", "2", "--skip-images", "--out", str(tmp_path),
              "--name", "c", "--merge", str(out)])
    with pytest.raises(SystemExit, match="would reach the next seed's"):
        main(["--budget", "tiny", "--seeds", "1", "--states", "2", "--rounds", "5001", "--skip-images",
              "--out", str(tmp_path), "--name", "d"])


def test_bench_align_refuses_bad_arguments_and_files_in_one_line_before_anything_trains(tmp_path, monkeypatch,
                                                                                        capsys):
    import bench.align as ba
    from bench.common import RESULTS

    def no_training(*a, **k):
        raise AssertionError("trained before the arguments were checked")

    monkeypatch.setattr(ba, "policy_part", no_training)
    monkeypatch.setattr(ba, "image_part", no_training)
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    # an earlier align result in the --out folder (as bench.align writes it: its command names the module)
    earlier = {"name": "align", "command": "python -m bench.align --budget tiny", "config": {"seeds": [0]},
               "per_seed": [], "wall_s": 1.0, "date": "d"}
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "align.json").write_text(json.dumps(earlier))
    cases = [
        (["--seeds", "-1"], "--seeds must be distinct and >= 0"),
        (["--states", "-5"], "--states must be >= 1, got -5"),
        (["--states", "0"], "--states must be >= 1, got 0"),  # not "the budget's"
        (["--betas", "-1"], "--betas must be > 0"),
        (["--policy-betas", "0"], "--policy-betas must be > 0"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--branch-span", "0"], "--branch-span must be in (0, 1]"),
        (["--skip-images", "--skip-policy"], "leave nothing to run"),
        (["--out", str(tmp_path / "afile")], "is a file, not a folder"),
        (["--merge", str(tmp_path / "nope.json")], "no such file"),
        (["--merge", str(tmp_path / "text.json")], "not a JSON file"),
        (["--merge", str(tmp_path / "list.json")], "not a bench.align result (it holds an array)"),
        (["--merge", str(RESULTS / "latency.json")], "not a bench.align result (its name is 'latency')"),
        (["--merge", str(tmp_path / "res" / "align.json"), "--out", str(tmp_path / "res")],
         "is the file this run would write"),
    ]
    for args, why in cases:
        with pytest.raises(SystemExit) as e:
            ba.main(["--budget", "tiny", "--seeds", "1", "--out", str(tmp_path / "o"), *args])
        line = capsys.readouterr().err.strip().splitlines()[-1] if e.value.code == 2 else str(e.value.code)
        assert "error: " in line and why in line, (args, line)
    assert (tmp_path / "afile").read_text() == "mine"
    assert json.loads((tmp_path / "res" / "align.json").read_text()) == earlier
    assert not (tmp_path / "o").exists()
