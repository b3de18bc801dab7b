"""robomimic-layout HDF5 files: round trip, validation errors, DemoDataset windows, splits, robomimic interop."""

import json

import h5py
import numpy as np
import pytest
import torch

from envs.dataset import DemoDataset
from envs.hdf5 import DatasetError, Episode, read_demos, read_env_args, read_masks, read_meta, write_demos

ENV_ARGS = {"env_name": "metaworld/pick-place-v3", "type": 2, "env_kwargs": {"max_episode_steps": 500}}


def make_episode(length, obs_dim=3, act_dim=2, offset=0.0):
    """obs[t] = offset + t in every dim; actions[t] = (offset + t) / 1000; reward 1 per step."""
    t = np.arange(length, dtype=np.float32) + offset
    obs = np.repeat(t[:, None], obs_dim, axis=1)
    return Episode(obs=obs, actions=np.repeat(t[:, None] / 1000, act_dim, axis=1), rewards=np.ones(length),
                   next_obs=obs + 1, success=True)


@pytest.fixture
def demo_file(tmp_path):
    episodes = [make_episode(n, offset=100 * i) for i, n in enumerate([5, 3, 7, 4])]
    path = write_demos(tmp_path / "demos.hdf5", episodes, ENV_ARGS, meta={"expert": "test", "noise": 0.1},
                       valid_fraction=0.25, split_seed=0)
    return path, episodes


def test_round_trip_keeps_arrays_attrs_masks_and_meta(demo_file):
    path, episodes = demo_file
    loaded = read_demos(path, load_next_obs=True)
    assert [ep.name for ep in loaded] == ["demo_0", "demo_1", "demo_2", "demo_3"]
    for ep, orig in zip(loaded, episodes):
        np.testing.assert_array_equal(ep.obs, orig.obs)
        np.testing.assert_array_equal(ep.next_obs, orig.next_obs)
        np.testing.assert_array_equal(ep.actions, orig.actions)
        np.testing.assert_array_equal(ep.rewards, orig.rewards)
        assert ep.dones.tolist() == [0] * (len(orig) - 1) + [1]
        assert ep.success is True and ep.episode_return == len(orig)
    with h5py.File(path) as f:
        assert f["data"].attrs["total"] == 19
        assert f["data/demo_2"].attrs["num_samples"] == 7
        assert f["mask/train"].dtype.kind == "S"
    masks = read_masks(path)
    assert sorted(masks["train"] + masks["valid"]) == ["demo_0", "demo_1", "demo_2", "demo_3"]
    assert len(masks["valid"]) == 1
    assert read_env_args(path) == ENV_ARGS
    assert read_meta(path) == {"expert": "test", "noise": 0.1}


def test_write_rejects_bad_episodes_without_touching_existing_file(demo_file):
    path, episodes = demo_file
    before = path.read_bytes()
    bad = make_episode(4)
    bad.actions[2, 0] = 1.5
    with pytest.raises(DatasetError, match=r"demo_1/actions: values outside \[-1, 1\]"):
        write_demos(path, [episodes[0], bad], ENV_ARGS)
    assert path.read_bytes() == before
    assert list(path.parent.glob("*.tmp")) == []


def test_write_into_a_broken_data_symlink_is_one_clear_error(tmp_path):
    (tmp_path / "data").symlink_to(tmp_path / "gone")   # e.g. a data/ link to a folder that was removed
    with pytest.raises(DatasetError, match="not a folder"):
        write_demos(tmp_path / "data" / "demos" / "d.hdf5", [make_episode(3)], ENV_ARGS)


def _mutate(path, fn):
    with h5py.File(path, "a") as f:
        fn(f)


def _replace(f, key, value):
    del f[key]
    f[key] = value


