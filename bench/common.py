"""What every benchmark part shares: the machine's description, measured bandwidths, timers, and
the results file (one JSON object per line)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parents[1] / "build" / "bench"


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu} x{os.cpu_count()}"
    if torch.cuda.is_available():
        desc += f"; {torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    return desc


class Results:
    """Appends each measurement to build/bench/results.jsonl and prints it as a JSON line."""

    def __init__(self, out: Path = OUT):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "results.jsonl"
        self.machine = machine()
        self.date = datetime.date.today().isoformat()
        self.rows: list[dict] = []

    def add(self, part: str, **fields) -> dict:
        row = {"part": part, **fields, "machine": self.machine, "date": self.date}
        self.rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        return row


def cpu_bandwidth(nbytes: int = 1 << 30, reps: int = 3) -> float:
    """Bytes per second of a large memory copy (read + write counted), best of `reps`."""
    a = np.ones(nbytes // 8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best


def gpu_bandwidth(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted), best of `reps`."""
    a = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() * 2 / cuda_seconds(lambda: b.copy_(a), reps, best=True)


def cuda_seconds(fn, reps: int = 20, warmup: int = 3, best: bool = False) -> float:
    """Seconds per call of fn on the GPU (CUDA events around each call): median, or best."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return min(times) if best else statistics.median(times)


def cpu_seconds(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median wall seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graphed(fn):
    """fn captured in a CUDA graph; returns the replay function (fn's output buffers are reused)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay
