"""Where a prefill's time goes: one prompt's whole prefill under torch.profiler, each kernel's time
given to the part of the model that launched it, and the kernels' sum against the wall time.

A kernel is classified by what was running on the host when it was launched, not by its name: the
ranges of runtime/profile_ranges.py (each piece the torch backend runs, the attention op and its KV
writes, the MoE kernels' router and experts; on only while profiling) and the aten op. Inside a piece
with GEMMs and other ops (the attention block: norm, q/k/v, QK norm, RoPE; the post block: o_proj,
residual add, norm) an aten matmul among the launching ops makes it a projection. The profiler links
a kernel to the aten op that launched it; a kernel launched from Python outside any aten op (Triton's)
is placed by the time of its launch API call among the host's ops and ranges. On a GPU the device's
time is counted (kernels, memcpy, memset); on the CPU, where ops run where they are called, each aten
op's own time (its children's excluded). The MoE modules' forms in PyTorch ops (the CPU path, the
block and dense comparisons) have no runtime ranges inside: while profiling, the module is marked as
experts and its router method as the router, so there the residual add and norm before the router
count as experts.
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from export.model import Moe
from runtime import profile_ranges as pr
from runtime.sampling import SamplingParams

PARTS = ("attention", "moe_experts", "router", "projections", "norms_rope_kv", "lm_head", "other")
# ranges that decide alone, innermost first
INNER = {pr.KV_WRITE: "norms_rope_kv", pr.ATTENTION: "attention", pr.ROUTER: "router", pr.EXPERTS: "moe_experts"}
# pieces (export/layout.py) of one part whatever their ops
WHOLE = {"embed": "other", "head": "lm_head"}
# pieces of projections and norms/RoPE, told apart by whether a matmul op launched the kernel
MIXED = {"attn", "attn_in", "qk_rope", "o_proj", "post", "moe"}
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
           "aten::_scaled_mm"}
# the runtime's Triton kernels by name, for a profile that recorded no launch for them (driver-API
# launches are not traced by every PyTorch build): the last resort, counted apart (`by_name`)
TRITON = {"_prefill_kernel": "attention", "_merge_kernel": "attention", "_up_kernel": "moe_experts",
          "_down_kernel": "moe_experts", "_count_kernel": "moe_experts", "_offsets_kernel": "moe_experts",
          "_place_kernel": "moe_experts", "_norm_gate_top_k_kernel": "router"}


def classify(chain: list[str]) -> str:
    """The part of a kernel whose launching ops and ranges are `chain`, innermost first."""
    matmul = False
    for name in chain:
        if name in INNER:
            return INNER[name]
        matmul |= name in MATMULS
        if name.startswith(pr.PIECE):
            piece = name[len(pr.PIECE):]
            if piece in WHOLE:
                return WHOLE[piece]
            if piece in MIXED:
                return "projections" if matmul else "norms_rope_kv"
            return "other"
    return "other"  # outside every piece: sampling, the logits' gather, the step's inputs


def parent_chain(fe) -> list[str]:
    names = []
    while fe is not None:
        names.append(fe.name)
        fe = fe.cpu_parent
    return names


def enclosing(intervals: list[tuple[float, float, str]], times: list[float]) -> list[list[str]]:
    """For each time, the names of the intervals (start, end, name) holding it, innermost first. The
    intervals nest (one thread's ops and ranges): a sweep with a stack of the open ones."""
    order = sorted(intervals, key=lambda iv: (iv[0], -iv[1]))
    out: list = [None] * len(times)
    stack: list = []
    i = 0
    for j in sorted(range(len(times)), key=times.__getitem__):
        t = times[j]
        while i < len(order) and order[i][0] <= t:
            while stack and stack[-1][1] < order[i][0]:
                stack.pop()
            stack.append(order[i])
            i += 1
        while stack and stack[-1][1] < t:
            stack.pop()
        out[j] = [iv[2] for iv in reversed(stack)]
    return out


def part_seconds(prof, device: str) -> tuple[dict[str, float], dict]:
    """Seconds per part of a finished profile `prof`, and how they were attributed.

    On "cuda", each device activity (kernel, memcpy, memset) by its launch: the API call that the
    profiler links it to (its correlation id), then the ops and ranges open on that call's thread when
    it ran, innermost first (classify). Read from the raw profiler events by name, start, end,
    thread and correlation alone, which every PyTorch 2 release has; a device event with no launch
    found goes to "other" and is reported (`unlinked_ms`, the largest by name). On "cpu", each aten
    op's own time."""
    out = dict.fromkeys(PARTS, 0.0)
    how: Counter = Counter()
    unlinked: Counter = Counter()
    host_ms: Counter = Counter()
    if device == "cuda":
        events = prof.profiler.kineto_results.events()
        host = [e for e in events if e.device_type() == DeviceType.CPU]
        launches = {e.correlation_id(): e for e in host if e.name().startswith("cu")}  # cuda*/cu* API calls
        spans: dict = {}  # thread -> (start, end, name) of its ops and ranges
        for e in host:
            if not e.name().startswith("cu"):
                spans.setdefault(e.start_thread_id(), []).append((e.start_ns(), e.end_ns(), e.name()))
        host_names = {iv[2] for ivs in spans.values() for iv in ivs}
        # the host's own time in each range (launch work, Python, waits): where a host-bound step goes
        for e in host:
            name = e.name()
            if name.startswith(pr.PIECE) or name in INNER:
                host_ms[name] += e.duration_ns() / 1e6
        # the device copies of the ranges (gpu_user_annotation) carry their names: not activities
        device_events = [e for e in events if e.device_type() == DeviceType.CUDA and e.name() not in host_names]
        if not device_events:
            raise RuntimeError("the profile has no device activity")
        pending: dict = {}  # thread -> [(seconds, launch time)]
        for e in device_events:
            sec = e.duration_ns() / 1e9
            launch = launches.get(e.correlation_id()) or launches.get(e.linked_correlation_id())
            if launch is None and e.name() in TRITON:
                out[TRITON[e.name()]] += sec
                how["by_name"] += 1
                continue
            if launch is None:
                unlinked[e.name()[:60]] += sec
                out["other"] += sec
                how["unlinked"] += 1
                continue
            pending.setdefault(launch.start_thread_id(), []).append((sec, (launch.start_ns() + launch.end_ns()) / 2))
        for thread, items in pending.items():
            for (sec, _), chain in zip(items, enclosing(spans.get(thread, []), [t for _, t in items])):
                part = classify(chain) or "other"
                out[part] += sec
                how["launch"] += 1
    else:
        for fe in prof.events():
            if fe.device_type != DeviceType.CPU or fe.is_async or fe.activity_type != "cpu_op":
                continue
            out[classify(parent_chain(fe)) or "other"] += fe.self_cpu_time_total / 1e6
            how["cpu_op"] += 1
    info = dict(attributed=dict(how), host_ms={k: round(v, 3) for k, v in host_ms.most_common()},
                unlinked_ms=round(sum(unlinked.values()) * 1e3, 3),
                unlinked_top={k: round(v * 1e3, 3) for k, v in unlinked.most_common(3)})
    return out, info


@contextlib.contextmanager
def marked_moe_modules(modules):
    """While profiling, the MoE modules' own forms (PyTorch ops, no runtime ranges inside): the module
    in an experts range, its router method in a router range."""
    handles, moes = [], [m for mod in modules for m in mod.modules() if isinstance(m, Moe)]
    stack: list = []

    def enter(mod, args):
        stack.append(record_function(pr.EXPERTS))
        stack[-1].__enter__()

    def leave(mod, args, out):
        stack.pop().__exit__(None, None, None)

    def routed(route):
        def wrapper(x):
            with record_function(pr.ROUTER):
                return route(x)
        return wrapper

    try:
        for m in moes:
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
            m.route = routed(m.route)  # an instance attribute over the class's method
        yield
    finally:
        for h in handles:
            h.remove()
        for m in moes:
            m.__dict__.pop("route", None)


def profiled_prefill(engine, prompt: list[int]):
    """Prefill `prompt` (max_tokens 1: the whole time to first token) under the profiler, the ranges
    on: the finished profile and the profiled run's wall seconds. The prompt must not be in the
    prefix cache (its chunks would not run)."""
    dev = engine.backend.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    sync()
    with marked_moe_modules(engine.backend.modules.values()), pr.recording(), profile(activities=activities) as prof:
        t0 = time.perf_counter()
        seq = engine.generate([prompt], params)[0]
        sync()
        wall = time.perf_counter() - t0
    if seq.num_cached_prompt:
        raise RuntimeError(f"{seq.num_cached_prompt} of the profiled prompt's tokens came from the prefix cache")
    return prof, wall


def prefill_parts(engine, prompt: list[int]) -> dict:
    """profiled_prefill's seconds per part, their sum, its wall seconds, and how they were attributed."""
    prof, wall = profiled_prefill(engine, prompt)
    parts, info = part_seconds(prof, engine.backend.device.type)
    return dict(parts=parts, total=sum(parts.values()), wall=wall, **info)


def shares_row(p: dict, ttft: float) -> dict:
    """A result row's fields: each part's ms and share of the summed kernel time, that sum against the
    unprofiled time to first token `ttft` (the rest: host work and gaps between kernels)."""
    total = p["total"]
    return dict(kernel_ms=round(total * 1e3, 3), ttft_ms=round(ttft * 1e3, 3),
                profiled_wall_ms=round(p["wall"] * 1e3, 3), kernel_vs_ttft=round(total / ttft, 3),
                host_gap_share=round(max(0.0, 1 - total / ttft), 3),
                part_ms={k: round(v * 1e3, 3) for k, v in p["parts"].items()},
                share={k: round(v / total, 4) for k, v in p["parts"].items()},
                attributed=p["attributed"], host_range_ms=p["host_ms"], unlinked_ms=p["unlinked_ms"],
                unlinked_top=p["unlinked_top"])
