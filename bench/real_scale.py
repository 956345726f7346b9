"""Part `real-scale`: a model at full depth through the load path a user's model takes -- an FP8
checkpoint on disk, its export manifest, LLMEngine with the torch backend (bf16, CUDA graphs) --
not random weights made on the GPU. With the `rank8` preset (one TP=8 rank's widths at MiniMax-M2.5's
62 layers and 256 experts) it is one rank's compute without the all-reduces.

    python -m bench.real_scale --preset rank8                 # writes the checkpoint once (~30 GB)
    python -m bench.real_scale --checkpoint DIR [--long-prompt 131072] [--chunk 2048]
    python -m bench --parts real-scale --real-preset rank8    # the same, from the benchmark runner

Measures: the load time (checkpoint to a ready engine) and peak host RSS; GPU memory after the load
against the memory plan (weights, and weights + KV cache); decode at batch 1, 8 and 32 (tokens/s,
step and per-layer GPU time against the bytes floor, as the step part); a long prompt's chunked
prefill (against the FLOP floor, as the prefill part) and the decode after it (eager past the CUDA
graphs' context). The manifest is the export's, without the graphs (the torch backend builds its
weights from the checkpoint the manifest records; a full export of the rank8 checkpoint would not
fit beside it on a 64 GB disk). The run ends with the chat.py and OpenAI-server command lines for the
same manifest. Without a GPU the part is skipped unless `--device cpu` (a tiny preset: the tests).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from export.checkpoint import Checkpoint
from export.layout import make_layout
from export.manifest import Manifest
from export.text_config import TEXT_FILES

from .common import OUT, Results

PART = "real-scale"
DEFAULT_PRESET = "rank8"


def write_load_manifest(checkpoint: str | Path, out: str | Path, tp: int = 1, expert_split: str = "intermediate",
                        moe_forms: str | None = None, max_tokens: int | None = None) -> Manifest:
    """The manifest the export would write for this checkpoint (its layout, MoE schedule, checkpoint
    and text files) without the graphs or their weights: what the torch backend loads from."""
    from export.to_onnx import DEFAULT_MAX_TOKENS, choose_schedule

    ckpt = Checkpoint(checkpoint)  # every shard's header checked, as the export does first
    max_tokens = max_tokens or DEFAULT_MAX_TOKENS
    moe = choose_schedule(ckpt.config, tp, expert_split, max_tokens, moe_forms, None)
    layout = make_layout(ckpt.config, tp, expert_split, moe.forms)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    text_files = []
    for name in TEXT_FILES:
        if (ckpt.dir / name).is_file():
            shutil.copyfile(ckpt.dir / name, root / name)
            text_files.append(name)
    man = Manifest(config=layout.cfg, tp=tp, expert_split=expert_split, opset=0, fp32_twins=False, moe=moe,
                   max_tokens=max_tokens, steps=layout.steps, subgraphs={s.name: s for s in layout.subgraphs},
                   files={}, checkpoint=str(ckpt.dir.resolve()),
                   checkpoint_relative=os.path.relpath(ckpt.dir.resolve(), root.resolve()), text_files=text_files,
                   producer="bench.real_scale (manifest only: the torch backend reads the checkpoint)")
    return Manifest.load(man.save(root))


def ensure_checkpoint(res: Results, preset: str, layers: int | None, folder: Path) -> Path:
    """The preset's checkpoint in `folder`, written by export.tiny unless one of that shape is there."""
    from export.config import ModelConfig
    from export.tiny import PRESETS, write_checkpoint

    if preset not in PRESETS:
        raise SystemExit(f"error: no preset {preset!r} in export/tiny.py (it has {', '.join(sorted(PRESETS))})")
    spec = PRESETS[preset] if layers is None else replace(PRESETS[preset], num_hidden_layers=layers)
    try:
        if ModelConfig.from_checkpoint(folder).num_hidden_layers == spec.num_hidden_layers:
            Checkpoint(folder)  # complete and of the config's shapes (headers only)
            return folder
    except (OSError, ValueError):
        pass
    t0 = time.perf_counter()
    write_checkpoint(folder, spec, seed=0)
    size = sum(f.stat().st_size for f in folder.iterdir())
    res.add(PART, what="checkpoint_written", preset=preset, layers=spec.num_hidden_layers,
            seconds=round(time.perf_counter() - t0, 1), gb=round(size / 1e9, 2))
    return folder


