"""Part 2: the MoE forms on one real-width tensor-parallel expert shard (MiniMax-M2.5 at TP=8: 256
experts of 3072 x 192), for T tokens: gather (the T*k chosen experts), dense (every expert on every
token) and block (block-padded dispatch: top-k work plus padding), against the floor of the distinct
chosen experts' bytes (plus the router) over measured memory bandwidth. On ONNX Runtime's CPU
provider (the FP32 twins the export writes, traced the same way) and on the GPU (the same PyTorch
modules in bf16, replayed from CUDA graphs; with the runtime's fused and grouped kernels beside
them). The schedule, the fastest ONNX form at each T, goes to build/bench/moe_forms.json, which
`make onnx` passes to the export (--moe-forms-file).
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
from export.moe_forms import FORMS, ShardShape, merge_ranges
from export.tiny import PRESETS, hf_config

from .common import OUT, Results, cpu_bandwidth, cpu_seconds, cuda_seconds, gpu_bandwidth, graphed

TP = 8
TOKENS = (1, 4, 16, 64, 256, 1024, 2048)
FORMS_FILE = OUT / "moe_forms.json"


def shard_module(form: str, dtype: torch.dtype, device: str, preset: str = "real") -> tuple[Moe, object]:
    cfg = parse_hf_config(hf_config(PRESETS[preset]))
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
    """One JSON line: each form's time (None: skipped) in us and against the floor of the distinct
    chosen experts' bytes (the least any form must read)."""
    floor = floor_bytes(m, distinct_experts(m, h, a), elem) / bw
    row = {"tokens": T, "distinct_experts": distinct_experts(m, h, a), "floor_us": round(floor * 1e6, 1)}
    for form, t in seconds.items():
        row[f"{form}_us"] = None if t is None else round(t * 1e6, 1)
        row[f"{form}_vs_floor"] = None if t is None else round(t / floor, 2)
    res.add("moe", device=device, **row)


def _fastest(times: dict[str, float | None]) -> str:
    return min((f for f in FORMS if times.get(f) is not None), key=lambda f: times[f])


def schedule(times: dict[int, dict[str, float | None]], measure) -> str:
    """The --moe-forms spec: the fastest ONNX form at each grid T; where it changes between two grid
    points, the switch is bisected between those two forms. The last form takes the rest."""
    grid = sorted(times)
    best = {T: _fastest(times[T]) for T in grid}
    ranges: list[tuple[str, int]] = []
    for lo, hi in zip(grid, grid[1:]):
        a, b = best[lo], best[hi]
        if a == b:
            continue
        while hi - lo > 1:
            mid = (lo + hi) // 2
            t = measure(mid)
            lo, hi = (mid, hi) if t[a] is not None and (t[b] is None or t[a] <= t[b]) else (lo, mid)
        ranges.append((a, lo))
    ranges.append((best[grid[-1]], 0))
    return ",".join(f if i == len(ranges) - 1 else f"{f}:{hi}"
                    for i, (f, hi) in enumerate(merge_ranges(ranges)))


def run_gpu(res: Results, tokens=TOKENS, gather_limit_gb: float = 12.0) -> str:
    """The three ONNX forms as PyTorch modules in bf16 (the ops the engines run; no TensorRT here),
    and the runtime's own GPU kernels beside them (fused gather; grouped GEMM for many tokens)."""
    bw = gpu_bandwidth()
    res.add("moe", device="gpu", what="gpu_copy_bandwidth", gb_per_s=round(bw / 1e9, 1))
    from runtime import piece_kernels

    mods = {f: shard_module(f, torch.bfloat16, "cuda")[0] for f in FORMS}
    for m in mods.values():  # one copy of the experts
        m.w13, m.w2 = mods["gather"].w13, mods["gather"].w2
    # what the runtime's torch backend runs in the manifest's steps (runtime/piece_kernels.py): the
    # fused router, then the fused gather kernels (few tokens) or the grouped GEMMs (many)
    g = mods["gather"]
    mods["fused"] = lambda h, a: piece_kernels.moe(g, h, a, "gather")
    mods["grouped"] = lambda h, a: piece_kernels.moe(g, h, a, "grouped")
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
            del replay
            torch.cuda.empty_cache()
        if record:
            record_row(res, "gpu", T, mods["gather"], h, a, out, bw, 2)
        return out

    times = {T: measure(T, record=True) for T in tokens}
    spec = schedule(times, measure)
    res.add("moe", device="gpu", what="schedule", moe_forms=spec)
    return spec


