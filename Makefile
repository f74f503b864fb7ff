# make test  : create .venv if missing, install torch + deps + the package (builds fused_pairloss._C,
#              with the CUDA sources when nvcc is found), then run the test suite.
# make bench : same install, then the quick benchmark sweep (bench/run.py --quick).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
NVCC := $(shell command -v nvcc 2>/dev/null)
# CUDA_HOME: the toolkit root (bin/nvcc, lib64/libcudart); derived from nvcc when not set.
CUDA_HOME ?= $(if $(NVCC),$(shell d=$$(dirname $$(dirname $$(readlink -f $(NVCC)))); if [ -e $$d/lib64/libcudart.so ]; then echo $$d; elif [ -e /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda; else echo $$d; fi),)
export CUDA_HOME
MAX_JOBS ?= 2
export MAX_JOBS
PYTEST_ARGS ?=
BENCH_ARGS ?= --quick

.PHONY: test bench install venv clean wheel

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

venv: $(PY)

install: $(PY)
	$(PIP) install torch ninja numpy
	$(PIP) install --no-build-isolation -e '.[test,bench]'
	$(PY) -c "import fused_pairloss as f; print('build_info:', f.build_info())"

test: install
	$(PY) -m pytest -q -rs $(PYTEST_ARGS) tests

bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

wheel: install
	$(PIP) wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info fused_pairloss/_C*.so
