# Sourced by the gpu_*.sh scripts: the environment of one call of a lent single-GPU machine (PyTorch there, no
# FFCV, no network). FFCV comes as wheels in .whl/ (built for that machine's Python) and its C libraries in
# .gpulibs/, both made by benchmarks/gpu_bundle.sh on the build machine. Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
[ -d .gpulibs ] && export LD_LIBRARY_PATH=$PWD/.gpulibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 -c "import torch, ffcv, numba, numpy; print('torch', torch.__version__, 'ffcv', ffcv.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)"

stage() {  # stage NAME SECONDS CMD...: run with a time limit (a slow stage leaves the others' numbers), log it
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

prep_data() {  # the full-size synthetic set (CIFAR-100 itself cannot be fetched there)
    stage prep 60 python3 -m data_prep --source synthetic --synthetic-train 50000 --synthetic-test 10000 \
        --out /tmp/data --workers 16
}
train=(python3 -m ddp_train --data-dir /tmp/data --no-mlflow --warmup-epochs 1 --num-workers 12 --out-dir /tmp/runs
       --progress line)
