"""Part 1: export of a real-width checkpoint (MiniMax-M2.5's true widths, random FP8 weights, the
`real` preset of export/tiny.py; one layer by default) for TP=8, all ranks, BF16 graphs only (no FP32
twins), with 1 and with N worker jobs: wall time against the I/O floor measured on the same disk in
the same run -- reading the checkpoint's bytes (warm page cache, as the export then reads them) plus
writing as many bytes as the export wrote, fsync'd --; the export's peak RSS and its largest job's
against 1.5 x one layer-rank's BF16 weights + 1 GiB per process; and the preflight's predicted bytes
against what was written.
"""
from __future__ import annotations

import os
import re
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


def _export(ckpt: Path, out: Path, jobs: int) -> tuple[float, int, float]:
    """(wall seconds, the export process's peak RSS, its largest job's peak RSS in GiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "export.to_onnx", str(ckpt), "--tp", "8", "--out", str(out),
                             "--fp32-twins", "off", "--jobs", str(jobs), "--quiet"], stdout=subprocess.PIPE, text=True)
    # wait4: this one child's peak RSS (RUSAGE_CHILDREN would also count the checkpoint writer above).
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout = proc.stdout.read()
    if os.waitstatus_to_exitcode(status):
        raise subprocess.CalledProcessError(os.waitstatus_to_exitcode(status), proc.args, stdout)
    job = re.search(r"largest job (\d+\.\d+) GiB", stdout)
    print(stdout.strip(), file=sys.stderr, flush=True)
    return wall, usage.ru_maxrss * 1024, float(job.group(1)) if job else 0.0


def run(res: Results, layers: int = 1, jobs: list[int] | None = None, preset: str = "real", out: Path = OUT) -> dict:
    """preset: the checkpoint's shape (`real`; a toy for the smoke run), written under `out`."""
    from export import preflight
    from export.config import ModelConfig
    from export.layout import make_layout

    ckpt, out = out / f"{preset}-{layers}l", out / f"{preset}-{layers}l-onnx"
    if not (ckpt / "config.json").is_file():
        print(f"writing the {preset} {layers}-layer checkpoint (once; minutes at real width) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "export.tiny", str(ckpt), "--preset", preset, "--layers", str(layers)],
                       check=True)
    est = preflight.estimate(make_layout(ModelConfig.from_checkpoint(ckpt), 8))
    jobs = jobs or sorted({1, preflight.default_jobs(len(est.units), est.total(False))})
    shards = sorted(ckpt.glob("*.safetensors"))
    read_seconds(shards)  # warm the page cache, as a previous step would have
    t_read = read_seconds(shards)
    runs = []
    for n in jobs:
        shutil.rmtree(out, ignore_errors=True)
        wall, peak, job_peak = _export(ckpt, out, n)
        files = [f for f in out.rglob("*") if f.is_file()]
        written = sum(f.stat().st_size for f in files)
        layer_rank = max(sum(f.stat().st_size for f in (out / "tp8" / f"rank{r}").glob("layers.0.*")) for r in range(8))
        runs.append((n, wall, peak, job_peak, written, layer_rank))
        print(f"export, {n} job(s): {wall:.1f} s, {written / 1e9:.2f} GB written", file=sys.stderr, flush=True)
    shutil.rmtree(out, ignore_errors=True)
    t_write = write_seconds(out.parent / "floor.tmp", runs[-1][4])  # the same bytes, fsync'd, same disk
    floor = t_read + t_write
    rows = []
    for n, wall, peak, job_peak, written, layer_rank in runs:
        limit = 1.5 * layer_rank + 2**30
        rows.append(res.add(
            "export", tp=8, layers=layers, jobs=n, cores=preflight.cpu_count(), seconds=round(wall, 1),
            floor_seconds=round(floor, 1), read_seconds=round(t_read, 1), write_seconds=round(t_write, 1),
            read_gb=round(sum(f.stat().st_size for f in shards) / 1e9, 2), written_gb=round(written / 1e9, 2),
            time_vs_floor=round(wall / floor, 2), peak_rss_gb=round(peak / 2**30, 2),
            job_peak_rss_gb=round(job_peak, 2) if job_peak else None, layer_rank_gb=round(layer_rank / 2**30, 2),
            rss_limit_gb=round(limit / 2**30, 2), preflight_vs_written=round(est.total(False) / written, 4)))
    return rows[-1]
