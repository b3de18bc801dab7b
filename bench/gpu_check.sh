#!/usr/bin/env bash
# The GPU machine's checks, as one prepared script per device call (issues 13 and 15).
#
#   bash bench/gpu_check.sh 1   # cuda-marked tests, bench.latency (CPU + CUDA, Hopper 16 async envs),
#                               # bench.finetune: ReFlow/Gaussian on CPU vs on CUDA with 16 env workers, SB3 PPO
#   bash bench/gpu_check.sh 2   # bench.scaling with 1, 2, 4, 8, 16 processes (fine-tuning: 2 envs per process)
#
# Run from the project root on the GPU machine after the setup lines of shared/gpu/README.md (wheels, GL
# loaders; carry data/ for the cached demos). Logs go to $OUT, the results folders to $OUT/results_<part>.tgz
# (the device tool brings back at most 8 files). DRY=1 runs the same plumbing on a CPU machine at toy sizes.
set -u
part=${1:-1}
OUT=${OUT:-/tmp/gpu_check_out}
RES=/tmp/gpu_check_res_$part
mkdir -p "$OUT" "$RES"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/timeline_$part.txt"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; echo "cpus $(nproc)";
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/machine.txt"
if [[ ${DRY:-0} == 1 ]]; then
  steps=20000; pre=100; dev=cpu; lat="--batches 1 --ks 1 4 --num-envs 4"; procs="1 2"; sc="--steps 20 --ft-iterations 1"
else
  steps=100000; pre=3000; dev=cuda; lat="--num-envs 16 --rollout-device cuda"; procs="1 2 4 8 16"
  sc="--steps 200 --ft-iterations 3"
fi
if [[ $part == 1 ]]; then
  log "cuda tests"
  timeout 200 python3 -m pytest -m cuda tests/test_cuda.py tests/test_devices.py -p no:cacheprovider -rs \
    > "$OUT/pytest_cuda.log" 2>&1; echo "rc $?" >> "$OUT/pytest_cuda.log"; tail -3 "$OUT/pytest_cuda.log"
  log "latency"
  timeout 150 python3 -m bench.latency --budget small --rollout-env Hopper-v5 --async-envs $lat --out "$RES" \
    > "$OUT/latency.log" 2>&1; echo "rc $?" >> "$OUT/latency.log"; tail -1 "$OUT/latency.log"
  log "finetune"
  timeout 260 python3 -m bench.finetune --task hopper_medium --budget full --env-steps $steps --pretrain-steps $pre \
    --seeds 0 --methods reflow gaussian sb3_ppo --variant gpu:device=$dev,async_envs=true --workers 3 \
    --eval-episodes 10 --eval-points 1 --out "$RES" --work /tmp/gpu_check_work > "$OUT/finetune.log" 2>&1
  echo "rc $?" >> "$OUT/finetune.log"; tail -1 "$OUT/finetune.log"
else
  log "scaling"
  timeout 400 python3 -m bench.scaling --procs $procs --ft-envs 2 --ft-weak --repeats 1 $sc --out "$RES" \
    > "$OUT/scaling.log" 2>&1; echo "rc $?" >> "$OUT/scaling.log"; tail -1 "$OUT/scaling.log"
fi
log "done"
tar czf "$OUT/results_$part.tgz" -C "$RES" .