CORRUPTIONS = {
    "missing data": (lambda f: f.move("data", "other"), r"missing 'data' group"),
    "no demos": (lambda f: [f["data"].pop(k) for k in list(f["data"])], r"no demos in data"),
    "missing actions": (lambda f: f["data/demo_1"].pop("actions"), r"data/demo_1/actions: missing"),
    "missing obs key": (lambda f: f.move("data/demo_2/obs/state", "data/demo_2/obs/other"),
                        r"data/demo_2/obs/state: missing obs key \(available: \['other'\]\)"),
    "length mismatch": (lambda f: _replace(f, "data/demo_0/obs/state", np.zeros((4, 3), np.float32)),
                        r"data/demo_0/obs: 4 observations but 5 actions"),
    "nan": (lambda f: _replace(f, "data/demo_3/obs/state", np.full((4, 3), np.nan, np.float32)),
            r"data/demo_3/obs: contains NaN or Inf \(first at step 0\)"),
    "inf action": (lambda f: f["data/demo_0/actions"].__setitem__((2, 1), np.inf),
                   r"data/demo_0/actions: contains NaN or Inf \(first at step 2\)"),
    "empty demo": (lambda f: [_replace(f, f"data/demo_1/{k}", np.zeros((0, d), np.float32))
                              for k, d in (("obs/state", 3), ("actions", 2))] + [
                       _replace(f, f"data/demo_1/{k}", np.zeros(0)) for k in ("rewards", "dones")],
                   r"data/demo_1: empty demo"),
    "action bounds": (lambda f: f["data/demo_2/actions"].__setitem__((6, 0), -3.0),
                      r"data/demo_2/actions: values outside \[-1, 1\].*first at step 6"),
    "dim mismatch between demos": (
        lambda f: _replace(f, "data/demo_1/obs/state", np.zeros((3, 5), np.float32)),
        r"data/demo_1/obs: obs dim 5, expected 3"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_read_names_file_demo_and_key_in_errors(demo_file, case):
    path, _ = demo_file
    fn, pattern = CORRUPTIONS[case]
    _mutate(path, fn)
    with pytest.raises(DatasetError, match=pattern) as err:
        read_demos(path)
    assert str(path) in str(err.value)


def test_read_file_level_errors(tmp_path, demo_file):
    missing = tmp_path / "nope.hdf5"
    with pytest.raises(DatasetError, match="does not exist"):
        read_demos(missing)
    text = tmp_path / "notes.hdf5"
    text.write_text("hello")
    with pytest.raises(DatasetError, match=f"{text}: not an HDF5 file"):
        DemoDataset(text)
    path, _ = demo_file
    with pytest.raises(DatasetError, match="action dim 2, expected 4"):
        read_demos(path, expected_act_dim=4)
    with pytest.raises(DatasetError, match=r"no mask/expert \(masks: \['train', 'valid'\]\)"):
        DemoDataset(path, filter_key="expert")
    assert issubclass(DatasetError, ValueError)


def test_windows_pad_obs_at_start_and_actions_at_end(demo_file):
    path, episodes = demo_file
    ds = DemoDataset(path, obs_horizon=3, action_horizon=4, filter_key=None)
    assert len(ds) == 19 and ds.num_episodes == 4
    item = ds[0]  # demo_0, t = 0
    assert item["obs"].shape == (3, 3) and item["action"].shape == (4, 2)
    assert item["obs"].dtype == torch.float32 and item["action"].dtype == torch.float32
    assert item["obs"][:, 0].tolist() == [0, 0, 0]
    np.testing.assert_allclose(item["action"][:, 0], [0.000, 0.001, 0.002, 0.003], atol=1e-7)
    assert item["action_mask"].tolist() == [True] * 4
    item = ds[1]
    assert item["obs"][:, 0].tolist() == [0, 0, 1]
    item = ds[3]  # demo_0, t = 3 of 5: actions 3, 4, then 4 repeated
    assert item["obs"][:, 0].tolist() == [1, 2, 3]
    np.testing.assert_allclose(item["action"][:, 0], [0.003, 0.004, 0.004, 0.004], atol=1e-7)
    assert item["action_mask"].tolist() == [True, True, False, False]
    item = ds[5]  # demo_1, t = 0: never looks back into demo_0
    assert item["obs"][:, 0].tolist() == [100, 100, 100]
    item = ds[7]  # demo_1, t = 2 (last step)
    np.testing.assert_allclose(item["action"][:, 0], [0.102] * 4, atol=1e-6)
    assert item["action_mask"].tolist() == [True, False, False, False]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=6)))
    assert batch["obs"].shape == (6, 3, 3) and batch["action"].shape == (6, 4, 2)
    np.testing.assert_allclose(ds.episode_returns(), [5, 3, 7, 4])


def test_train_valid_split_from_masks_and_stats_on_train(demo_file):
    path, episodes = demo_file
    masks = read_masks(path)
    train = DemoDataset(path, filter_key="train")
    valid = DemoDataset(path, filter_key="valid")
    assert [ep.name for ep in train.episodes] == sorted(masks["train"])
    assert [ep.name for ep in valid.episodes] == masks["valid"]
    assert len(train) + len(valid) == 19
    stats = train.stats()
    train_obs = np.concatenate([episodes[int(n[5:])].obs for n in masks["train"]])
    np.testing.assert_allclose(stats["obs"]["min"], train_obs.min(0))
    np.testing.assert_allclose(stats["obs"]["max"], train_obs.max(0))
    np.testing.assert_allclose(stats["obs"]["mean"], train_obs.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["obs"]["std"], train_obs.std(0), rtol=1e-5)
    assert stats["action"]["min"].shape == (2,)


