"""Part 4: the runtime's decode step on the GPU for a model of MiniMax-M2.5's true width with a few
layers (random bf16 weights made on the GPU: a checkpoint of that size is not worth writing here),
torch backend, at batch 1, 8 and 32, with and without CUDA graphs. Against the bytes floor: the
weights the step must read (each layer's attention and router, the distinct experts the batch's tokens
choose -- the expected count for uniform routing, E(1-(1-k/E)^B) --, the LM head) plus the KV cache,
over measured copy bandwidth. Host overhead: the engine's wall time per step less the GPU time of the
same step replayed alone from its CUDA graph.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from export.checkpoint import LayerWeights
from export.config import parse_hf_config
from export.layout import make_layout
from export.moe_forms import MoeSchedule
from export.manifest import Manifest
from export.tiny import PRESETS, hf_config, write_text_files
from runtime.backends.pytorch import TorchBackend
from runtime.config import EngineConfig
from runtime.llm_engine import LLMEngine
from runtime.sampling import SamplingParams

from .common import Results, cuda_seconds, gpu_bandwidth

PROMPT = 512


class RandomWeights:
    """Checkpoint's config/read/layer, with random bf16 weights made on the GPU."""

    def __init__(self, cfg, device="cuda", seed=0):
        self.config, self.device = cfg, device
        self.g = torch.Generator(device=device).manual_seed(seed)

    def _w(self, *shape, scale=None, dtype=torch.bfloat16):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return (torch.randn(*shape, device=self.device, generator=self.g) * scale).to(dtype)

    def read(self, requests):
        """Random tables of the rows asked for (a slice of the vocabulary, or all of it)."""
        c = self.config

        def rows(name):
            r = requests[name][0] if requests[name] else slice(None)
            return len(range(*r.indices(c.vocab_size)))
        make = {"model.embed_tokens.weight": lambda n: self._w(rows(n), c.hidden_size, scale=1.0),
                "model.norm.weight": lambda n: torch.ones(c.hidden_size, device=self.device, dtype=torch.bfloat16),
                "lm_head.weight": lambda n: self._w(rows(n), c.hidden_size)}
        return {name: make[name](name) for name in requests}

    def layer(self, n, dtype, shard, stream=False):
        c = self.config
        H, hd = c.hidden_size, c.head_dim
        nh, nkv = c.num_attention_heads // shard.tp, c.num_key_value_heads // shard.tp
        E, I = c.num_experts, c.intermediate_size // shard.tp
        ones = lambda k: torch.ones(k, device=self.device, dtype=dtype)  # noqa: E731
        return LayerWeights(
            input_norm=ones(H), post_norm=ones(H), q_proj=self._w(nh * hd, H), k_proj=self._w(nkv * hd, H),
            v_proj=self._w(nkv * hd, H), o_proj=self._w(H, nh * hd), q_norm=ones(nh * hd), k_norm=ones(nkv * hd),
            gate=self._w(E, H, dtype=torch.float32), bias=torch.zeros(E, device=self.device),
            w13=self._w(E, 2 * I, H), w2=self._w(E, H, I))


def write_export(cfg, root: Path, max_tokens: int, text_spec=PRESETS["real"]) -> Manifest:
    """A manifest with no graph files (the torch backend needs only the layout) and a tokenizer
    (text_spec's: the real preset's has the real vocabulary's size)."""
    # With both MoE kernels the torch backend picks by step size; the schedule names the form in stats.
    moe = MoeSchedule.parse(f"gather:{cfg.num_experts // cfg.top_k},block", max_tokens, "bench: the GPU kernels")
    layout = make_layout(cfg, 1, forms=moe.forms)
    man = Manifest(config=cfg, tp=1, expert_split="intermediate", opset=0, fp32_twins=False, moe=moe, max_tokens=max_tokens,
                   steps=layout.steps, subgraphs={s.name: s for s in layout.subgraphs}, files={},
                   producer="bench.step (random weights)")
    man.save(root)
    write_text_files(root, text_spec, 0)
    return Manifest.load(root)


def floor_bytes(cfg, layers: int, batch: int, context: int) -> int:
    H, hd, E, k = cfg.hidden_size, cfg.head_dim, cfg.num_experts, cfg.top_k
    attn = (cfg.num_attention_heads * hd * 2 + cfg.num_key_value_heads * hd * 2) * H * 2
    router = E * H * 4
    distinct = E * (1 - (1 - k / E) ** batch)
    experts = distinct * 3 * H * cfg.intermediate_size * 2
    kv = batch * context * layers * 2 * cfg.num_key_value_heads * hd * 2
    return int(layers * (attn + router + experts) + cfg.vocab_size * H * 2 + kv)


