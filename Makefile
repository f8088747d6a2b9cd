# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install everything they need. A CUDA torch already installed for
# $(PYTHON) is used as is (the venv sees it); otherwise torch 2.13.0 is installed, which on
# the team's machines is a CPU wheel on local disk.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test lint report demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "make: using the torch installed for $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
		$(PY) -m pip install -q --upgrade pip; \
		$(PY) -m pip install -q "torch==2.13.0"; \
	fi
	@# A torch that brings its own triton keeps it (a second one breaks torch.compile).
	@if $(PY) -c "import triton" >/dev/null 2>&1; then extras=test; else extras=dev; fi; \
		$(PY) -m pip install -q -e ".[$$extras]"
	@# The original facebookresearch code, the reference for .pth checkpoints (no deps: it
	@# pins an old torch and needs none of the rest on CPU).
	$(PY) -m pip install -q --no-deps "dinov2==0.0.1.dev2"
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check dinov2_fast tests bench
	$(PY) -m ruff format --check dinov2_fast tests bench

test: $(STAMP) lint
	$(PY) -m pytest -q -p no:cacheprovider tests bench --benchmark-disable

report: $(STAMP)
	$(PY) -m dinov2_fast.kernels.report --arch sm_90
	$(PY) -m dinov2_fast.kernels.report --arch sm_80

demo: $(STAMP)
	$(PY) -m dinov2_fast.demo

# On a GPU: the headline benchmark matrix, rows to bench/results/ (see bench/README.md).
bench: $(STAMP)
	$(PY) -m pytest bench -p no:cacheprovider --bench-matrix check

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
