# `make run` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# torch/torchvision are pinned here (not in pyproject) so that pip takes the
# builds this machine ships instead of resolving a newer CUDA build.
TORCH  := torch==2.14.1 torchvision==0.29.1
# FFCV 1.0.2 builds from source against these (Debian/Ubuntu package names).
SYSTEM_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev

.PHONY: setup run test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:" $$missing; \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$sudo apt-get install -y -q $$missing || \
	    { $$sudo apt-get update -q && $$sudo apt-get install -y -q $$missing; }; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: $(STAMP)
	$(PY) -m distcluster.train $(ARGS)

# Two test processes: a third of a lone run is spent waiting (Ray and MLflow start-up, process
# spawns), which the other process fills. One test file runs in one process, so that its
# module fixtures run once, in the order tests/conftest.py gives (the longest first).
PARALLEL := -n 2 --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PY) -m pytest -q $(PARALLEL) tests

test-fast: $(STAMP)  # the pure tests, for the edit-test loop (under 2 minutes on 2 cores)
	$(PY) -m pytest -q $(PARALLEL) -m "not slow" tests

lint: $(STAMP)  # style, and the import contracts of docs/architecture.md (make test checks them too)
	$(VENV)/bin/ruff check distcluster tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) runs mlflow.db