def write_robomimic_style_file(path, lengths, with_masks):
    """A file in robomimic's own layout written with plain h5py (as robomimic's tools write them)."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for i, n in enumerate(lengths):
            g = data.create_group(f"demo_{i}")
            g["obs/robot0_eef_pos"] = rng.normal(size=(n, 3))
            g["obs/object"] = rng.normal(size=(n, 10))
            g["next_obs/robot0_eef_pos"] = rng.normal(size=(n, 3))
            g["next_obs/object"] = rng.normal(size=(n, 10))
            g["actions"] = rng.uniform(-1, 1, size=(n, 7))
            g["rewards"] = np.zeros(n)
            g["dones"] = np.eye(n)[-1].astype(np.int64)
            g["states"] = rng.normal(size=(n, 32))
            g.attrs["num_samples"] = n
        data.attrs["total"] = sum(lengths)
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {"robots": ["Panda"]}})
        if with_masks:
            f["mask/train"] = np.array([b"demo_0", b"demo_2"])
            f["mask/valid"] = np.array([b"demo_1"])


def test_reads_robomimic_layout_file_written_with_h5py(tmp_path):
    path = tmp_path / "low_dim.hdf5"
    write_robomimic_style_file(path, [6, 4, 5], with_masks=True)
    ds = DemoDataset(path, obs_horizon=2, action_horizon=3, obs_keys=["object", "robot0_eef_pos"])
    assert [ep.name for ep in ds.episodes] == ["demo_0", "demo_2"]
    assert ds.obs_dim == 13 and ds.act_dim == 7 and len(ds) == 11
    with h5py.File(path) as f:
        expected = np.concatenate([f["data/demo_2/obs/object"][()], f["data/demo_2/obs/robot0_eef_pos"][()]], 1)
    np.testing.assert_allclose(ds[6]["obs"][1].numpy(), expected[0], rtol=1e-6)
    assert read_env_args(path)["env_name"] == "Lift" and read_meta(path) == {}


def test_without_masks_split_is_seeded_fraction(tmp_path):
    path = tmp_path / "nomask.hdf5"
    write_robomimic_style_file(path, [3, 3, 3, 3, 3, 3, 3, 3, 3, 3], with_masks=False)
    kwargs = {"obs_keys": ["object"], "valid_fraction": 0.2, "split_seed": 3}
    train = [ep.name for ep in DemoDataset(path, filter_key="train", **kwargs).episodes]
    valid = [ep.name for ep in DemoDataset(path, filter_key="valid", **kwargs).episodes]
    assert len(train) == 8 and len(valid) == 2 and not set(train) & set(valid)
    assert valid == [ep.name for ep in DemoDataset(path, filter_key="valid", **kwargs).episodes]
    other = [ep.name for ep in DemoDataset(path, filter_key="valid", obs_keys=["object"], valid_fraction=0.2,
                                           split_seed=4).episodes]
    assert len(other) == 2
    assert len(DemoDataset(path, filter_key=None, obs_keys=["object"]).episodes) == 10


def test_robomimic_sequence_dataset_reads_our_file(demo_file):
    import robomimic.utils.obs_utils as obs_utils
    from robomimic.utils.dataset import SequenceDataset

    path, episodes = demo_file
    obs_utils.initialize_obs_utils_with_obs_specs({"obs": {"low_dim": ["state"], "rgb": []}})
    ds = SequenceDataset(
        hdf5_path=str(path), obs_keys=["state"], dataset_keys=["actions", "rewards", "dones"],
        frame_stack=1, seq_length=2, pad_frame_stack=True, pad_seq_length=True,
        hdf5_cache_mode="low_dim", filter_by_attribute="train", hdf5_use_swmr=False,
    )
    train_names = sorted(read_masks(path)["train"])
    assert ds.n_demos == len(train_names)
    assert len(ds) == sum(len(episodes[int(n[5:])]) for n in train_names)
    item = ds[0]
    first = episodes[int(train_names[0][5:])]
    np.testing.assert_allclose(item["obs"]["state"][0], first.obs[0])
    np.testing.assert_allclose(item["actions"], first.actions[:2])
    np.testing.assert_allclose(item["next_obs"]["state"][0], first.next_obs[0])
