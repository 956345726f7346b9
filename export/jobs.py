"""Export units side by side: N worker processes, each exporting one unit at a time.

First the distinct graphs are traced, one per worker at a time (tracing is the slow part of a small
export); every unit task then carries the traces it needs, so the same trace gives the same bytes
whichever process writes a unit, and the output is byte-identical to a one-job export. Each worker
holds one unit's weights at a time (streamed), so memory stays bounded by the job count. Units are
handed out largest first; the stamps the workers write make an interrupted run resume.
"""
from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .layout import GraphLayout, make_layout
from .manifest import SubgraphSpec
from .unit import UnitTask, export_unit, trace_key, trace_missing

_worker: dict = {}


def _init(checkpoint: str, tp: int, expert_split: str, forms: tuple[str, ...], threads: int) -> None:
    torch.set_num_threads(threads)
    ckpt = Checkpoint(checkpoint, validate=False)  # the parent validated it
    layout = make_layout(ckpt.config, tp, expert_split, forms)
    _worker.update(ckpt=ckpt, layout=layout, specs=layout.units(), traces={})


def _trace(unit: str, rank: int, name: str) -> tuple[tuple, object]:
    w = _worker
    spec = next(s for s in w["specs"][(unit, rank)] if s.name == name)
    traces: dict = {}
    trace_missing(w["ckpt"], w["layout"], unit, rank, [spec], traces)
    return next(iter(traces.items()))


def _run(task: UnitTask, twins: bool, traces: dict) -> tuple[UnitTask, dict]:
    w = _worker
    w["traces"].update(traces)
    return task, export_unit(w["ckpt"], w["layout"], task, w["specs"][(task.unit, task.rank)], twins, w["traces"])


def run_parallel(ckpt: Checkpoint, layout: GraphLayout, specs: dict[tuple[str, int], list[SubgraphSpec]],
                 tasks: list[UnitTask], twins: bool, jobs: int, cpus: int,
                 done: Callable[[UnitTask, dict], None]) -> None:
    """Export `tasks` with `jobs` processes; `done(task, stamp)` is called in this process as each
    finishes. The first failure cancels what has not started and is raised."""
    ctx = mp.get_context("spawn")  # no fork of a process holding threads and torch state
    threads = max(1, cpus // jobs)
    needed: dict[tuple, tuple[str, int, str]] = {}  # trace key -> a (unit, rank, subgraph) that has it
    for t in tasks:
        for s in specs[(t.unit, t.rank)]:
            needed.setdefault(trace_key(layout, s, t.rank), (t.unit, t.rank, s.name))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init,
                             initargs=(str(Path(ckpt.dir)), layout.tp, layout.expert_split, layout.forms, threads)) as pool:
        futures = [pool.submit(_trace, *where) for where in needed.values()]
        try:
            traces = dict(f.result() for f in futures)
            futures = [pool.submit(_run, t, twins, {k: traces[k] for k in
                                                    {trace_key(layout, s, t.rank) for s in specs[(t.unit, t.rank)]}})
                       for t in tasks]
            for f in as_completed(futures):
                task, stamp = f.result()  # raises the worker's error
                done(task, stamp)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
