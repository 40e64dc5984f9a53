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
#   default40  make train's command (ddp_train.launch → torchrun) for the 40-epoch default recipe, then the same with
#              --fused-sgd (DEFAULT40_VARIANTS), MLflow on (a sqlite store) when MLflow imports there, else
#              --no-mlflow; their time budgets
#   compile    gpu_step.py, torch.compile default and reduce-overhead, twice: the second run finds the Inductor
#              caches of the first (TORCHINDUCTOR_CACHE_DIR)
#   autotune   gpu_step.py, max-autotune-no-cudagraphs, twice likewise
#   calib      the default recipe, 40 epochs, on the synthetic set at each of CALIB_LEVELS (default 0.75 1.25),
#              side by side: with default40 (at DIFFICULTY, default hard) it calibrates the synthetic difficulty
# Knobs: DIFFICULTY, CALIB_LEVELS, PEERS_EPOCHS, PLAIN_EPOCHS, GRAPH_BATCHES, GRAPH_ALSO, *_LIMIT (seconds).
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
want graph && step graph "${GRAPH_LIMIT:-120}" --only "CUDA graph,(default)${GRAPH_ALSO:+,$GRAPH_ALSO}" \
    --batch "${GRAPH_BATCHES:-512,256,128,64}"

# The synthetic set at DIFFICULTY (data_prep's --synthetic-difficulty); with calib, also at each of CALIB_LEVELS,
# prepared at once so the preps share the CPUs while the GPU is idle.
if want peers || want default40 || want calib; then
    levels=(); want calib && levels=(${CALIB_LEVELS:-0.75 1.25})
    preps=()
    for L in "${levels[@]}"; do
        [ "$DRY_RUN" = 1 ] && continue
        "$PY" -m data_prep --source synthetic --synthetic-train 50000 --synthetic-test 10000 \
            --synthetic-difficulty "$L" --out "/tmp/data-L$L" --workers 4 > "$W/prep-L$L.log" 2>&1 &
        preps+=($!)
    done
    prep_data --synthetic-difficulty "${DIFFICULTY:-hard}"
    [ ${#preps[@]} = 0 ] || wait "${preps[@]}"  # not a bare wait: it would wait for the tee above too
fi
if want default40; then
    # make train's launcher asks nvidia-smi for the GPUs: is that most of its 2.0 s before the trainer starts?
    if [ "$DRY_RUN" != 1 ] && command -v nvidia-smi > /dev/null; then
        t0=$EPOCHREALTIME
        nvidia-smi --query-gpu=name --format=csv,noheader > /dev/null 2>&1
        echo "default40: nvidia-smi --query-gpu=name took $(awk "BEGIN {printf \"%.2f\", $EPOCHREALTIME - $t0}") s" \
            | tee "$W/nvidia_smi_time.txt"
    fi
    mlflow=(--no-mlflow)
    if [ "$DRY_RUN" != 1 ] && "$PY" -c "import mlflow, mlflow.pytorch, sqlalchemy, alembic; print('mlflow', \
mlflow.__version__)" > "$W/mlflow_import.log" 2>&1; then
        mlflow=()
        export MLFLOW_TRACKING_URI=sqlite:///$W/mlflow.db MLFLOW_EXPERIMENT_NAME=gpu-session
    fi
    echo "default40: MLflow $([ ${#mlflow[@]} = 0 ] && echo "on ($MLFLOW_TRACKING_URI)" || echo "off (no usable \
MLflow: $W/mlflow_import.log)")"
    # Each round runs every variant of DEFAULT40_VARIANTS in turn (default: the default recipe, then the same with
    # --fused-sgd, the candidate default: issue 8 wants the whole trainer's numbers, warm-up included, before it
    # changes); DEFAULT40_RUNS=2: a second round into the same MLflow store (a store that exists, as in steady use).
    for i in $(seq "${DEFAULT40_RUNS:-1}"); do
        for variant in ${DEFAULT40_VARIANTS:-default fused}; do
            case $variant in default) extra=() ;; fused) extra=(--fused-sgd) ;;
                *) echo "error: DEFAULT40_VARIANTS: unknown variant $variant (default, fused)"; BAD=1; continue ;; esac
            name=default40$([ "$variant" = default ] || echo "-$variant")$([ "$i" = 1 ] || echo "-$i")
            t0=$EPOCHREALTIME
            stage "$name" "${DEFAULT40_LIMIT:-200}" "$PY" -m ddp_train.launch --data-dir /tmp/data -- --epochs 40 \
                --out-dir "$W/runs" --run-name "$name" --progress line "${mlflow[@]}" "${extra[@]}"
            echo "$name: $(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $t0}") s wall from the launch command to its \
exit" | tee "$W/${name}_wall.txt"
            pack
        done
    done
fi
if want peers; then
    peers=("$PY" benchmarks/peers.py --data-dir /tmp/data --out "$W/peers" --epochs "${PEERS_EPOCHS:-40}"
           --plain-epochs "${PLAIN_EPOCHS:-5}" --workers 12)
    if [ "$DRY_RUN" = 1 ] && ! "${peers[@]}" --plan > "$W/peers.plan"; then
        echo "error: stage peers: peers.py rejects its arguments"
        BAD=1
    fi
    stage peers "${PEERS_LIMIT:-300}" "${peers[@]}"
    pack
fi
if want calib; then  # the default recipe at the other levels, side by side on the GPU (their speed is not measured)
    calib=()
    for L in ${CALIB_LEVELS:-0.75 1.25}; do
        calib+=("$PY -m ddp_train --data-dir /tmp/data-L$L --no-mlflow --out-dir $W/runs --run-name calib-L$L \
--progress line --num-workers 8 > $W/calib-L$L.log 2>&1 &")
    done
    stage calib "${CALIB_LIMIT:-200}" bash -c "${calib[*]} wait; grep -h 'epoch 39 |' $W/calib-L*.log"
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
if (w / "nvidia_smi_time.txt").is_file():
    print("\n" + (w / "nvidia_smi_time.txt").read_text().strip())
if (w / "peers" / "peers.md").is_file():
    print("\npeers:\n" + (w / "peers" / "peers.md").read_text())
for budget in sorted(w.glob("runs/default40*/time_budget.csv")):
    name = budget.parent.name
    last = [line for line in (w / "logs" / f"{name}.log").read_text().splitlines() if line.startswith("epoch 39 |")]
    print(f"{name} time budget ({last[-1][:110] if last else 'no epoch 39'}):")
    for row in csv.DictReader(budget.open()):
        print(f"  {row['description']:50s} {float(row['seconds']):8.2f} s")
    if (w / f"{name}_wall.txt").is_file():
        print("  " + (w / f"{name}_wall.txt").read_text().strip())
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
