#!/usr/bin/env bash
# One GPU session for issue 8, run once: everything the issue asks to be measured, into $OUT.
#   here first:   benchmarks/gpu_bundle.sh      (FFCV and MLflow wheels for Python 3.12, FFCV's C libraries)
#   there:        bash benchmarks/gpu_session.sh   (device tool: carry .whl and .gpulibs, timeout_s 600)
# Stages, most important first, each with its own time limit, all cut to end by DEADLINE seconds (default 480,
# leaving a 15-minute device budget room for a machine start and a partial rerun):
#   variants   gpu_step.py, every eager variant: precision, memory format, SGD foreach/fused, DDP options
#   graph      gpu_step.py, the default step and both CUDA-graph variants at per-GPU batch 512, 256, 128, 64
#   peers      peers.py on the full-size synthetic set: the trainer with each loader for 40 epochs, the plain
#              DataLoader loop, the step alone
#   default40  make train's command (ddp_train.launch → torchrun) for the 40-epoch default recipe, MLflow on (a
#              sqlite store) when MLflow imports there, else --no-mlflow; its time budget
#   compile    gpu_step.py, torch.compile default and reduce-overhead, twice: the second run finds the Inductor
#              caches of the first (TORCHINDUCTOR_CACHE_DIR)
#   autotune   gpu_step.py, max-autotune-no-cudagraphs, twice likewise
# Expected on one H100/H200 (estimated from earlier runs, not measured as a whole): ~550 s for all stages, so the
# deadline usually cuts the last ones; a second call, on a fresh machine (a warm one goes back after 30 s idle),
# finishes them: PARTS="compile autotune" DEADLINE=200 bash benchmarks/gpu_session.sh (timeout_s 300).
# PARTS picks any subset. DRY_RUN=1 (any machine): checks each stage's arguments (gpu_step.py --list,
# peers.py --plan) and prints its command; nothing is installed or measured.
# $OUT gets summary.txt (also printed last), peers.md, peers.json and session.tar.gz (every log, JSON and time
# budget, re-packed after each stage, so a session stopped at its limit still returns what it measured).
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-/tmp/gpu-out}
W=${WORK:-/tmp/session}
PARTS=${PARTS:-variants graph peers default40 compile autotune}
export DEADLINE=${DEADLINE:-480}
mkdir -p "$FINAL" && rm -rf "$W" && mkdir -p "$W"
exec > >(tee -a "$W/session.log") 2>&1
echo "gpu_session: parts '$PARTS', deadline ${DEADLINE} s, results in $FINAL"
OUT=$W/logs  # the stages' logs; $FINAL is what the device returns
source benchmarks/gpu_env.sh
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
echo "Inductor caches in $TORCHINDUCTOR_CACHE_DIR ($([ -d "$TORCHINDUCTOR_CACHE_DIR" ] && echo 'exists: warm' ||
    echo 'new: cold'))"
BAD=0
declare -A LISTED

want() { [[ " $PARTS " == *" $1 "* ]]; }

pack() {  # everything so far into $FINAL (the device returns at most 8 files: keep to 4)
    [ -f "$W/peers/peers.json" ] && cp "$W/peers/peers.json" "$W/peers/peers.md" "$FINAL/"
    tar czf "$FINAL/session.tar.gz" -C "$W" --exclude='*.pt' --exclude=checkpoints --exclude=mlartifacts .
}

step() {  # step NAME LIMIT ARGS...: gpu_step.py ARGS, its results in $W/NAME.json
    local name=$1 limit=$2; shift 2
    if [ "$DRY_RUN" = 1 ] && [ -z "${LISTED[$*]:-}" ]; then  # once per distinct selection
        LISTED[$*]=1
        "$PY" benchmarks/gpu_step.py "$@" --list > "$W/$name.variants" \
            || { echo "error: stage $name: gpu_step.py $* selects no variant"; BAD=1; }
    fi
    stage "$name" "$limit" "$PY" benchmarks/gpu_step.py "$@" --json "$W/$name.json"
    pack
}

