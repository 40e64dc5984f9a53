#!/usr/bin/env bash
# Throughput on one GPU (docs/performance.md): the training step alone, per precision / memory format / compile
# (gpu_step.py), then the whole trainer with the FFCV loader, eager and compiled.
source "$(dirname "$0")/gpu_env.sh"
stage step_resnet18 200 python3 benchmarks/gpu_step.py --json "$OUT/step_resnet18.json"
stage step_seed2018 40 python3 benchmarks/gpu_step.py --model seed2018 --batch 256 --only default \
    --json "$OUT/step_seed2018.json"
prep_data
stage train_eager 120 python3 -m torch.distributed.run --standalone --nproc_per_node=1 "${train[@]:1}" \
    --epochs 5 --run-name eager
stage train_compile 150 "${train[@]}" --epochs 3 --run-name compiled --compile
