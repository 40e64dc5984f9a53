# Sourced by the gpu_*.sh scripts: the environment of one call of a lent single-GPU machine (PyTorch there, no
# FFCV, no MLflow, no network). FFCV (and MLflow, when bundled) come as wheels in .whl/ built or downloaded for that
# machine's Python, FFCV's C libraries in .gpulibs/, both made by benchmarks/gpu_bundle.sh on the build machine.
# Logs go to $OUT. DRY_RUN=1: install and measure nothing, each stage only prints its command (for the CPU).
# DEADLINE=N: every stage ends by N seconds after the script started (its limit is cut to fit; a stage with less
# than MIN_STAGE seconds left is skipped).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
DRY_RUN=${DRY_RUN:-0}
DEADLINE=${DEADLINE:-0}
MIN_STAGE=${MIN_STAGE:-20}
STAGES=()  # "name exit seconds" of each stage, for a summary
if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: nothing is installed or measured; each stage prints its command"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
    if [ -d .whl ]; then
        t0=$SECONDS
        "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
        # bytecode once, in parallel, instead of in the first process that imports each module
        "$PY" -m compileall -q -j 0 /tmp/site > /dev/null
        echo "installed $(ls .whl/*.whl | wc -l) wheels into /tmp/site in $((SECONDS - t0)) s"
        export PYTHONPATH=/tmp/site
    fi
    [ -d .gpulibs ] && export LD_LIBRARY_PATH=$PWD/.gpulibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    "$PY" -c "import torch, ffcv, numba, numpy; print('torch', torch.__version__, 'ffcv', ffcv.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)"
fi

stage() {  # stage NAME SECONDS CMD...: run with a time limit (a slow stage leaves the others' numbers), log it
    local name=$1 limit=$2; shift 2
    if [ "$DEADLINE" -gt 0 ]; then
        local left=$((DEADLINE - SECONDS))
        if [ "$left" -lt "$MIN_STAGE" ]; then
            echo "=== $name: skipped, ${left} s left before the deadline (${DEADLINE} s)"
            STAGES+=("$name skipped 0")
            return 0
        fi
        [ "$limit" -gt "$left" ] && limit=$left
    fi
    echo "=== $name (limit ${limit}s): $*"
    if [ "$DRY_RUN" = 1 ]; then
        echo "(dry run) $*" > "$OUT/$name.log"
        STAGES+=("$name dry-run 0")
        return 0
    fi
    local t0=$SECONDS
    # the group gets TERM at the limit (the trainer checkpoints and exits), KILL 15 s later
    timeout -k 15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    STAGES+=("$name $rc $((SECONDS - t0))")
}

prep_data() {  # the full-size synthetic set (CIFAR-100 itself cannot be fetched there); extra data_prep flags
    stage prep 90 "$PY" -m data_prep --source synthetic --synthetic-train 50000 --synthetic-test 10000 \
        --out /tmp/data --workers 8 "$@"
}
train=("$PY" -m ddp_train --data-dir /tmp/data --no-mlflow --warmup-epochs 1 --num-workers 12 --out-dir /tmp/runs
       --progress line)
