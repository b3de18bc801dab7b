"""robomimic's own training entry point (``python -m robomimic.scripts.train``) trains on a file we wrote.

It needs a torchvision build that matches torch (robomimic imports it at load time); the README's install
pins such a pair. Elsewhere (a CPU torch beside a CUDA torchvision) the test skips with the reason.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from envs.hdf5 import Episode, write_demos


def _torchvision_problem() -> str | None:
    try:
        import torchvision.ops  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means robomimic's scripts cannot run
        return f"torchvision does not import beside this torch ({err}); install the README's torch/torchvision pair"
    return None


@pytest.mark.skipif(_torchvision_problem() is not None, reason=str(_torchvision_problem()))
def test_robomimic_train_script_trains_bc_on_our_hdf5(tmp_path):
    rng = np.random.default_rng(0)
    episodes = [Episode(obs=rng.uniform(-1, 1, (30, 3)).astype(np.float32),
                        actions=rng.uniform(-1, 1, (30, 2)).astype(np.float32), rewards=np.zeros(30, np.float32))
                for _ in range(6)]
    path = write_demos(tmp_path / "demos.hdf5", episodes, {"env_name": "synthetic", "type": 2, "env_kwargs": {}})
    from robomimic.config import config_factory

    cfg = config_factory("bc")
    with cfg.values_unlocked():
        cfg.train.data = str(path)
        cfg.train.output_dir = str(tmp_path / "out")
        cfg.train.num_epochs = 2
        cfg.train.batch_size = 16
        cfg.train.cuda = False
        cfg.train.hdf5_cache_mode = None
        cfg.experiment.epoch_every_n_steps = 5
        cfg.experiment.validate = False
        cfg.experiment.rollout.enabled = False
        cfg.experiment.render_video = False
        cfg.experiment.logging.log_tb = False
        cfg.experiment.save.enabled = False
        cfg.observation.modalities.obs.low_dim = ["state"]
        cfg.observation.modalities.obs.rgb = []
    (tmp_path / "bc.json").write_text(cfg.dump())
    res = subprocess.run([sys.executable, "-m", "robomimic.scripts.train", "--config", str(tmp_path / "bc.json")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "Train Epoch 2" in out and "finished run successfully" in out
    assert "num_demos=6" in out  # it read our six demos through its own SequenceDataset
