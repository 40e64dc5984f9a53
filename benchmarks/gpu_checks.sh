#!/usr/bin/env bash
# What the CPU tests cannot show, on one GPU (docs/performance.md): why --compile is slower end to end than its
# step benchmark, the fp16+GradScaler path, and whether --deterministic runs repeat and resume exactly on CUDA.
source "$(dirname "$0")/gpu_env.sh"
prep_data
TORCH_LOGS=recompiles,graph_breaks stage compile_logs 120 "${train[@]}" --epochs 4 --run-name compiled --compile
stage fp16 60 "${train[@]}" --epochs 3 --run-name fp16 --amp fp16
det=("${train[@]}" --epochs 4 --deterministic)
stage det_a 60 "${det[@]}" --run-name det_a
stage det_b 60 "${det[@]}" --run-name det_b
stage nondet_a 60 "${train[@]}" --epochs 4 --run-name nondet_a
stage nondet_b 60 "${train[@]}" --epochs 4 --run-name nondet_b
# interrupted by SIGUSR2 part-way (the trainer checkpoints and exits 3), then the same command resumes it
"${det[@]}" --run-name det_resumed > "$OUT/det_resumed_1.log" 2>&1 &
pid=$!
for _ in $(seq 600); do grep -q '^epoch 1 |' "$OUT/det_resumed_1.log" && break; sleep 0.1; done
kill -USR2 $pid; wait $pid; echo "=== interrupted run: exit $? (3: checkpointed for a requeue)"
tail -2 "$OUT/det_resumed_1.log"
stage det_resumed_2 60 "${det[@]}" --run-name det_resumed
python3 - <<'PY'
import torch
for name in ("det_a", "det_b", "det_resumed", "nondet_a", "nondet_b"):
    m = torch.load(f"/tmp/runs/{name}/model.pt", weights_only=False)
    w = torch.cat([t.flatten().double() for t in m["model"].values() if t.is_floating_point()])
    print(f"{name:12s} train_loss {m['metrics']['train_loss']!r:22} test_loss {m['metrics']['test_loss']!r:22} "
          f"weights sum {w.sum().item()!r} norm {w.norm().item()!r}")
PY
