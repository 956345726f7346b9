"""What an export will write and need, from the config alone (no weights read): bytes per layer-rank
of the BF16 graphs and of the FP32 twins, the RAM of N export jobs, and the free disk at the output.

The export checks this before it writes anything (so a full disk is an error at the start, not hours
in); `python -m export.to_onnx --dry-run` prints it; `python -m engines.preflight` adds the engines,
the GPUs and TensorRT. The byte counts are the tensors' own bytes (what the external-data files
hold, plus at most a page of alignment per tensor), a fixed allowance per graph file, and the other
files: the text files (their sizes in the checkpoint), the manifest and the stamps (an allowance per
graph and per unit); tests hold the total to what the export writes, files of every kind.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import ModelConfig
from .layout import GraphLayout
from .sharding import Shard

GB = 1e9
GRAPH_BYTES = 5 * 1024    # one .onnx file: nodes, names and the small inline tensors (toy: 0.4-9 KB)
ALIGN = 4096              # each external tensor starts on a page (export/surgery.py)
# The manifest's entry per graph-rank (spec, files, digests) and a stamp per unit (toy: ~1.3 KB
# and ~3.2 KB; allowances above both, a few MB on the real model).
MANIFEST_BYTES_PER_GRAPH = 4096
STAMP_BYTES = 8192
LOCK_BYTES = 4096  # the output folder's lock file (who holds it: export/lock.py)
# Peak RSS of one export job: the interpreter with torch and onnx (~0.45 GiB), one streamed slice of
# experts in flight on each of its threads, the traces. Measured at real width (docs/BENCHMARKS.md):
# 1.06-1.22 GiB for the largest of 8-16 jobs, 1.27 GiB for a one-process export (which also traces).
JOB_RAM = int(1.25 * 2**30)
PARENT_RAM = int(0.75 * 2**30)
SMALL_EXPORT_BYTES = int(1e9)   # below this, one job  # the process that plans and hands out the work
# FP32 twins are for CPU runs (ONNX Runtime has no BF16 MatMul): written by default only when a CPU
# run of the whole model (twins plus the experts in float32) takes at most this much memory.
AUTO_TWINS_MAX_BYTES = int(8e9)


@dataclass(frozen=True)
class UnitBytes:
    """The tensors of one layer-rank (or the embedding, or the LM head): what its weights files hold."""
    bf16: int      # bytes of BF16 tensors
    f32: int       # bytes of float32 tensors (the router), the same in the twins
    tensors: int   # external tensors (each padded to a page at most)
    graphs: int    # .onnx files (one per subgraph)
    inputs: int = 0  # of `bf16`, the experts: graph inputs, which the twins read from the BF16 file

    def written(self, twins: bool) -> int:
        one = self.bf16 + self.f32 + self.tensors * ALIGN + self.graphs * GRAPH_BYTES
        twin = 2 * (self.bf16 - self.inputs) + self.f32 + self.tensors * ALIGN + self.graphs * GRAPH_BYTES
        return one + (twin if twins else 0)


def layer_parts(cfg: ModelConfig, tp: int, expert_split: str = "intermediate") -> dict[str, int]:
    """Element counts of one layer-rank's tensors by part: attention (BF16: projections, QK norms,
    the two layer norms), router (float32 gate and bias), experts (BF16 w13 and w2 of the rank)."""
    H, q, kv = cfg.hidden_size, cfg.q_size // tp, cfg.kv_size // tp
    e0, e1 = Shard(tp, 0, expert_split).expert_range(cfg)
    i0, i1 = Shard(tp, 0, expert_split).inter_range(cfg)
    return {"attention": q * H + 2 * kv * H + H * q + q + kv + 2 * H,
            "router": cfg.num_experts * H + cfg.num_experts,
            "experts": (e1 - e0) * 3 * (i1 - i0) * H}


def layer_rank_bytes(cfg: ModelConfig, tp: int, expert_split: str = "intermediate") -> int:
    p = layer_parts(cfg, tp, expert_split)
    return (p["attention"] + p["experts"]) * 2 + p["router"] * 4


def unit_bytes(layout: GraphLayout, unit: str, graphs: int) -> UnitBytes:
    """A unit's bytes (the same on every rank: both expert splits give every rank equal shares)."""
    cfg = layout.cfg
    V, H = cfg.vocab_size, cfg.hidden_size
    if unit == "embed":
        return UnitBytes(V * H * 2, 0, 1, graphs)
    if unit == "head":  # this rank's vocabulary rows (padded) and the final norm
        return UnitBytes((Shard(layout.tp, 0, layout.expert_split).vocab_rows(cfg) * H + H) * 2, 0, 2, graphs)
    p = layer_parts(cfg, layout.tp, layout.expert_split)
    # q, k, v, o, the two norms, the router's two tensors, w13, w2 (QK norms: inline or one page each)
    return UnitBytes((p["attention"] + p["experts"]) * 2, p["router"] * 4, 12, graphs, p["experts"] * 2)