def weight_storage_bytes(backend) -> int:
    """Bytes of the distinct storages under the backend's parameters (what its weights hold)."""
    seen = {}
    for m in backend.modules.values():
        for p in m.parameters():
            s = p.untyped_storage()
            seen[(str(p.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def reset_peak_rss() -> None:
    """Start the peak-RSS count over (Linux: writing 5 to clear_refs resets VmHWM), so the load's
    peak is not the checkpoint writer's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gb() -> float:
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return round(int(line.split()[1]) / 2**20, 2)
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def floors(device: str) -> tuple[float, float]:
    """Copy bandwidth (bytes/s) and bf16 matmul rate (FLOP/s) of the device, measured here."""
    from .common import cpu_bandwidth, cpu_seconds, gpu_bandwidth
    if device == "cuda":
        from .prefill import matmul_flops
        bw, peak = gpu_bandwidth(), matmul_flops()
        torch.cuda.empty_cache()
        return bw, peak
    a = torch.randn(512, 512, dtype=torch.bfloat16)
    return cpu_bandwidth(1 << 26), 2 * 512 ** 3 / cpu_seconds(lambda: a @ a)


def engine_config(device: str, dtype: str, batch: int, chunk: int, utilization: float, kv_tokens: int, cfg,
                  prefill_graphs: bool = True):
    from runtime.config import EngineConfig

    kv = {}
    if device == "cuda":  # the KV cache the memory plan leaves, as a user runs it
        kv = dict(gpu_memory_utilization=utilization)
    else:
        per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
        kv = dict(kv_cache_gb=kv_tokens * per_token / 2**30)
    return EngineConfig(backend="torch", device=device, dtype=dtype, max_num_seqs=batch, max_num_batched_tokens=chunk,
                        cuda_graphs=device == "cuda", prefill_graphs=prefill_graphs, **kv)


def memory_row(res: Results, engine, base: int, utilization: float, batch: int) -> None:
    """GPU memory after the load against the plan (weights alone, and with the KV cache)."""
    from engines.memory_plan import GB, plan

    man, kv = engine.manifest, engine.kv
    kv_bytes = sum(t.numel() * t.element_size() for t in list(kv.k) + list(kv.v))
    held = weight_storage_bytes(engine.backend)
    dev = engine.backend.device
    total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else 0
    r = plan(man.config, man.tp, total or 80e9, utilization, engine.max_num_batched_tokens, batch, man.moe,
             man.expert_split)[0]
    row = dict(what="memory_after_load", plan_weights_gb=round(r.weights / GB, 3),
               weights_held_gb=round(held / GB, 3), held_vs_plan=round(held / r.weights, 4), kv_gb=round(kv_bytes / GB, 3))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        allocated = torch.cuda.memory_allocated(dev) - base
        free, total = torch.cuda.mem_get_info(dev)
        row |= dict(allocated_gb=round(allocated / GB, 3), plan_kv_gb=round(r.kv_cache / GB, 3),
                    allocated_weights_vs_plan=round((allocated - kv_bytes) / r.weights, 4),
                    allocated_vs_plan=round(allocated / (r.weights + kv_bytes), 4),
                    within_5_percent=abs(allocated - kv_bytes - r.weights) <= 0.05 * r.weights,
                    device_used_gb=round((total - free) / GB, 2), plan_budget_gb=round(r.budget / GB, 2))
    res.add(PART, **row)


def long_prompt(res: Results, engine, cfg, n: int, peak: float, bw: float, after_steps: int,
                decode: bool = True) -> None:
    """One n-token prompt, prefilled in chunks of the step budget: time to its first token against the
    FLOP floor, then (decode) decode at its context."""
    from runtime.sampling import SamplingParams

    from .prefill import decode_after, useful_flops
    from .step import sync

    n = min(n, engine.max_model_len - after_steps - 8)
    vocab = min(2000, cfg.vocab_size)
    # the first long prompt of the process, then another one (no prefix-cache hits): the first pays
    # the kernel compiles and CUDA-graph captures its chunk shapes and contexts need
    first = torch.randint(vocab // 2, vocab, (n,), generator=torch.Generator().manual_seed(n + 1)).tolist()
    prompt = torch.randint(0, vocab // 2, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    sync(engine)
    t0 = time.perf_counter()
    engine.generate([first], params)
    sync(engine)
    first_s = time.perf_counter() - t0
    if engine.backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    seq = engine.generate([prompt], params)[0]
    sync(engine)
    ttft = time.perf_counter() - t0
    floor = useful_flops(cfg, cfg.num_hidden_layers, n) / peak
    pg = engine.executor.prefill_graphs
    row = dict(what="long_prompt", prompt=n, chunk=engine.max_num_batched_tokens, ttft_s=round(ttft, 3),
               tokens_per_s=round(n / ttft), floor_s=round(floor, 3), ttft_vs_floor=round(ttft / floor, 2),
               first_prompt_ttft_s=round(first_s, 3), prefill_graphs=len(pg.graphs) if pg else 0,
               output_tokens=len(seq.output))
    if engine.backend.device.type == "cuda":
        row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    res.add(PART, **row)
    if decode:
        decode_after(res, engine, prompt, cfg, cfg.num_hidden_layers, bw, after_steps, part=PART)


def commands(res: Results, root: Path, utilization: float, chunk: int) -> None:
    """chat.py and the OpenAI server on the same manifest (run after this process has exited)."""
    flags = (f"--model {root} --backend torch --device cuda --dtype bfloat16 "
             f"--gpu-memory-utilization {utilization:g} --max-num-batched-tokens {chunk}")
    res.add(PART, what="commands", chat=f"python runtime/chat.py {flags}",
            chat_scripted=f"python runtime/chat.py {flags} --prompt 'Hello!' --max-tokens 32 --temperature 0",
            serve=f"python -m runtime.serve {flags} --port 8000",
            client="curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' "
                   "-d '{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], "
                   "\"max_tokens\": 32}'")


def run(res: Results, checkpoint: str | Path | None = None, preset: str = DEFAULT_PRESET, layers: int | None = None,
        device: str = "cuda", dtype: str = "bfloat16", batches=(1, 8, 32), steps: int = 30, prompt: int = 512,
        long: int | tuple[int, ...] = 131072, chunk: int = 2048, after_steps: int = 16, utilization: float = 0.9,
        work: Path = OUT / PART, prefill_graphs: bool = True) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        res.add(PART, skipped="no GPU here (--device cpu runs it on the CPU)")
        return
    from runtime.llm_engine import LLMEngine

    from .step import decode_row

    if checkpoint is None:
        name = preset + (f"-{layers}l" if layers is not None else "")
        ckpt_dir = ensure_checkpoint(res, preset, layers, work / name / "checkpoint")
    else:
        ckpt_dir = Path(checkpoint)
        name = ckpt_dir.resolve().name
    man = write_load_manifest(ckpt_dir, work / name / "tp1", max_tokens=chunk)
    cfg = man.config
    bw, peak = floors(device)
    res.add(PART, what="floors", copy_gb_per_s=round(bw / 1e9, 1), matmul_tflops=round(peak / 1e12, 2),
            layers=cfg.num_hidden_layers, experts=cfg.num_experts, top_k=cfg.top_k, moe_forms=man.moe.spec())
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    longs = (long,) if isinstance(long, int) else tuple(long)
    kv_tokens = int(1.2 * max(max(longs) + 2 * chunk, max(batches) * (prompt + steps + 64)))
    reset_peak_rss()
    t0 = time.perf_counter()
    engine = LLMEngine(man.root, engine_config(device, dtype, max(batches), chunk, utilization, kv_tokens, cfg,
                                               prefill_graphs))
    res.add(PART, what="load", seconds=round(time.perf_counter() - t0, 1), layers=cfg.num_hidden_layers,
            peak_host_rss_gb=peak_rss_gb(),
            kv_blocks=engine.kv.num_blocks, max_model_len=engine.max_model_len)
    try:
        memory_row(res, engine, base, utilization, max(batches))
        g = torch.Generator().manual_seed(1)
        for b in batches:
            res.add(PART, what="decode", **decode_row(engine, cfg, cfg.num_hidden_layers, b, steps, bw, g, prompt))
        for n in sorted(longs):  # the decode after the longest only
            long_prompt(res, engine, cfg, n, peak, bw, after_steps, decode=n == max(longs))
        if device == "cuda":
            res.add(PART, what="gpu_memory_peak", max_allocated_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2))
    finally:
        engine.close()
    commands(res, man.root, utilization, chunk)


def _lengths(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"prompt lengths are comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"prompt lengths must be >= 1, got {text!r}")
    return out


def add_args(ap: argparse.ArgumentParser, prefix: str = "") -> None:
    """The part's options; `python -m bench` adds them as --real-* where its own flags would clash."""
    ap.add_argument("--checkpoint", help="an FP8 checkpoint folder (default: write the preset's)")
    ap.add_argument(f"--{prefix}preset", dest="real_preset", default=DEFAULT_PRESET,
                    help=f"export/tiny.py preset to write when no --checkpoint (default {DEFAULT_PRESET})")
    ap.add_argument("--long-prompt", type=_lengths, default=(131072,),
                    help="tokens of the long prompt, or comma-separated lengths, each timed after a warm-up prompt "
                         "of its length (default 131072)")
    ap.add_argument("--chunk", type=int, default=2048, help="tokens per step: the prefill chunk (default 2048)")
    ap.add_argument("--utilization", type=float, default=0.9,
                    help="GPU memory fraction the plan sizes the KV cache from (default 0.9)")
    ap.add_argument(f"--{prefix}no-prefill-graphs", dest="prefill_graphs", action="store_false",
                    help="prefill chunks eagerly (default: replayed from CUDA graphs, as the engine's default)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.real_scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: the code path on a tiny preset")
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes (default 1,8,32)")
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps per batch size (default 30)")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens of the decode batches (default 512)")
    ap.add_argument("--work", type=Path, default=OUT / PART, help=f"where checkpoints and manifests go (default {OUT / PART})")
    ap.add_argument("--results", type=Path, default=OUT, help=f"folder of results.jsonl (default {OUT})")
    a = ap.parse_args(argv)
    run(Results(a.results), a.checkpoint, a.real_preset, a.layers, a.device, batches=tuple(int(b) for b in a.batches.split(",")),
        steps=a.steps, prompt=a.prompt, long=a.long_prompt, chunk=a.chunk, utilization=a.utilization, work=a.work,
        prefill_graphs=a.prefill_graphs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
