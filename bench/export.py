"""Part 1: export of one layer at MiniMax-M2.5's true width (random FP8 weights, the `real` preset of
export/tiny.py) for TP=8, all ranks, BF16 graphs only (no FP32 twins): wall time against the I/O
floor measured on the same disk in the same run -- reading the checkpoint's bytes (warm page cache,
as the export then reads them) plus writing as many bytes as the export wrote, fsync'd --, and the
export process's peak RSS against 1.5 x one layer-rank's BF16 weights + 1 GiB.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import OUT, Results

CHUNK = 64 << 20


def read_seconds(files: list[Path]) -> float:
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(CHUNK):
                pass
    return time.perf_counter() - t0


def write_seconds(path: Path, nbytes: int) -> float:
    block = os.urandom(1 << 20) * (CHUNK >> 20)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        left = nbytes
        while left > 0:
            left -= fh.write(block[:min(left, CHUNK)])
        os.fsync(fh.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


def run(res: Results) -> dict:
    ckpt, out = OUT / "real-1l", OUT / "real-1l-onnx"
    if not (ckpt / "config.json").is_file():
        print("writing the real-width one-layer checkpoint (once; a few minutes) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "export.tiny", str(ckpt), "--preset", "real"], check=True)
    shutil.rmtree(out, ignore_errors=True)
    shards = sorted(ckpt.glob("*.safetensors"))
    read_seconds(shards)  # warm the page cache, as a previous step would have
    t_read = read_seconds(shards)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "export.to_onnx", str(ckpt), "--tp", "8", "--out", str(out),
                             "--no-fp32-twins", "--quiet"])
    # wait4: this one child's peak RSS (RUSAGE_CHILDREN would also count the checkpoint writer above).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    peak = usage.ru_maxrss * 1024
    files = [f for f in out.rglob("*") if f.is_file()]
    written = sum(f.stat().st_size for f in files)
    layer_rank = max(sum(f.stat().st_size for f in (out / "tp8" / f"rank{r}").glob("layers.0.*")) for r in range(8))
    t_write = write_seconds(out / "floor.tmp", written)
    floor = t_read + t_write
    limit = 1.5 * layer_rank + 2**30
    return res.add("export", tp=8, layers=1, seconds=round(wall, 1), floor_seconds=round(floor, 1),
                   read_seconds=round(t_read, 1), write_seconds=round(t_write, 1),
                   read_gb=round(sum(f.stat().st_size for f in shards) / 1e9, 2), written_gb=round(written / 1e9, 2),
                   time_vs_floor=round(wall / floor, 2), peak_rss_gb=round(peak / 2**30, 2),
                   layer_rank_gb=round(layer_rank / 2**30, 2), rss_limit_gb=round(limit / 2**30, 2))
