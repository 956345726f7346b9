# MiniMax-M2.x on A100 through ONNX and TensorRT. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
BUILD  ?= build
TINY   := $(BUILD)/tiny-minimax-m2
MODEL  ?= $(TINY)
IDS    ?= 1,5,9
N      ?= 16
TP     ?= 1
OUT    ?=

.PHONY: help setup tiny demo generate onnx check-onnx test test-gpu clean

help:
	@echo "make demo      set up, write the embedded toy checkpoint, generate from it"
	@echo "make test      set up and run the test suite (CPU only)"
	@echo "make tiny      write the embedded toy MiniMax-M2 checkpoint to $(TINY)"
	@echo "make generate  MODEL=<checkpoint> IDS=1,5,9 N=16: greedy tokens from the PyTorch model"
	@echo "make onnx      MODEL=<checkpoint> TP=<n> [OUT=<dir>]: per-layer ONNX subgraphs + manifest"
	@echo "               (default: the embedded checkpoint, TP=1, OUT=build/<model>/onnx)"
	@echo "make test-gpu  the GPU-only tests (on a machine with an NVIDIA GPU)"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

tiny: $(TINY)/config.json

$(TINY)/config.json: export/tiny.py | setup
	$(BIN)/python -m export.tiny $(TINY)

generate: setup
	$(BIN)/python -m export.generate $(MODEL) --ids $(IDS) --max-new-tokens $(N)

# The embedded checkpoint is written first when it is the one asked for.
onnx: setup $(if $(filter $(MODEL),$(TINY)),$(TINY)/config.json)
	$(BIN)/python -m export.to_onnx $(MODEL) --tp $(TP) $(if $(OUT),--out $(OUT))

demo: tiny
	$(BIN)/python -m export.generate $(TINY) --ids $(IDS) --max-new-tokens $(N) --ignore-eos

test: setup
	$(BIN)/python -m pytest -q

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(BUILD)
