"""Part: time to first token of one long prompt on the GPU, with random bf16 weights made on the GPU
(as the step part), torch backend, chunked prefill in steps of `chunk` tokens, a few layers at each
of two widths (`widths`, export/tiny.py's presets, each as a TP=1 model): MiniMax-M2.5's true width
(`real`) and one TP=8 rank's (`rank8`: 6 query / 1 KV heads, experts of 192, the vocabulary's slice;
no all-reduces: one GPU). Every row names its widths. The MoE of each chunk runs as the grouped-GEMM
kernel (top-k work only) or, for comparison, as the ONNX graphs' block and dense forms in PyTorch ops
(block-padded dispatch; every expert on every token; prompts up to 8192). Against the FLOP floor of
the useful work of the model measured: per token and layer the attention projections, the attention
itself over the tokens before it (causal), the top-k experts' three matmuls, the router; the LM head
once (one sampled row, of the width's vocabulary); at the bf16 matmul rate measured in the same run
(8192^3). Peak GPU memory is reported per run. At the shortest and the longest prompt (or those
asked for) a CUDA profile of a whole prefill gives each part's share of the kernel time, and that
time against the wall time to first token (bench/prefill_parts.py).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from export.config import parse_hf_config
from export.model import Moe
from export.tiny import PRESETS, hf_config
from runtime.backends.pytorch import TorchBackend
from runtime.config import EngineConfig
from runtime.llm_engine import LLMEngine
from runtime.sampling import SamplingParams

from .common import Results, cuda_seconds, gpu_bandwidth
from .prefill_parts import prefill_parts, shares_row
from .step import RandomWeights, write_export

WIDTHS = ("real", "rank8")  # export/tiny.py presets: TP=1's widths, one TP=8 rank's


def matmul_flops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192 ** 3 / cuda_seconds(lambda: a @ b, reps=10)


def useful_flops(cfg, layers: int, tokens: int) -> float:
    H, hd, k, inter = cfg.hidden_size, cfg.head_dim, cfg.top_k, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    proj = 2 * tokens * H * (2 * q + 2 * kv)
    attn = 2 * 2 * cfg.num_attention_heads * hd * tokens * (tokens + 1) / 2  # QK^T and PV, causal
    experts = 2 * tokens * k * 3 * H * inter
    router = 2 * tokens * H * cfg.num_experts
    return layers * (proj + attn + experts + router) + 2 * H * cfg.vocab_size


def moe_alone(res: Results, cfg, peak: float, tokens: int, widths: str) -> None:
    """One MoE at `tokens` tokens: the grouped kernel and the dense PyTorch form against the FLOP
    floor of the top-k work (where the time of a chunk goes)."""
    from runtime.kernels.grouped_moe import grouped_moe
    H, inter, E, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, H, device="cuda", generator=g).to(torch.bfloat16)
    w13 = (torch.randn(E, 2 * inter, H, device="cuda", generator=g) * H ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, inter, device="cuda", generator=g) * inter ** -0.5).to(torch.bfloat16)
    experts = torch.rand(tokens, E, device="cuda", generator=g).topk(k, -1).indices
    weights = torch.rand(tokens, k, device="cuda", generator=g)
    floor = 2 * tokens * k * 3 * H * inter / peak

    def dense():
        onehot = torch.zeros(tokens, E, device="cuda").scatter_(1, experts, weights)
        y = w13 @ x.T[None]
        a = torch.nn.functional.silu(y[:, :inter]) * y[:, inter:]
        return ((w2 @ a).float() * onehot.T[:, None, :]).sum(0).T

    for form, fn in (("grouped", lambda: grouped_moe(x, experts, weights, w13, w2)), ("dense", dense)):
        t = cuda_seconds(fn, reps=5)
        res.add("prefill", what="moe_alone", widths=widths, form=form, tokens=tokens, ms=round(t * 1e3, 3),
                floor_ms=round(floor * 1e3, 3), vs_floor=round(t / floor, 2))
    del w13, w2
    torch.cuda.empty_cache()


def attention_alone(res: Results, cfg, peak: float, chunk: int, context: int, widths: str) -> None:
    """One layer's paged attention of a `chunk`-token chunk at the end of a `context`-token prompt: the
    runtime's Triton kernel (keys read in place) and the portable op (the sequence's blocks copied
    out, SDPA with a causal mask)."""
    from runtime.attention import AttentionMetadata, paged_attention, sdpa_prefill
    bs, hq, hkv, hd = 16, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    blocks = context // bs
    kc = torch.randn(blocks + 1, bs, hkv, hd, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(chunk, hq, hd, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(chunk, hkv, hd, device="cuda", dtype=torch.bfloat16)
    start = context - chunk
    meta = AttentionMetadata(torch.arange(start, context, device="cuda"), [chunk], [context], [list(range(blocks))])
    flops = 2 * 2 * hq * hd * chunk * (start + (chunk + 1) / 2)
    for how, fn in (("kernel", lambda: paged_attention(q, k, k, kc, vc, meta, hd ** -0.5)),
                    ("sdpa", lambda: sdpa_prefill(q, kc, vc, meta, hd ** -0.5))):
        t = cuda_seconds(fn, reps=5)
        res.add("prefill", what="attention_alone", widths=widths, how=how, chunk=chunk, context=context,
                ms=round(t * 1e3, 3),
                floor_ms=round(flops / peak * 1e3, 3), vs_floor=round(t * peak / flops, 2))


def decode_after(res: Results, engine: LLMEngine, prompt: list[int], cfg, layers: int, bw: float,
                 steps: int = 16, part: str = "prefill", **tags) -> None:
    """Decode at this prompt's context (past the CUDA graphs' context limit, 8192 by default, the
    runtime runs decode steps eagerly): time per token against the bytes floor of the step part.
    `tags`: more fields of the row (the widths)."""
    from .step import floor_bytes, timed_steps
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # cached prompt
    seq = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True))
    while len(seq.output) < 4:
        engine.step()
    cuda = engine.backend.device.type == "cuda"
    before = torch.cuda.memory_stats() if cuda else {}
    per = timed_steps(engine, steps)
    # the caching allocator giving memory back and asking again (cudaFree / cudaMalloc): a sign that
    # the eager steps' scratch does not fit beside the KV cache and the CUDA graphs' pool
    after = torch.cuda.memory_stats() if cuda else {}
    churn = {k: after.get(k, 0) - before.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc")}
    floor = floor_bytes(cfg, layers, 1, len(seq)) / bw
    dg = engine.executor.decode_graphs
    graphs = bool(dg and dg.use_graphs and -(-len(seq) // engine.blocks.block_size) <= dg.max_blocks)
    res.add(part, what="decode_after", **tags, layers=layers, context=len(seq), cuda_graphs=graphs,
            step_ms=round(per * 1e3, 3), floor_ms=round(floor * 1e3, 3), vs_floor=round(per / floor, 2),
            alloc_retries=churn["num_alloc_retries"], device_mallocs=churn["num_device_alloc"])
    while engine.has_unfinished():
        engine.step()


FORMS = ("grouped", "grouped-eager", "block", "block-eager", "dense")


def run(res: Results, layers: int = 4, prompts=(2048, 8192, 32768, 131072), chunk: int = 2048,
        widths=WIDTHS, profile_prompts=None, forms=FORMS) -> None:
    """widths: export/tiny.py presets, each measured as a TP=1 model of `layers` layers;
    profile_prompts: the prompt lengths whose prefill is profiled (default the shortest and longest);
    forms: which of FORMS to time (the dense one only with chunks of at most 2048 tokens)."""
    peak = matmul_flops()
    bw = gpu_bandwidth()
    res.add("prefill", what="bf16_matmul", widths=",".join(widths), tflops=round(peak / 1e12, 1),
            copy_gb_per_s=round(bw / 1e9))
    profiled = set(profile_prompts) if profile_prompts is not None else {min(prompts), max(prompts)}
    for w in widths:
        run_widths(res, w, layers, prompts, chunk, peak, bw, profiled, forms)
        torch.cuda.empty_cache()  # this width's weights went with run_widths' frame


def run_widths(res: Results, widths: str, layers: int, prompts, chunk: int, peak: float, bw: float,
               profiled: set[int], forms=FORMS) -> None:
    """Every measurement of the part at one preset's widths."""
    cfg = parse_hf_config(hf_config(replace(PRESETS[widths], num_hidden_layers=layers)))
    # the timed, warm-up and profiled prompts draw from three disjoint id ranges: no prefix-cache hits
    ids = min(6000, cfg.vocab_size) // 3
    moe_alone(res, cfg, peak, chunk, widths)
    for context in (chunk, 8 * chunk, 64 * chunk):
        if context <= max(chunk, 131072):  # 8192-token chunks: not a 512K context
            attention_alone(res, cfg, peak, chunk, context, widths)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_export(cfg, Path(tmp), max_tokens=chunk)
        backend = TorchBackend(manifest, 0, "cuda", torch.bfloat16, checkpoint=RandomWeights(cfg))
        moes = [sub for mod in backend.modules.values() for sub in mod.modules() if isinstance(sub, Moe)]
        kernels = backend.kernels
        # the kernels with one sequence's chunks replayed from CUDA graphs (the default), the same
        # eagerly (the profiled one: a replay has no ranges), then the ONNX forms as PyTorch ops: the
        # block form from CUDA graphs too (an engine runs its ops without a Python launch each, so the
        # replayed ops are its nearer stand-in) and eagerly, the dense form eagerly
        for form in forms:
            if form == "dense" and chunk > 2048:
                continue  # its [E, 2I, T] products alone are 13 GB a layer at real width and 8192 tokens
            # the grouped kernel through the backend's dispatch; the forms as the modules' own ops
            kernel = form.startswith("grouped")
            backend.kernels = kernels if kernel else replace(kernels, moe_kernels=False)
            for m in moes:
                if not kernel:
                    m.form = form.removesuffix("-eager")
            for n in prompts:
                if not kernel and n > 8192:
                    continue  # minutes per prompt: the comparison is made at the shorter ones
                # room for two prompts (the timed one's blocks stay cached beside the next one's)
                kv_gb = layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2 * (2 * n + 128) / 2**30 + 0.5
                engine = LLMEngine(tmp, EngineConfig(backend="torch", device="cuda", dtype="bfloat16",
                                                  kv_cache_gb=kv_gb, max_num_seqs=1,
                                                  cuda_graphs=form in ("grouped", "block"),
                                                  max_num_batched_tokens=chunk, max_model_len=n + 64),
                                   backend=backend)
                prompt = torch.randint(0, ids, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
                # warm-up at every length (another prompt): each kernel variant a context length
                # selects (the attention's split of the keys) compiled before the timed run
                warm = torch.randint(ids, 2 * ids, (n,), generator=torch.Generator().manual_seed(0)).tolist()
                t0 = time.perf_counter()
                engine.generate([warm], params)
                torch.cuda.synchronize()
                warm_s = time.perf_counter() - t0  # with the JIT compiles and graph captures it needed
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                try:
                    seq = engine.generate([prompt], params)[0]
                    torch.cuda.synchronize()
                except torch.OutOfMemoryError as e:
                    res.add("prefill", widths=widths, form=form, layers=layers, prompt=n, chunk=chunk,
                            error=f"out of memory: {e}"[:200])
                    engine.close()
                    continue
                ttft = time.perf_counter() - t0
                floor = useful_flops(cfg, layers, n) / peak
                assert len(seq.output) == 1
                res.add("prefill", widths=widths, form=form, layers=layers, prompt=n, chunk=chunk,
                        ttft_s=round(ttft, 3), tokens_per_s=round(n / ttft), floor_s=round(floor, 3),
                        ttft_vs_floor=round(ttft / floor, 2), warm_up_s=round(warm_s, 3),
                        prefill_graphs=len(engine.executor.prefill_graphs.graphs)
                        if engine.executor.prefill_graphs else 0,
                        peak_gpu_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2))
                if form == "grouped":
                    decode_after(res, engine, prompt, cfg, layers, bw, widths=widths)
                if form == "grouped-eager" and n in profiled:  # another prompt: none of its blocks cached
                    g = torch.Generator().manual_seed(n)
                    fresh = torch.randint(2 * ids, 3 * ids, (n,), generator=g).tolist()
                    try:
                        shares = shares_row(prefill_parts(engine, fresh), ttft)
                    except Exception as e:  # a profiler that differs: the timed rows stand without it
                        shares = dict(error=f"{type(e).__name__}: {e}"[:300])
                    res.add("prefill", what="parts", widths=widths, form=form, layers=layers, prompt=n,
                            chunk=chunk, **shares)
                engine.close()
                torch.cuda.empty_cache()
