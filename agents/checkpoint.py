"""Checkpoints that never lose work: self-describing directories, written atomically, verified on load,
loaded without unpickling code; plus the run-directory lock, atomic file writes, Ctrl-C handling and seeding
that every training stage shares.

This module re-exports them from where they live: :mod:`agents.runfiles` (errors, atomic writes,
``read_json``, ``RunLock``, Ctrl-C, seeds, RNG state), :mod:`agents.checkpoint_save` (the format and
:func:`save_checkpoint`) and :mod:`agents.checkpoint_load` (start of a run, resolving, verifying, loading).

Layout of ``<run>/checkpoints/step_<N>/``::

    config.yaml           what to rebuild (policy spec, dims, horizons) + format version + library versions
    model.safetensors     policy parameters and buffers (the normalizer statistics are buffers)
    env_meta.json         the environment the policy was trained for
    training_state.pt     optimizer/scheduler/EMA/RNG/step for exact resume; tensors and plain containers
                          only, loaded with ``torch.load(weights_only=True)``
    extra/*.safetensors   further modules (EMA weights, noise network, critic, ...)
    manifest.json         size and sha256 of every file above (and a checksum of itself), verified on load

The save sequence (:func:`save_checkpoint`): write everything into a hidden temporary directory, hash it into
the manifest, fsync, rename it to a name not in use (``step_<N>``, or ``step_<N>-<k>`` when step N is saved
again), swap the ``last``/``best`` symbolic links with ``os.replace``, and only then remove the superseded copy
of the same step and prune. A process killed at any point leaves ``last`` pointing at a complete checkpoint
(at worst the previous one) plus temporaries, which :func:`open_checkpoints` removes at the next start.
Loading a run directory or a ``checkpoints/`` folder uses ``last`` and falls back to the newest intact
``step_*`` (one printed line) when ``last`` is dangling, missing or corrupt.
"""

from .checkpoint_load import (
    clean_stale,
    load_checkpoint,
    open_checkpoints,
    resolve,
    verify_checkpoint,
)
from .checkpoint_save import (
    FORMAT_VERSION,
    MANIFEST,
    TAGS,
    save_checkpoint,
    tag_checkpoint,
    write_manifest,
)
from .runfiles import (
    LOCK_FILE,
    CheckpointCorrupt,
    CheckpointError,
    RunLock,
    RunLockedError,
    StopOnInterrupt,
    TrainingInterrupted,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    rng_state,
    say,
    seed_everything,
    set_rng_state,
    stop_requested,
)

__all__ = [
    "FORMAT_VERSION",
    "LOCK_FILE",
    "MANIFEST",
    "TAGS",
    "CheckpointCorrupt",
    "CheckpointError",
    "RunLock",
    "RunLockedError",
    "StopOnInterrupt",
    "TrainingInterrupted",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "clean_stale",
    "load_checkpoint",
    "open_checkpoints",
    "read_json",
    "resolve",
    "rng_state",
    "save_checkpoint",
    "say",
    "seed_everything",
    "set_rng_state",
    "stop_requested",
    "tag_checkpoint",
    "verify_checkpoint",
    "write_manifest",
]
