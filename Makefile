# Two commands set up and run everything on a fresh machine (see README):
#   make run    install into .venv, then run the demo on a shipped CT model (rank, label, fine-tune, compare)
#   make test   install into .venv, then lint and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
OUT ?= asfda-demo
BIN := $(VENV)/bin

.PHONY: run test install bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# nnU-Net's own network, the reference the nnU-Net conversion is tested against; without its dependencies
	# (timm and torchvision serve other architectures, and would replace this torch)
	$(BIN)/python -m pip install --quiet --no-deps "dynamic-network-architectures==0.4.4"
	touch $@

run: install
	$(BIN)/asfda demo --out $(OUT)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/bench_scoring.py --json benchmarks/results/scoring.json
	$(BIN)/python benchmarks/bench_finetune.py --json benchmarks/results/finetune.json
	$(BIN)/python benchmarks/bench_threads.py --json benchmarks/results/threads.json
