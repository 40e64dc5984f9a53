#!/bin/sh
# No arguments or trainer flags: torchrun on every visible GPU (NPROC_PER_NODE overrides) with those flags, through
# python -m ddp_train.torchrun (torchrun ending in one line and the trainer's exit status, e.g. 3 after docker stop).
# A command (python, torchrun, bash, …): run it as given.
set -e
case "${1:-}" in
  ""|-*) exec python -m ddp_train.torchrun --standalone --nproc_per_node="${NPROC_PER_NODE:-gpu}" -m ddp_train "$@" ;;
  *) exec "$@" ;;
esac