def _ort_sessions(tmp: Path, preset: str = "real"):
    import onnxruntime as ort

    from export import surgery

    sessions, mods, feeds = {}, {}, {}
    bf16 = surgery.WeightsFile(tmp / "moe.weights")
    protos = {}
    for form in FORMS:
        m, cfg = shard_module(form, torch.bfloat16, "cpu", preset)
        spec = next(s for s in make_layout(cfg, TP).subgraphs if s.name == f"layers.0.moe_{form}")
        # the experts are graph inputs, as the export writes them; fed here from the module, in FP32 as
        # the runtime's ONNX Runtime backend feeds the twins
        names = tuple(t.name for t in spec.weight_inputs)
        proto, _ = surgery.to_proto(surgery.trace(m, spec, cfg), m, bf16, as_inputs=names)
        protos[form] = surgery.tidy(proto, spec)
        params = dict(m.named_parameters())
        feeds[form] = {n: params[n].detach().float().numpy() for n in names}
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
    return sessions, mods, feeds


CPU_TOKENS = (1, 4, 16, 64, 256)  # two cores would take minutes per dense run beyond


def run_cpu(res: Results, tokens=CPU_TOKENS, gather_limit_gb: float = 4.0, preset: str = "real", out: Path = OUT) -> str:
    """preset: the model whose expert shard is measured (`real`; a toy for the smoke run)."""
    bw = cpu_bandwidth()
    res.add("moe", device="cpu", what="cpu_copy_bandwidth", gb_per_s=round(bw / 1e9, 1))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:  # on disk, not /tmp: the FP32 twin is 1.8 GB
        sessions, mods, weights = _ort_sessions(Path(tmp), preset)
        hidden = mods["gather"].w13.shape[-1]
        per_expert = (mods["gather"].w13[0].numel() + mods["gather"].w2[0].numel()) * 4

        def measure(T: int, record: bool = False):
            g = torch.Generator().manual_seed(T)
            h = torch.randn(T, hidden, generator=g).to(torch.bfloat16)
            a = torch.randn(T, hidden, generator=g).to(torch.bfloat16)
            feed = {"h": h.float().numpy(), "attn_out": a.float().numpy()}
            out = {}
            for form, s in sessions.items():
                if form == "gather" and T * 8 * per_expert > gather_limit_gb * 2**30:
                    out[form] = None
                    continue
                reps = 5 if T <= 64 else 2
                out[form] = cpu_seconds(lambda: s.run(None, feed | weights[form]), reps=reps)
            if record:
                record_row(res, "cpu", T, mods["gather"], h, a, out, bw, 4)
            return out

        times = {T: measure(T, record=True) for T in tokens}
        spec = schedule(times, measure)
    res.add("moe", device="cpu", what="schedule", moe_forms=spec)
    return spec


def save_schedule(spec: str, device: str) -> None:
    """What the export reads (export/to_onnx.py: measured_schedule) for this expert-shard shape."""
    cfg = parse_hf_config(hf_config(PRESETS["real"]))
    s = ShardShape.of(cfg, TP, "intermediate")
    FORMS_FILE.parent.mkdir(parents=True, exist_ok=True)
    FORMS_FILE.write_text(json.dumps({"experts": s.experts, "inter": s.inter, "hidden": s.hidden, "top_k": s.top_k,
                                      "moe_forms": spec, "measured_on": device}, indent=1))
