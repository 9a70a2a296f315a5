# The README's commands. Each target sets the environment up first (tools/setup_env.sh: .venv, missing
# packages, the native extension), so they work on a fresh machine and offline on a prepared one.

PYTHON ?= python3
VENV ?= .venv
VENV_PY := $(VENV)/bin/python
NVCC ?= nvcc
# Plain-CUDA sources (no torch headers, DESIGN.md): compiled alone with nvcc as a fast check, even where
# torch has no CUDA and setup.py cannot build them into the extension.
CUDA_SRCS ?= $(wildcard csrc/cuda/*.cu)

.PHONY: venv test cuda-check cuda-build-check demo demo-synthetic bench

venv:
	PYTHON="$(PYTHON)" VENV="$(VENV)" bash tools/setup_env.sh

# Compiles each CUDA source to a throwaway object when nvcc is on the PATH; nothing to do without
# sources or without nvcc.
cuda-check:
	@if ! command -v "$(NVCC)" >/dev/null 2>&1; then \
		echo "cuda-check: $(NVCC) not found, skipping"; \
	elif [ -z "$(strip $(CUDA_SRCS))" ]; then \
		echo "cuda-check: no CUDA sources"; \
	else \
		tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
		for src in $(CUDA_SRCS); do \
			echo "$(NVCC) -c $$src"; \
			"$(NVCC)" -std=c++20 -O3 -c "$$src" -o "$$tmp/$$(basename "$$src" .cu).o" || exit 1; \
		done; \
	fi

# Two processes: Triton decides at import whether its kernels run compiled or in its CPU interpreter, so
# the interpreter runs the op tests' Triton parameters (tests/ops) in a process of its own, with
# TRITON_INTERPRET=1 set before anything imports triton. The main process runs every other backend of the op
# tests, compiles every Triton kernel for sm_80/sm_90/sm_100 (tests/test_triton_compile.py) and skips the
# Triton parameters unless it has a GPU.
test: venv cuda-check
	$(VENV_PY) -m pytest -q tests
	TRITON_INTERPRET=1 $(VENV_PY) -m pytest -q tests/ops

demo:
	LORSUM_DEMO_DATA=1 PYTHON="$(PYTHON)" VENV="$(VENV)" bash tools/setup_env.sh
	$(VENV_PY) -m lorsum_kernels.demo

demo-synthetic: venv
	$(VENV_PY) -m lorsum_kernels.demo.synthetic

bench: venv
	$(VENV_PY) -m pytest bench --benchmark-only -q

# Builds csrc/cuda against a CUDA build of torch in a separate cached environment and writes ptxas
# register/spill figures (issue #13; several GB on first run, so not part of `make test`).
cuda-build-check:
	PYTHON="$(PYTHON)" bash tools/cuda_build_check.sh
