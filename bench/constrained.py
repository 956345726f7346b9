"""Part `constrained`: what constrained decoding costs, through the LLMEngine on the torch backend
(the real model's width with a few layers of random weights, as the step part; `--toy`: the toy
model on the CPU, a smoke run).
- compile: the vocabulary's table (once per engine), a realistic tool list's tool-call grammar (cold,
  then from the cache: an agent sends the same tools every turn) and the timed json_schema's grammar;
- decode: tokens/s at batch 1 and 32 with no constraint and with every row held to a json_schema
  response_format, and the host time per step filling the grammar masks (`Stats.mask_seconds`).
The schema is an array of issue-search objects (strings, enums, an anyOf, a bounded integer, a nested
object) with a minimum item count, so no row's grammar can end inside the timed steps: every timed
step masks every row (checked). With no constrained row the step sends nothing (`extras_steps` 0).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from export.config import parse_hf_config
from export.tiny import PRESETS, hf_config
from runtime.backends.pytorch import TorchBackend
from runtime.config import EngineConfig
from runtime.constrained import Spec
from runtime.llm_engine import LLMEngine
from runtime.sampling import SamplingParams

from .common import Results
from .step import RandomWeights, sync, timed_steps, write_export

# One issue-search call: the shapes real tool definitions use.
SEARCH = {"type": "object", "properties": {
    "query": {"type": "string", "maxLength": 40, "description": "free text"},
    "filters": {"type": "object", "properties": {
        "status": {"type": "string", "enum": ["open", "closed", "merged"]},
        "labels": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
        "author": {"anyOf": [{"type": "string", "maxLength": 24}, {"type": "null"}]}},
        "required": ["status"], "additionalProperties": False},
    "limit": {"type": "integer", "minimum": 1, "maximum": 100}},
    "required": ["query", "filters", "limit"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "search_issues", "description": "Search the tracker.",
                                      "parameters": SEARCH}},
    {"type": "function", "function": {"name": "create_event", "parameters": {"type": "object", "$defs": {
        "person": {"type": "object", "properties": {"name": {"type": "string"}, "optional": {"type": "boolean"}},
                   "required": ["name"]}},
        "properties": {"title": {"type": "string"}, "attendees": {"type": "array", "items": {"$ref": "#/$defs/person"}},
                       "start": {"type": "string", "format": "date-time"},
                       "duration_h": {"type": "number", "minimum": 0, "maximum": 24},
                       "room": {"enum": ["A", "B", None]}},
        "required": ["title", "attendees", "start"]}}},
    {"type": "function", "function": {"name": "run_shell", "parameters": {"type": "object", "properties": {
        "command": {"type": "string"}, "timeout_s": {"type": "integer", "minimum": 1, "maximum": 600},
        "env": {"type": "object", "additionalProperties": {"type": "string"}}}, "required": ["command"]}}}]


def held_schema(items: int) -> dict:
    """At least `items` searches: longer than the timed steps at any tokenisation."""
    return {"type": "array", "items": SEARCH, "minItems": items}


def compile_rows(engine: LLMEngine, schema: dict) -> dict:
    g = engine.grammars
    t0 = time.perf_counter()
    g.compiler()  # the vocabulary's table: once per engine
    t1 = time.perf_counter()
    tools = Spec("tools", tools=tuple(TOOLS))
    g.compile(tools)
    t2 = time.perf_counter()
    g.compile(tools)
    t3 = time.perf_counter()
    g.compile(Spec("json", schema=schema))
    t4 = time.perf_counter()
    return dict(what="compile", vocab=engine.model_config.vocab_size, vocab_table_s=round(t1 - t0, 3),
                tools_compile_ms=round((t2 - t1) * 1e3, 2), tools_cached_ms=round((t3 - t2) * 1e3, 3),
                schema_compile_ms=round((t4 - t3) * 1e3, 2))


def decode_row(engine: LLMEngine, batch: int, schema: dict | None, steps: int, prompt: int, regular: int,
               g: torch.Generator) -> dict:
    """Decode at `batch` rows, each held to `schema` (None: free), timed after the prefill; prompts of
    random regular token ids (below `regular`)."""
    params = SamplingParams(temperature=0, max_tokens=4096, ignore_eos=True)
    compiled = engine.grammars.compile(Spec("json", schema=schema)) if schema is not None else None
    seqs = []
    for _ in range(batch):
        c = engine.grammars.constraint_for(compiled, False) if compiled is not None else None
        seqs.append(engine.add_request(torch.randint(0, regular, (prompt,), generator=g).tolist(), params, c))
    while any(s.num_computed < len(s.prompt) for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    sync(engine)
    s0 = replace(engine.stats)
    wall = timed_steps(engine, steps)
    masked = engine.stats.extras_steps - s0.extras_steps
    if len(engine.scheduler.running) != batch or (schema is not None and not all(s.constraint.active for s in seqs)):
        raise RuntimeError("a row finished or left its grammar inside the timed steps: timings invalid")
    if masked != (steps if schema is not None else 0):
        raise RuntimeError(f"{masked} of {steps} steps sent extras, constrained={schema is not None}")
    row = dict(what="decode", batch=batch, constrained=schema is not None, step_ms=round(wall * 1e3, 3),
               tokens_per_s=round(batch / wall, 1), extras_steps=masked,
               mask_fill_ms_per_step=round((engine.stats.mask_seconds - s0.mask_seconds) / steps * 1e3, 3))
    for s in seqs:
        engine.abort(s)
    return row


def run(res: Results, layers: int = 4, batches=(1, 32), steps: int = 30, toy: str | None = None) -> None:
    """toy: a preset's name (export/tiny.py), run on the CPU at tiny sizes; else the real width on the GPU."""
    spec = PRESETS[toy] if toy else replace(PRESETS["real"], num_hidden_layers=layers)
    cfg = parse_hf_config(hf_config(spec))
    device, dtype = ("cpu" if toy else "cuda"), torch.bfloat16  # RandomWeights makes bf16 weights
    prompt = 8 if toy else 128
    schema = held_schema(64)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_export(cfg, Path(tmp), max_tokens=256 if toy else 1024,
                                text_spec=spec if toy else PRESETS["real"])
        backend = TorchBackend(manifest, 0, device, dtype, checkpoint=RandomWeights(cfg, device=device))
        engine = LLMEngine(tmp, EngineConfig(backend="torch", device=device, dtype=str(dtype).removeprefix("torch."),
                                             kv_cache_gb=0.05 if toy else 4, max_num_seqs=max(batches),
                                             cuda_graphs=not toy, graph_max_context=2048,
                                             max_num_batched_tokens=256 if toy else 1024), backend=backend)
        try:
            res.add("constrained", **compile_rows(engine, schema))
            g = torch.Generator().manual_seed(1)
            for B in batches:
                for held in (None, schema):
                    res.add("constrained", **decode_row(engine, B, held, steps, prompt, spec.n_regular_tokens, g))
        finally:
            engine.close()
