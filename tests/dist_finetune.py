"""Worker script for tests/test_distributed.py, launched with torchrun: PPO fine-tuning under N ranks.

    torchrun --standalone --nproc_per_node 2 tests/dist_finetune.py KIND NUM_ENVS ITERATIONS OUT.pt

Each rank steps NUM_ENVS / N PointReach envs (tests/test_finetune.py); rank 0 writes the actor's and the
critic's parameters, the last iteration's metrics and an evaluation (4 eval envs in all) to OUT.pt. With
N = 1 (no torchrun) it is the one-process reference.
"""

import sys

import torch
from test_finetune import make_envs, make_policy

from agents import distributed
from agents.finetune import FinetuneConfig, ReinFlowPPO


def main() -> int:
    kind, num_envs, iterations, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    info = distributed.init("cpu")
    # 6 envs x 8 chunk steps = 48 samples in minibatches of 47 and 1: one rank's share of the last is empty
    cfg = FinetuneConfig(num_envs=num_envs, n_steps=8, denoise_steps=2, minibatch_size=47, update_epochs=2,
                         critic_warmup_iters=0, eval_every=0, seed=0, critic_hidden=(32, 32), noise_hidden=32,
                         clip_coef=0.05)
    agent = ReinFlowPPO(make_policy(kind), make_envs(num_envs // info.world_size),
                        make_envs(4 // info.world_size), cfg)
    metrics = {}
    for _ in range(iterations):
        metrics = agent.train_iteration()
    metrics.update(agent.evaluate(5))  # 5 episodes on 4 eval envs: the spare one goes to rank 0's first env
    if info.is_main:
        torch.save({"actor": [p.detach().clone() for p in agent.actor.parameters()],
                    "critic": [p.detach().clone() for p in agent.critic.parameters()],
                    "env_steps": agent.env_steps, "episodes": agent.episodes, "metrics": metrics}, out)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    distributed.exit_process(main())
