# e3kernels: `make test` runs the tests, `make bench` the comparison with e3nn-jax.
# Both install into .venv first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install test lint bench gpu-check compile-check

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "e3kernels needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,lint]"
	touch $(STAMP)

# The tests spend most of their time compiling and in Pallas interpret mode, both mostly
# single-threaded: two workers take about a quarter off on a 2-core machine (783 -> 579 s).
# TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# peers: e3j, beside cuequivariance-jax in the convolution workload (bench/peers.py)
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,lint,bench,peers]"
	touch $(BENCH_STAMP)

# BENCH_ARGS=--quick for small sizes; see `python -m bench --help`
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# On a machine with an NVIDIA GPU: the kernels for real (no interpret mode), then the
# bench against the reference, e3nn-jax and cuequivariance-jax. Installs JAX's CUDA wheels
# (CUDA_EXTRA=cuda12 or cuda13) into .venv, unless GPU_PYTHON names a ready interpreter.
CUDA_EXTRA ?= cuda13
GPU_STAMP := $(VENV)/.installed-$(CUDA_EXTRA)
GPU_PYTHON ?=
GPU_RUN := $(if $(GPU_PYTHON),$(GPU_PYTHON),$(BIN)/python)

$(GPU_STAMP): $(BENCH_STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,bench,$(CUDA_EXTRA)]"
	touch $(GPU_STAMP)

gpu-check: $(if $(GPU_PYTHON),,$(GPU_STAMP))
	$(GPU_RUN) -c 'import jax, sys; d = jax.devices()[0]; print(d.device_kind); sys.exit(d.platform != "gpu")'
	E3KERNELS_GPU_TESTS=1 $(GPU_RUN) -m pytest -q -p no:cacheprovider tests/gpu
	$(GPU_RUN) -m bench --workloads indexed_linear,symmetric_contraction,mace $(BENCH_ARGS)

# Without a GPU or TPU: every kernel compiled by Mosaic (TPU v5e, v6e) and by XLA:GPU's
# Triton pipeline and ptxas (H100, H200); prints registers, spills, shared memory and
# tensor-core use per kernel and fails on a spill or a rejected kernel. Its own venv:
# the TPU and CUDA compilers are large and `make test` does not need them.
COMPILE_VENV := .venv-compile
COMPILE_STAMP := $(COMPILE_VENV)/.installed

$(COMPILE_STAMP): pyproject.toml
	test -x $(COMPILE_VENV)/bin/python || $(PYTHON) -m venv $(COMPILE_VENV)
	$(COMPILE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(COMPILE_VENV)/bin/python -m pip install --quiet -e ".[compile-check,peers,cue]"  # peers: e3j's Mosaic kernel; cue: the cue model entries
	touch $(COMPILE_STAMP)

# COMPILE_ARGS="--targets H100 --entries indexed_linear" for a subset
compile-check: $(COMPILE_STAMP)
	$(COMPILE_VENV)/bin/python -m bench.compile_check $(COMPILE_ARGS)
