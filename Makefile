# CIFAR-100 distributed training. `make` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
SYSTEM_PACKAGES := libturbojpeg0-dev libopencv-dev pkg-config

SOURCE ?=
DATA   ?=
NPROC  ?=
EPOCHS ?=
ARGS   ?=
PORT   ?= 5000
HOST   ?= 127.0.0.1
SUBMIT ?=
DOCKER ?= docker
IMAGE  ?= cifar100-ddp

.DEFAULT_GOAL := help
.PHONY: help setup system-deps prep-data train test mlflow-ui mlflow-server submit docker clean clean-all

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'
	@echo "  variables: SOURCE=download|synthetic|PATH  DATA=dir  NPROC=n  EPOCHS=n  ARGS='--flag value …'  PORT=n"
	@echo "             SUBMIT='launcher flags'  DOCKER=docker|podman  IMAGE=name"

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo -n "$$p "; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "setup: installing FFCV's system libraries: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "error: missing system packages: $$missing- run: sudo apt-get install -y --no-install-recommends $$missing" >&2; exit 1; \
	  fi; \
	fi

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or pass PYTHON=/path/to/python3.11" >&2; exit 1; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

setup: system-deps $(VENV)/.installed ## build .venv (and apt-install FFCV's system libraries when root)

prep-data: setup ## write data/*.beton + manifest.json (SOURCE=download|synthetic|PATH, default download)
	$(PY) -m data_prep --source $(or $(SOURCE),download) --out $(or $(DATA),$(if $(filter synthetic,$(SOURCE)),data/synthetic,data))

train: setup ## torchrun on all local GPUs (2 CPU processes and a small synthetic demo without one)
	$(PY) -m ddp_train.launch $(if $(SOURCE),--source $(SOURCE)) $(if $(DATA),--data-dir $(DATA)) \
	  $(if $(NPROC),--nproc $(NPROC)) -- $(if $(EPOCHS),--epochs $(EPOCHS)) $(ARGS)

test: setup ## run the test suite (CPU; real FFCV, torchrun and MLflow)
	$(PY) -m pytest -q tests

mlflow-ui: setup ## MLflow UI on 127.0.0.1 (PORT=5000) over the default store ./mlflow.db
	@echo "MLflow UI: http://127.0.0.1:$(PORT)/#/experiments  (Ctrl-C stops it)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlruns --host 127.0.0.1 --port $(PORT)

mlflow-server: setup ## tracking server for multi-node jobs: sqlite + served artifacts in mlflow-server/ (HOST, PORT)
	@mkdir -p mlflow-server/artifacts
	@echo "MLflow server: http://$(HOST):$(PORT)  — jobs: export MLFLOW_TRACKING_URI=http://<this host>:$(PORT)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server \
	  --backend-store-uri sqlite:///$(CURDIR)/mlflow-server/mlflow.db --artifacts-destination $(CURDIR)/mlflow-server/artifacts \
	  --host $(HOST) --port $(PORT) --workers 1 $(if $(ALLOWED_HOSTS),--allowed-hosts $(ALLOWED_HOSTS))

submit: setup ## submit to Slurm with submitit (SUBMIT='--nodes 2 --partition gpu …', ARGS=trainer flags)
	$(PY) -m slurm.submit $(SUBMIT) -- $(ARGS)

docker: ## build the cluster image (IMAGE=cifar100-ddp, DOCKER=docker or podman)
	$(DOCKER) build -f docker/Dockerfile --build-arg IMAGE_NAME=$(IMAGE) -t $(IMAGE) .

clean: ## remove caches and temporary files (keeps .venv, data, runs and the MLflow store)
	rm -rf .pytest_cache build *.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

clean-all: clean ## also remove .venv, data/, runs/, slurm-logs/, .slurm-failures/ and the MLflow stores
	rm -rf $(VENV) data runs mlruns mlflow.db mlflow-server slurm-logs .slurm-failures
