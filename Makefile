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
# One spelling of the build layout (export/paths.py has the same): build/<model>/{onnx,engines,triton}.
MODEL_BUILD := $(BUILD)/$(notdir $(abspath $(MODEL)))
EXPORT_DIR  := $(if $(OUT),$(OUT),$(MODEL_BUILD)/onnx)
EXPORT      := $(EXPORT_DIR)/tp$(TP)
MOE_FORMS   := $(BUILD)/bench/moe_forms.json
# Which TensorRT builds the engines: auto (TensorRT 11 if installed, else TensorRT-RTX ahead of time
# for SM80, whose engines check the graphs but do not load in TensorRT 11), tensorrt, tensorrt-rtx.
TENSORRT    ?= auto
# Export settings shared by `make onnx`, `make engines` and the preflight (empty: the tools' defaults).
JOBS        ?=
MAX_TOKENS  ?=
TWINS       ?=
EXPORT_ARGS  = $(if $(JOBS),--jobs $(JOBS)) $(if $(MAX_TOKENS),--max-tokens $(MAX_TOKENS)) \
               $(if $(wildcard $(MOE_FORMS)),--moe-forms-file $(MOE_FORMS))

.PHONY: help setup tiny demo chat generate onnx engines verify-engines serve triton triton-server triton-serve bench bench-cpu test test-slow test-gpu clean

help:
	@echo "make demo      set up, build the embedded toy model's export, run one chat turn on it"
	@echo "make chat      interactive chat (MODEL=<export dir>, default the embedded model)"
	@echo "make test      set up and run the test suite (CPU only)"
	@echo "make tiny      write the embedded toy MiniMax-M2 checkpoint to $(TINY)"
	@echo "make generate  MODEL=<checkpoint> IDS=1,5,9 N=16: greedy tokens from the PyTorch model"
	@echo "make onnx      MODEL=<checkpoint> TP=<n> [OUT=<dir>] [JOBS=n] [TWINS=auto|on|off]: per-layer ONNX"
	@echo "               subgraphs + manifest (default: the embedded checkpoint, TP=1, OUT=build/<model>/onnx;"
	@echo "               FP32 twins for ONNX Runtime on CPU only where a CPU run fits, unless TWINS says)"
	@echo "make engines   MODEL=<checkpoint> TP=<n> [OUT=<export dir>] [JOBS=n] [MAX_TOKENS=n] [TWINS=on] [DRY_RUN=1]:"
	@echo "               preflight (disk, RAM, TensorRT, GPU memory; DRY_RUN=1 stops there), export if needed"
	@echo "               (no FP32 twins unless TWINS=on), then SM80 TensorRT engines; resumes where it stopped"
	@echo "               (TensorRT 11 + GPU; TENSORRT=tensorrt-rtx: TensorRT-RTX, ahead of time, no GPU)"
	@echo "make verify-engines MODEL=<checkpoint> TP=<n> [OUT=<export dir>]: every engine against ONNX Runtime (polygraphy)"
	@echo "make serve     MODEL=<checkpoint> TP=<n> [PORT=8000] [SERVE_FLAGS=...]: export if needed, then the"
	@echo "               OpenAI-compatible server on 127.0.0.1:PORT (ONNX Runtime; SERVE_FLAGS='--backend trt --device cuda')"
	@echo "make triton    MODEL=<checkpoint> TP=<n> [REPO=<dir>] [COPY=1]: export if needed, then a Triton model"
	@echo "               repository hosting the runtime (TensorRT engines if built, else ONNX Runtime)"
	@echo "               (default REPO=build/<model>/triton; COPY=1 copies the export in instead of referencing it)"
	@echo "make triton-serve [REPO=<dir>]: serve a repository on 127.0.0.1:8000/8001 with the local tritonserver"
	@echo "make bench     all benchmarks (export, MoE forms, engine memory, GPU decode attention, decode step, prefill); JSON lines"
	@echo "               to stdout and build/bench/results.jsonl (GPU parts need an NVIDIA GPU)"
	@echo "make bench-cpu the CPU parts (export, MoE forms on ONNX Runtime, engine memory, host work per step); last line: one JSON summary"
	@echo "make test-slow the long CPU tests left out of make test (TP=8 in eight processes, the benchmarks' smoke run)"
	@echo "make test-gpu  the GPU-only tests (on a machine with an NVIDIA GPU)"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

