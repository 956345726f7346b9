"""Part 2: the two MoE forms on one real-width tensor-parallel expert shard (MiniMax-M2.5 at TP=8:
256 experts of 3072 x 192), for T tokens: the gather form (reads the T*k chosen experts) and the
dense form (every expert on every token), against the floor of the distinct chosen experts' bytes
(plus the router) over measured memory bandwidth. On ONNX Runtime's CPU provider (the FP32 twins
the export writes, traced the same way) and on the GPU (the same PyTorch module in bf16, replayed
from a CUDA graph as the runtime's decode steps are). The measured crossover, the largest T at which
the gather form is faster, goes to build/bench/moe_crossover.json, which `make onnx` passes to the export (--moe-crossover-file).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from export.checkpoint import LayerWeights
from export.config import parse_hf_config
from export.model import Moe, rms_norm
from export.layout import make_layout
from export.tiny import PRESETS, hf_config

from .common import OUT, Results, cpu_bandwidth, cpu_seconds, cuda_seconds, gpu_bandwidth, graphed

TP = 8
TOKENS = (1, 4, 16, 64, 256, 1024)
CROSSOVER_FILE = OUT / "moe_crossover.json"


def shard_module(form: str, dtype: torch.dtype, device: str) -> tuple[Moe, object]:
    cfg = parse_hf_config(hf_config(PRESETS["real"]))
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size // TP
    g = torch.Generator().manual_seed(0)
    e = torch.empty(0)
    w = LayerWeights(input_norm=e, post_norm=torch.ones(H, dtype=dtype), q_proj=e, k_proj=e, v_proj=e, o_proj=e,
                     q_norm=e, k_norm=e, gate=torch.randn(E, H, generator=g) * H ** -0.5, bias=torch.zeros(E),
                     w13=(torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype),
                     w2=(torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype))
    return Moe(w, cfg, form).to(device).eval(), cfg


def distinct_experts(m: Moe, h: torch.Tensor, a: torch.Tensor) -> int:
    idx, _ = m.route(rms_norm(h + a, m.norm, m.eps))
    return int(idx.unique().numel())


def floor_bytes(m: Moe, distinct: int, elem: int) -> int:
    per_expert = (m.w13[0].numel() + m.w2[0].numel()) * elem
    return distinct * per_expert + m.gate.numel() * 4


def record_row(res: Results, device: str, T: int, m: Moe, h, a, seconds: dict, bw: float, elem: int) -> None:
    """One JSON line: each form's time (None: skipped) in us and against its floor."""
    floors = {"gather": floor_bytes(m, distinct_experts(m, h, a), elem) / bw,
              "dense": floor_bytes(m, m.w13.shape[0], elem) / bw}
    row = {"tokens": T, "distinct_experts": distinct_experts(m, h, a),
           "gather_floor_us": round(floors["gather"] * 1e6, 1), "dense_floor_us": round(floors["dense"] * 1e6, 1)}
    for form, t in seconds.items():
        floor = floors["dense" if form == "dense" else "gather"]
        row[f"{form}_us"] = None if t is None else round(t * 1e6, 1)
        row[f"{form}_vs_floor"] = None if t is None else round(t / floor, 2)
    res.add("moe", device=device, **row)


def _crossover(times: dict[int, tuple[float | None, float]], measure) -> int:
    """Largest T where gather is faster; bisected between the grid points around the switch."""
    grid = sorted(times)
    lo = max([t for t in grid if times[t][0] is not None and times[t][0] <= times[t][1]], default=0)
    above = [t for t in grid if t > lo]
    if lo == 0 or not above:
        return max(lo, 1)
    hi = above[0]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        gather, dense = measure(mid)
        lo, hi = (mid, hi) if gather is not None and gather <= dense else (lo, mid)
    return lo