@dataclass
class ExportEstimate:
    """Per (unit, rank): its graphs' and weights' bytes, for everything the layout holds; and the
    files written once at the end (`tail`: the manifest and the text files)."""
    layout: GraphLayout
    units: dict[tuple[str, int], UnitBytes] = field(default_factory=dict)
    tail: int = 0

    def total(self, twins: bool, only: set[tuple[str, int]] | None = None) -> int:
        return sum(u.written(twins) for k, u in self.units.items() if only is None or k in only)

    def to_write(self, twins: bool, only: set[tuple[str, int]] | None = None) -> int:
        """Everything an export writes: the units' files and stamps (those in `only`), and the tail."""
        stamps = STAMP_BYTES * sum(1 for k in self.units if only is None or k in only)
        return self.total(twins, only) + stamps + self.tail

    def per_rank(self, twins: bool) -> dict[int, int]:
        out: dict[int, int] = {}
        for (unit, rank), u in self.units.items():
            out[rank] = out.get(rank, 0) + u.written(twins)
        return out

    def cpu_run_bytes(self) -> int:
        """Memory of a CPU run (ONNX Runtime): the twins, and the experts converted to float32."""
        return sum(u.written(True) - u.written(False) + 2 * u.inputs for u in self.units.values())

    def auto_twins(self) -> bool:
        return self.cpu_run_bytes() <= AUTO_TWINS_MAX_BYTES


def estimate(layout: GraphLayout, text_bytes: int = 0) -> ExportEstimate:
    """text_bytes: the text files the export copies from the checkpoint (tokenizer and others)."""
    units = layout.units()
    manifest = MANIFEST_BYTES_PER_GRAPH * sum(len(specs) for specs in units.values()) + LOCK_BYTES
    return ExportEstimate(layout, {(unit, rank): unit_bytes(layout, unit, len(specs))
                                   for (unit, rank), specs in units.items()}, manifest + text_bytes)


def size(n: int) -> str:
    """Bytes for a message: GB, or MB below one."""
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / 1e6:.2f} MB"


def _existing(path: Path) -> Path:
    """`path`, or its nearest existing ancestor: where a folder still to be made will live."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return p


def free_bytes(path: Path) -> tuple[Path, int]:
    """Free bytes on the filesystem that will hold `path`."""
    p = _existing(path)
    st = os.statvfs(p)
    return p, st.f_bavail * st.f_frsize


def filesystem(path: Path) -> int:
    return os.stat(_existing(path)).st_dev


def available_ram() -> int:
    """MemAvailable (Linux), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_jobs(units: int, to_write: int, ram: int | None = None, cpus: int | None = None) -> int:
    """As many jobs as cores, as the available RAM holds (JOB_RAM each) and as there are units; one
    for a small export, where starting workers (seconds each) costs more than it saves."""
    if to_write < SMALL_EXPORT_BYTES:
        return 1
    ram = available_ram() if ram is None else ram
    cpus = cpu_count() if cpus is None else cpus
    by_ram = max(1, (ram - PARENT_RAM) // JOB_RAM)
    return max(1, min(cpus, by_ram, units))


def export_ram(jobs: int) -> int:
    return PARENT_RAM + jobs * JOB_RAM


@dataclass
class Need:
    """One row of a preflight: what a stage needs and what is there. `ok` False is a shortfall."""
    what: str
    needs: str
    has: str
    ok: bool = True
    problem: str = ""


def disk_needs(outputs: list[tuple[Path, int]]) -> list[Need]:
    """One row per filesystem: the bytes every output on it will take, against its free space."""
    groups: dict[int, list[tuple[Path, int]]] = {}
    for path, n in outputs:
        groups.setdefault(filesystem(path), []).append((path, n))
    rows = []
    for items in groups.values():
        need = sum(n for _, n in items)
        at, free = free_bytes(items[0][0])
        where = " + ".join(str(p) for p, _ in items)
        rows.append(Need(f"disk at {where}", f"{need / GB:.2f} GB", f"{free / GB:.2f} GB free", need <= free,
                         f"needs {need / GB:.1f} GB free at {at}, has {free / GB:.1f} GB"))
    return rows


def ram_need(jobs: int) -> Need:
    ram, have = export_ram(jobs), available_ram()
    return Need(f"RAM for {jobs} export job(s)", f"{ram / GB:.1f} GB", f"{have / GB:.1f} GB available", ram <= have,
                f"{jobs} export jobs need {ram / GB:.1f} GB of RAM, {have / GB:.1f} GB is available: "
                f"use --jobs {max(1, (have - PARENT_RAM) // JOB_RAM)}")


def export_needs(est: ExportEstimate, out: Path, twins: bool, jobs: int,
                 done: set[tuple[str, int]] = frozenset()) -> list[Need]:
    """Disk at the output and RAM for the jobs. `done`: units already exported (not written again)."""
    todo = {k for k in est.units if k not in done}
    return disk_needs([(out, est.to_write(twins, todo))]) + [ram_need(jobs)]


def table(rows: list[Need]) -> str:
    w = max(len(r.what) for r in rows)
    n = max(len(r.needs) for r in rows)
    return "\n".join(f"  {'ok ' if r.ok else 'NO '} {r.what:<{w}}  needs {r.needs:<{n}}  has {r.has}" for r in rows)


def per_rank_line(est: ExportEstimate, twins: bool) -> str:
    per = est.per_rank(twins)
    ranks = sorted(per)
    if len(ranks) > 2 and len({per[r] for r in ranks[1:]}) == 1:
        return f"rank 0 {per[0] / GB:.2f} GB, ranks 1..{ranks[-1]} {per[ranks[1]] / GB:.2f} GB each"
    return ", ".join(f"rank {r} {per[r] / GB:.2f} GB" for r in ranks)
