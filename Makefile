# CIFAR-100 distributed training. `make` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# FFCV's libraries, needed whenever it runs; and, only to build .venv, a compiler (ffcv 1.0.2 is a source package
# whose extension is compiled at install) and, when PYTHON is Debian's own python3.X, its headers and venv module
RUNTIME_PACKAGES := libturbojpeg0-dev libopencv-dev pkg-config
BUILD_PACKAGES = build-essential $(foreach p,$(filter /usr/bin/python3.%,$(shell readlink -f "$$(command -v \
  $(PYTHON))" 2>/dev/null)),$(notdir $(p))-venv $(notdir $(p))-dev)
define apt_need # $(call apt_need,packages,what they are for): apt-get install the missing ones as root, else stop
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo -n "$$p "; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "setup: installing $(2): $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "error: missing system packages ($(2)): $$missing- run: sudo apt-get install -y --no-install-recommends $$missing" >&2; exit 1; \
	  fi; \
	fi
endef

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
	@echo "             HOST=addr  ALLOWED_HOSTS=names (mlflow-server)  SUBMIT='launcher flags'  DOCKER=docker|podman"
	@echo "             IMAGE=name  PYTHON=python3.11 (builds .venv)  USE_PIP=1 (pip, not uv)"

system-deps:
	$(call apt_need,$(RUNTIME_PACKAGES),FFCV's libraries)

# Installs go through uv (UV_VERSION, put into .venv with pip unless uv is on PATH): the same pins as pip, faster (a
# fresh venv in 34-153 s against pip's 170-369 s, measured on the 2-vCPU build machine). uv reads no pip configuration,
# so it gets the package sources pip is configured with (pip.conf, PIP_* variables, e.g. a local wheel mirror) and
# pip's pick of the best version across them; with none configured both use PyPI. USE_PIP=1 (or no uv): pip.
UV_VERSION := 0.13.9
# Bytecode compiled at install, as pip does: without it a venv that Python cannot write (PYTHONDONTWRITEBYTECODE, a
# read-only shared filesystem) recompiles torch in every process (imports took 24 s instead of 7 s, measured).
UV_FLAGS := -q --compile-bytecode --index-strategy unsafe-best-match
USE_PIP ?=
PIP_SOURCES = $(PY) -m pip config list 2>/dev/null \
  | sed -nE "s/^(global|install|:env:)\.(index-url|extra-index-url|find-links|constraint)='(.*)'$$/\2 \3/p" \
  | while read -r key values; do for v in $$values; do echo "--$$key=$$v"; done; done | awk '!seen[$$0]++'
define install # $(call install,requirement): the project from its pins into .venv
	@uv=$$(command -v uv || echo $(VENV)/bin/uv); \
	if [ -z "$(USE_PIP)" ] && [ ! -x "$$uv" ] && ! $(PY) -m pip install -qq uv==$(UV_VERSION); then \
	  echo "setup: uv $(UV_VERSION) could not be installed (above); installing with pip instead (slower)"; fi; \
	if [ -z "$(USE_PIP)" ] && [ -x "$$uv" ]; then \
	  echo "setup: uv pip install -e '$(1)'"; \
	  "$$uv" pip install $(UV_FLAGS) --python $(PY) $$($(PIP_SOURCES)) -e '$(1)'; \
	else \
	  echo "setup: pip install -e '$(1)'"; $(PY) -m pip install -q -e '$(1)'; \
	fi
endef

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or pass PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(call apt_need,$(BUILD_PACKAGES),what building .venv needs)
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(call install,.)
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(call install,.[test])
	@touch $@

setup: system-deps $(VENV)/.installed ## build .venv for training (and apt-install FFCV's system libraries when root)

# SOURCE=synthetic: the full-size stand-in of CIFAR-100 in data/synthetic/, the set `make train SOURCE=synthetic` uses
prep-data: setup ## write data/*.beton + manifest.json (SOURCE=download|synthetic|PATH, default download)
	$(PY) -m data_prep --source $(or $(SOURCE),download) --out $(or $(DATA),$(if $(filter synthetic,$(SOURCE)),data/synthetic,data))

train: setup ## torchrun on all local GPUs (2 CPU processes and a small synthetic demo without one)
	@$(PY) -m ddp_train.launch $(if $(SOURCE),--source $(SOURCE)) $(if $(DATA),--data-dir $(DATA)) \
	  $(if $(NPROC),--nproc $(NPROC)) -- $(if $(EPOCHS),--epochs $(EPOCHS)) $(ARGS)

test: setup $(VENV)/.installed-test ## add the test tools (pytest, ruff, hadolint, playwright) and run the test suite
	$(PY) -m pytest -q --durations=10 tests

mlflow-ui: setup ## MLflow UI on 127.0.0.1 (PORT=5000) over the default store ./mlflow.db
	@echo "MLflow UI: http://127.0.0.1:$(PORT)/#/experiments  (Ctrl-C stops it)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlruns --host 127.0.0.1 --port $(PORT)

# what mlflow-server says jobs should do: a server on 127.0.0.1 serves this machine only, and MLflow 3 answers only
# requests addressed to the names in ALLOWED_HOSTS (403 "Invalid Host header" for any other)
SERVER_HINT = $(if $(filter 127.0.0.1 localhost,$(HOST)),$(HINT_LOCAL),$(HINT_JOBS))
HINT_LOCAL = this machine only; for jobs on other nodes: make mlflow-server HOST=0.0.0.0 ALLOWED_HOSTS=<this host>,<this host>:$(PORT)
HINT_JOBS = jobs: export MLFLOW_TRACKING_URI=http://<a name in ALLOWED_HOSTS>:$(PORT)$(if $(ALLOWED_HOSTS),, (none given: set ALLOWED_HOSTS))

mlflow-server: setup ## tracking server for multi-node jobs: sqlite + served artifacts in mlflow-server/ (HOST, PORT)
	@mkdir -p mlflow-server/artifacts
	@echo "MLflow server: http://$(HOST):$(PORT)  — $(SERVER_HINT)"
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