def run_gpu(res: Results, tokens=TOKENS, gather_limit_gb: float = 12.0) -> int:
    bw = gpu_bandwidth()
    res.add("moe", device="gpu", what="gpu_copy_bandwidth", gb_per_s=round(bw / 1e9, 1))
    from runtime.kernels.fused_moe import gather_moe

    mods = {f: shard_module(f, torch.bfloat16, "cuda")[0] for f in ("gather", "dense")}
    mods["dense"].w13, mods["dense"].w2 = mods["gather"].w13, mods["gather"].w2  # one copy of the experts
    mods["fused"] = shard_module("gather", torch.bfloat16, "cuda")[0]  # what the runtime runs on GPUs
    mods["fused"].w13, mods["fused"].w2 = mods["gather"].w13, mods["gather"].w2
    mods["fused"].gather_kernel = gather_moe
    per_expert = (mods["gather"].w13[0].numel() + mods["gather"].w2[0].numel()) * 2

    def measure(T: int, record: bool = False):
        g = torch.Generator(device="cuda").manual_seed(T)
        h = torch.randn(T, 3072, device="cuda", dtype=torch.bfloat16, generator=g)
        a = torch.randn(T, 3072, device="cuda", dtype=torch.bfloat16, generator=g)
        out = {}
        for form, m in mods.items():
            if form == "gather" and T * 8 * per_expert > gather_limit_gb * 2**30:
                out[form] = None  # the gathered copies alone would not fit
                continue
            replay = graphed(lambda: m(h, a))
            out[form] = cuda_seconds(replay, reps=20)
        if record:
            record_row(res, "gpu", T, mods["gather"], h, a, out, bw, 2)
        torch.cuda.empty_cache()
        return out["fused"], out["dense"]  # the crossover is for what the runtime runs

    times = {T: measure(T, record=True) for T in tokens}
    cross = _crossover(times, measure)
    res.add("moe", device="gpu", what="crossover", moe_crossover_tokens=cross)
    return cross


def _ort_sessions(tmp: Path):
    import onnxruntime as ort

    from export import surgery

    sessions, mods = {}, {}
    bf16 = surgery.WeightsFile(tmp / "moe.weights")
    protos = {}
    for form in ("gather", "dense"):
        m, cfg = shard_module(form, torch.bfloat16, "cpu")
        spec = next(s for s in make_layout(cfg, TP).subgraphs if s.name == f"layers.0.moe_{form}")
        protos[form] = surgery.tidy(surgery.to_proto(surgery.trace(m, spec, cfg), m, bf16), spec)
        mods[form] = m
    bf16.close()
    twins = surgery.WeightsFile(tmp / "moe.fp32.weights")
    twin = {f: surgery.fp32_twin(p, tmp, twins) for f, p in protos.items()}
    twins.close()
    opts = ort.SessionOptions()
    for form, proto in twin.items():
        path = tmp / f"moe_{form}.fp32.onnx"
        surgery.save(proto, path)
        sessions[form] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sessions, mods


def run_cpu(res: Results, tokens=TOKENS, gather_limit_gb: float = 4.0) -> int:
    bw = cpu_bandwidth()
    res.add("moe", device="cpu", what="cpu_copy_bandwidth", gb_per_s=round(bw / 1e9, 1))
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:  # on disk, not /tmp: the FP32 twin is 1.8 GB
        sessions, mods = _ort_sessions(Path(tmp))
        per_expert = (mods["gather"].w13[0].numel() + mods["gather"].w2[0].numel()) * 4

        def measure(T: int, record: bool = False):
            g = torch.Generator().manual_seed(T)
            h = torch.randn(T, 3072, generator=g).to(torch.bfloat16)
            a = torch.randn(T, 3072, generator=g).to(torch.bfloat16)
            feed = {"h": h.float().numpy(), "attn_out": a.float().numpy()}
            out = {}
            for form, s in sessions.items():
                if form == "gather" and T * 8 * per_expert > gather_limit_gb * 2**30:
                    out[form] = None
                    continue
                reps = 5 if T <= 64 else 2
                out[form] = cpu_seconds(lambda: s.run(None, feed), reps=reps)
            if record:
                record_row(res, "cpu", T, mods["gather"], h, a, out, bw, 4)
            return out["gather"], out["dense"]

        times = {T: measure(T, record=True) for T in tokens}
        cross = _crossover(times, measure)
    res.add("moe", device="cpu", what="crossover", moe_crossover_tokens=cross)
    return cross


def save_crossover(tokens: int, device: str) -> None:
    """What the export reads (export/to_onnx.py: measured_crossover) for this shard shape."""
    cfg = parse_hf_config(hf_config(PRESETS["real"]))
    CROSSOVER_FILE.parent.mkdir(parents=True, exist_ok=True)
    CROSSOVER_FILE.write_text(json.dumps({
        "num_experts": cfg.num_experts, "top_k": cfg.top_k, "hidden_size": cfg.hidden_size,
        "shard_intermediate": cfg.intermediate_size // TP, "moe_crossover_tokens": tokens, "measured_on": device,
    }, indent=1))
