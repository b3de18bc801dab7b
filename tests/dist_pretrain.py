"""Worker script for tests/test_distributed.py, launched with torchrun: BC pretraining under N ranks.

    torchrun --standalone --nproc_per_node 2 tests/dist_pretrain.py CONFIG.json OUT.pt [--sigint-at N]
        [--die-at N] [--rank R]

CONFIG.json holds PretrainConfig fields. Rank 0 writes the final parameters to OUT.pt. ``--sigint-at N``
delivers a real Ctrl-C to rank R (default 1) during step N; ``--die-at N`` kills rank R there (os._exit).
"""

import argparse
import json
import os
import signal
import sys

import torch

from agents import distributed
from agents.pretrain import PretrainConfig, Pretrainer, TrainingInterrupted


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("--sigint-at", type=int, default=None)
    p.add_argument("--die-at", type=int, default=None)
    p.add_argument("--rank", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(1)
    info = distributed.init("cpu")
    tr = Pretrainer(PretrainConfig(**json.loads(open(a.config).read())))
    orig = tr.policy.loss

    def loss(batch, **kw):
        if info.rank == a.rank and a.sigint_at is not None and tr.step == a.sigint_at - 1:
            os.kill(os.getpid(), signal.SIGINT)
        if info.rank == a.rank and a.die_at is not None and tr.step == a.die_at - 1:
            os._exit(17)
        return orig(batch, **kw)

    tr.policy.loss = loss
    try:
        tr.run()
    except TrainingInterrupted as err:
        print(f"rank {info.rank}: {err}", file=sys.stderr)
    if info.is_main:
        torch.save({"step": tr.step, "params": [q.detach().clone() for q in tr.policy.parameters()]}, a.out)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    distributed.exit_process(main())