def timed_steps(engine: LLMEngine, steps: int) -> float:
    """Seconds per engine step over `steps` steps, the device synchronised before and after."""
    sync(engine)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine)
    return (time.perf_counter() - t0) / steps


def sync(engine: LLMEngine) -> None:
    if engine.backend.device.type == "cuda":
        torch.cuda.synchronize(engine.backend.device)


# MiniMax-M2.5's generation_config.json sampling (what a request that sets none gets)
SAMPLED = dict(temperature=1.0, top_p=0.95, top_k=40)


def decode_row(engine: LLMEngine, cfg, layers: int, batch: int, steps: int, bw: float, g: torch.Generator,
               prompt: int = PROMPT, sampling: dict | None = None) -> dict:
    """Decode at `batch` sequences of `prompt` random tokens: wall time per step through the engine,
    the GPU time of its CUDA graph replayed alone (when graphed), both against the bytes floor. The
    batch is aborted afterwards."""
    # long enough that no sequence ends inside the timed steps (a smaller batch would capture a new
    # bucket's graph there)
    params = SamplingParams(**(sampling or dict(temperature=0)), max_tokens=4096, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(0, min(2000, cfg.vocab_size), (prompt,), generator=g).tolist(), params)
    while any(s.num_computed < len(s.prompt) for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill (and the graph capture at the first decode step)
    for _ in range(3):
        engine.step()
    wall = timed_steps(engine, steps)
    dg = engine.executor.decode_graphs
    graphs = dg is not None and dg.use_graphs
    gpu = cuda_seconds(dg.graphs[dg.bucket(batch)].replay) if graphs else None
    context = max(len(s) for s in engine.scheduler.running)
    floor = floor_bytes(cfg, layers, batch, context) / bw
    if len(engine.scheduler.running) != batch:
        raise RuntimeError(f"{len(engine.scheduler.running)} sequences running, not {batch}: timings invalid")
    row = dict(layers=layers, batch=batch, cuda_graphs=graphs, context=context, step_ms=round(wall * 1e3, 3),
               tokens_per_s=round(batch / wall, 1), floor_ms=round(floor * 1e3, 3),
               step_vs_floor=round(wall / floor, 2))
    if gpu is not None:
        # per layer: the step's GPU time and the floor less the LM head's (floor_bytes at 0 layers)
        layer_floor = (floor_bytes(cfg, layers, batch, context) - floor_bytes(cfg, 0, batch, context)) / bw / layers
        row |= dict(gpu_ms=round(gpu * 1e3, 3), host_share=round(max(0.0, wall - gpu) / wall, 3),
                    gpu_vs_floor=round(gpu / floor, 2), layer_gpu_us=round(gpu / layers * 1e6, 1),
                    layer_floor_us=round(layer_floor * 1e6, 1))
    while engine.has_unfinished():  # finish this batch before the next size
        for s in list(engine.scheduler.running) + list(engine.scheduler.waiting):
            engine.abort(s)
    return row


def run(res: Results, layers: int = 4, batches=(1, 8, 32), steps: int = 30) -> None:
    spec = replace(PRESETS["real"], num_hidden_layers=layers)
    cfg = parse_hf_config(hf_config(spec))
    bw = gpu_bandwidth()
    res.add("step", what="gpu_copy_bandwidth", gb_per_s=round(bw / 1e9, 1))
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_export(cfg, Path(tmp), max_tokens=1024)
        backend = TorchBackend(manifest, 0, "cuda", torch.bfloat16, checkpoint=RandomWeights(cfg))
        # graphs with async scheduling (the default), graphs one step at a time (the host's work not
        # overlapped: the host share it hides), and eager
        for graphs, overlap in ((True, True), (True, False), (False, True)):
            engine = LLMEngine(tmp, EngineConfig(backend="torch", device="cuda", dtype="bfloat16", kv_cache_gb=4,
                                              max_num_seqs=max(batches), cuda_graphs=graphs,
                                              graph_max_context=2048, max_num_batched_tokens=1024,
                                              async_scheduling=overlap),
                            backend=backend)
            g = torch.Generator().manual_seed(1)
            for B in batches:
                res.add("step", async_scheduling=overlap, **decode_row(engine, cfg, layers, B, steps, bw, g))
            if graphs:  # the model's default sampling (on the device with async scheduling, else the host's)
                res.add("step", async_scheduling=overlap, sampling="top_k=40,top_p=0.95,T=1",
                        **decode_row(engine, cfg, layers, max(batches), steps, bw, g, sampling=SAMPLED))
            engine.close()
        res.add("step", what="gpu_memory", max_allocated_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2))