want variants && step variants 150 --skip "compile,CUDA graph"
want graph && step graph 120 --only "CUDA graph,(default)" --batch 512,256,128,64

if want peers || want default40; then
    prep_data
fi
if want peers; then
    peers=("$PY" benchmarks/peers.py --data-dir /tmp/data --out "$W/peers" --epochs 40 --plain-epochs 5 --workers 12)
    if [ "$DRY_RUN" = 1 ] && ! "${peers[@]}" --plan > "$W/peers.plan"; then
        echo "error: stage peers: peers.py rejects its arguments"
        BAD=1
    fi
    stage peers 300 "${peers[@]}"
    pack
fi
if want default40; then
    mlflow=(--no-mlflow)
    if [ "$DRY_RUN" != 1 ] && "$PY" -c "import mlflow, mlflow.pytorch, sqlalchemy, alembic; print('mlflow', \
mlflow.__version__)" > "$W/mlflow_import.log" 2>&1; then
        mlflow=()
        export MLFLOW_TRACKING_URI=sqlite:///$W/mlflow.db MLFLOW_EXPERIMENT_NAME=gpu-session
    fi
    echo "default40: MLflow $([ ${#mlflow[@]} = 0 ] && echo "on ($MLFLOW_TRACKING_URI)" || echo "off (no usable \
MLflow: $W/mlflow_import.log)")"
    t0=$EPOCHREALTIME
    stage default40 200 "$PY" -m ddp_train.launch --data-dir /tmp/data -- --epochs 40 --out-dir "$W/runs" \
        --run-name default40 --progress line "${mlflow[@]}"
    echo "default40: $(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $t0}") s wall from the launch command to its exit" \
        | tee "$W/default40_wall.txt"
    pack
fi
if want compile; then
    step compile_1 150 --only "channels_last compile,reduce-overhead"
    step compile_2 100 --only "channels_last compile,reduce-overhead"
fi
if want autotune; then
    step autotune_1 200 --only max-autotune
    step autotune_2 100 --only max-autotune
fi

echo "=== summary"
{
    echo "stages (name, exit, seconds): ${STAGES[*]/%/;}"
    "$PY" - "$W" <<'PY'
import csv, json, sys
from pathlib import Path
w = Path(sys.argv[1])
for f in sorted(w.glob("*.json")):
    d = json.loads(f.read_text())
    print(f"\n{f.stem}: {d['device']}, torch {d['torch']}, matmul peak {d['bf16_peak_flops'] / 1e12:.0f} TFLOP/s")
    for r in d["results"]:
        print(f"  {r['variant']:44s} b{r['batch']:<4d} {r['images_per_s']:8.0f} img/s {r['s_per_step'] * 1e3:6.2f} ms"
              f"  MFU {100 * r['mfu']:5.1f} %  warm-up {r['warmup_s']:5.1f} s  loss {r['loss_last']:.3f}")
    for r in d["failed"]:
        print(f"  {r['variant']:44s} FAILED: {r['error'][:150]}")
if (w / "peers" / "peers.md").is_file():
    print("\npeers:\n" + (w / "peers" / "peers.md").read_text())
budget = w / "runs" / "default40" / "time_budget.csv"
if budget.is_file():
    print("default40 time budget:")
    for row in csv.DictReader(budget.open()):
        print(f"  {row['description']:50s} {float(row['seconds']):8.2f} s")
    if (w / "default40_wall.txt").is_file():
        print("  " + (w / "default40_wall.txt").read_text().strip())
PY
} > "$W/summary.txt" 2>&1
cp "$W/summary.txt" "$FINAL/summary.txt"
pack
cat "$W/summary.txt"
for s in "${STAGES[@]}"; do
    read -r name rc _ <<< "$s"
    [[ $rc == skipped ]] && echo "stage $name: skipped (the deadline came first; rerun it with PARTS)"
    [[ $rc == 0 || $rc == dry-run || $rc == skipped ]] || { echo "stage $name: exit $rc"; BAD=1; }
done
exit $BAD
