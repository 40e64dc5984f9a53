#!/usr/bin/env bash
# Makes what gpu_env.sh installs on a GPU machine that has PyTorch but neither FFCV nor a network:
#   .whl/      FFCV built here for that machine's Python (PY, default python3.12) and FFCV's pure-Python needs;
#   .gpulibs/  the C libraries FFCV's extension links to (OpenCV, turbojpeg and theirs), copied from this machine.
# Both are ignored by git (.git/info/exclude); carry them with the call. Needs FFCV's system libraries here
# (make setup installs them) and PY with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3.12}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.gpulibs/\n' >> .git/info/exclude
rm -rf .whl .gpulibs && mkdir -p .whl .gpulibs
"$PY" -m pip wheel -q --no-deps -w .whl ffcv==1.0.2 assertpy==1.1 fastargs==1.2.0 pytorch-pfn-extras==0.9.0 \
    terminaltables==3.1.10
unzip -o -q -d /tmp/ffcv-ext .whl/ffcv-*.whl 'ffcv/_libffcv*'
ldd /tmp/ffcv-ext/ffcv/_libffcv*.so | awk '/=> \//{print $3}' \
    | grep -v -E '/(libc|libm|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' | xargs -I{} cp -L {} .gpulibs/
rm -rf /tmp/ffcv-ext
du -sh .whl .gpulibs