tiny: $(TINY)/config.json

$(TINY)/config.json: export/tiny.py | setup
	$(BIN)/python -m export.tiny $(TINY)

generate: setup
	$(BIN)/python -m export.generate $(MODEL) --ids $(IDS) --max-new-tokens $(N)

# The embedded checkpoint is written first when it is the one asked for.
# The MoE form schedule `make bench` measured is an explicit input (used when it fits the model's shape).
onnx: setup $(if $(filter $(MODEL),$(TINY)),$(TINY)/config.json)
	$(BIN)/python -m export.to_onnx $(MODEL) --tp $(TP) --out $(EXPORT_DIR) $(EXPORT_ARGS) \
		$(if $(TWINS),--fp32-twins $(TWINS)) $(EXPORT_FLAGS)

# TensorRT first, then the preflight (disk, RAM and GPU memory against the plan; nothing is written
# when something does not fit), then the export (up-to-date layer-ranks are skipped; no FP32 twins unless
# TWINS=on), then the engines (up-to-date engines are skipped). A rerun resumes an interrupted one.
engines: setup
	$(BIN)/python -m engines.build --check-env --tensorrt $(TENSORRT)
	$(if $(filter $(MODEL),$(TINY)),$(MAKE) --no-print-directory tiny)
	$(BIN)/python -m engines.preflight $(MODEL) --tp $(TP) --out $(EXPORT_DIR) --tensorrt $(TENSORRT) \
		--fp32-twins $(or $(TWINS),off) $(EXPORT_ARGS)
	$(if $(DRY_RUN),@true,$(MAKE) --no-print-directory onnx TWINS=$(or $(TWINS),off))
	$(if $(DRY_RUN),@true,$(BIN)/python -m engines.build $(EXPORT) --tensorrt $(TENSORRT) $(ENGINE_FLAGS))

verify-engines: setup
	$(BIN)/python -m engines.verify $(EXPORT)

# One scripted chat turn on the embedded model through the runtime (ONNX Runtime, FP32 twins).
demo: setup
	$(MAKE) --no-print-directory onnx MODEL=$(TINY) TP=1
	@echo "(the embedded model has random weights: its text is noise; the pipeline is what runs)"
	$(BIN)/python runtime/chat.py --model $(BUILD)/tiny-minimax-m2/onnx/tp1 --prompt "Hello! What is 2 + 3?" --max-tokens 48 --temperature 0

chat: setup
	$(BIN)/python runtime/chat.py $(if $(filter $(MODEL),$(TINY)),,--model $(EXPORT))

PORT ?= 8000

# SERVE_FLAGS: more options of `python -m runtime.serve` (--backend, --device, --kv-cache-gb, --host ...)
serve: onnx
	$(BIN)/python -m runtime.serve --model $(EXPORT) --port $(PORT) $(SERVE_FLAGS)

REPO ?= $(MODEL_BUILD)/triton

# TRITON_FLAGS: more options of `python -m runtime.serving.triton_repo` (--backend, --kv-cache-gb, --engines ...)
triton: onnx
	$(BIN)/python -m runtime.serving.triton_repo $(EXPORT) --out $(REPO) $(if $(COPY),--copy) $(TRITON_FLAGS)

# tritonserver with the Python backend, from the nvidia-pytriton wheel (tests and local serving).
triton-server: $(VENV)/tritonserver/.installed

$(VENV)/tritonserver/.installed: | setup
	$(BIN)/python -m runtime.serving.triton_server --install

triton-serve: triton-server
	$(BIN)/python -m runtime.serving.triton_server $(REPO)

bench: setup
	$(BIN)/python -m bench

bench-cpu: setup
	$(BIN)/python -m bench --cpu

test: setup triton-server
	$(BIN)/python -m pytest -q --durations=25

# The tests marked long (pyproject.toml): minutes each on two cores; CI runs them after `make test`.
test-slow: setup
	$(BIN)/python -m pytest -q -m long --durations=10

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(BUILD)
