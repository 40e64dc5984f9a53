#!/usr/bin/env bash
# Makes what gpu_env.sh installs on a GPU machine that has PyTorch but neither FFCV, MLflow nor a network:
#   .whl/      FFCV built here for that machine's Python (PY, default python3.12) and FFCV's pure-Python needs;
#              MLflow 3.17.2 and the part of its dependencies that machine's image lacks, as wheels for CPython 3.12
#              on x86-64 Linux (MLFLOW=0 leaves MLflow out);
#   .gpulibs/  the C libraries FFCV's extension links to (OpenCV, turbojpeg and theirs), copied from this machine.
# Both are ignored by git (.git/info/exclude); carry them with the call (at most 64 MiB travel with the tree). Needs
# FFCV's system libraries here (make setup installs them) and PY with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3.12}
MLFLOW=${MLFLOW:-1}
if ! "$PY" -V > /dev/null 2>&1 && command -v pyenv > /dev/null; then  # pyenv keeps 3.12 off the PATH here
    PY=$(ls -d "$(pyenv root)"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
fi
"$PY" -V
# In the lent machines' image already (its package list, read 2026-11-17), so not carried: a second copy would
# shadow the image's own on PYTHONPATH. If the image loses one, gpu_session.sh's import check says so.
ON_DEVICE=" aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click cloudpickle
 contourpy cycler fonttools frozenlist h11 idna jinja2 joblib kiwisolver markupsafe matplotlib multidict narwhals numpy
 packaging pandas pillow propcache protobuf pyarrow pyparsing python-dateutil pyyaml requests scikit-learn scipy six
 threadpoolctl typing-extensions urllib3 werkzeug yarl zipp "
ON_DEVICE=${ON_DEVICE//$'\n'/}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.gpulibs/\n' >> .git/info/exclude
rm -rf .whl .gpulibs && mkdir -p .whl .gpulibs
"$PY" -m pip wheel -q --no-deps -w .whl ffcv==1.0.2 assertpy==1.1 fastargs==1.2.0 pytorch-pfn-extras==0.9.0 \
    terminaltables==3.1.10
unzip -o -q -d /tmp/ffcv-ext .whl/ffcv-*.whl 'ffcv/_libffcv*'
ldd /tmp/ffcv-ext/ffcv/_libffcv*.so | awk '/=> \//{print $3}' \
    | grep -v -E '/(libc|libm|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' | xargs -I{} cp -L {} .gpulibs/
rm -rf /tmp/ffcv-ext
if [ "$MLFLOW" = 1 ]; then
    tmp=$(mktemp -d)
    platforms=()
    for p in manylinux_2_{17,24,27,28,31,34,35} manylinux2014 manylinux1; do platforms+=(--platform "${p}_x86_64"); done
    "$PY" -m pip download -q -d "$tmp" --python-version 3.12 --implementation cp --abi cp312 "${platforms[@]}" \
        --only-binary=:all: mlflow==3.17.2
    carried=0
    for w in "$tmp"/*.whl; do
        name=$(basename "$w" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
        if [[ $ON_DEVICE != *" $name "* ]]; then
            mv "$w" .whl/
            carried=$((carried + 1))
        fi
    done
    echo "MLflow: $carried of $(($(ls "$tmp" | wc -l) + carried)) wheels of its closure carried (the rest are there)"
    rm -rf "$tmp"
fi
du -sh .whl .gpulibs
echo "bundle: $(du -cb .whl .gpulibs | tail -1 | cut -f1) bytes (the tree that travels may hold 64 MiB = 67108864)"
