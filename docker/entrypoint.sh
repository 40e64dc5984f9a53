#!/bin/sh
# No arguments or trainer flags: torchrun on every visible GPU (NPROC_PER_NODE overrides) with those flags.
# A command (python, torchrun, bash, …): run it as given.
set -e
case "${1:-}" in
  ""|-*) exec torchrun --standalone --nproc_per_node="${NPROC_PER_NODE:-gpu}" -m ddp_train "$@" ;;
  *) exec "$@" ;;
esac
