#!/bin/sh
# No arguments or trainer flags: torchrun on every visible GPU (NPROC_PER_NODE overrides) with those flags, through
# python -m ddp_train.torchrun (torchrun ending in one line and the trainer's exit status, e.g. 3 after docker stop).
# A command (python, torchrun, bash, …): run it as given.
set -e
case "${1:-}" in
  ""|-*)
    # no GPU device node (with --gpus device=3 it is /dev/nvidia3): torchrun's own answer is a traceback
    if [ -z "${NPROC_PER_NODE:-}" ] && ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
      echo "error: no GPU in this container: run it with --gpus all (NVIDIA container runtime), or set" \
           "NPROC_PER_NODE=N (-e NPROC_PER_NODE=2) to train with N processes on the CPU" >&2
      exit 2
    fi
    exec python -m ddp_train.torchrun --standalone --nproc_per_node="${NPROC_PER_NODE:-gpu}" -m ddp_train "$@" ;;
  *) exec "$@" ;;
esac
