"""Export a MiniMax-M2 checkpoint to per-layer ONNX subgraphs for every tensor-parallel rank.

    python -m export.to_onnx CHECKPOINT [--tp 8] [--out build/<model>/onnx] [--jobs N] [--dry-run]

writes <out>/tp<N>/rank<r>/<subgraph>.onnx (BF16, what TensorRT builds) with its weights as
external data, and <out>/tp<N>/manifest.json. FP32 twins (<subgraph>.fp32.onnx, what ONNX Runtime
runs on CPU) are written for models small enough for a CPU run, or with --fp32-twins on; `make
engines` and big models do without them.

Before anything is written, the shard headers are validated and a preflight (export/preflight.py)
checks the free disk at the output and the RAM for the jobs from the config alone; --dry-run prints
it and stops. One export at a time writes into an output folder (a lock, export/lock.py). Layer-ranks are
exported by --jobs worker processes side by side (the output is byte-identical to one job), each
written to a temporary folder, checked, moved into place, and only then stamped; the manifest is
removed when an export starts and written last. So an interrupted export leaves nothing a later run
trusts, and a rerun redoes only what has no valid stamp.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import preflight, surgery
from .atomic import file_mode, remove_temporaries
from .checkpoint import Checkpoint, CheckpointError, check_names
from .config import ConfigError
from .jobs import run_parallel
from .layout import GraphLayout, make_layout
from .lock import LOCK_FILE, FolderLock, FolderLocked
from .moe_forms import MoeSchedule, ShardShape, modeled_schedule
from .manifest import MANIFEST, FileRecord, GraphFiles, Manifest, SubgraphSpec
from .paths import export_dir, tp_dir
from .sharding import EXPERT_SPLITS, Shard, ShardingError
from .text_config import TEXT_FILES
from .unit import ExportError, UnitTask, code_hash, export_unit, unit_key, unit_shards, valid_stamp

DEFAULT_MAX_TOKENS = 2048  # the per-step token budget the engines cover; longer prompts run in chunks
TWINS = ("auto", "on", "off")


# Traces per layout shape, kept for the process: a later export of the same shapes (a rerun, other
# twins, the tests' many exports) reuses them. They hold graphs without weights: small.
_TRACES: dict[str, dict] = {}


def _traces_of(layout: GraphLayout) -> dict:
    key = json.dumps([layout.cfg.to_dict(), layout.tp, layout.expert_split], sort_keys=True)
    return _TRACES.setdefault(key, {})


def measured_schedule(path: Path, cfg, tp: int, expert_split: str, max_tokens: int) -> MoeSchedule | None:
    """The MoE form schedule `make bench` measured (build/bench/moe_forms.json), when it was measured
    on this model's expert-shard shape; None otherwise."""
    d = json.loads(Path(path).read_text())
    s = ShardShape.of(cfg, tp, expert_split)
    if (d.get("experts"), d.get("inter"), d.get("hidden"), d.get("top_k")) != (s.experts, s.inter, s.hidden, s.top_k):
        return None
    return MoeSchedule.parse(d["moe_forms"], max_tokens, f"measured by make bench on {d['measured_on']}")


def choose_schedule(cfg, tp: int, expert_split: str, max_tokens: int, spec: str | None = None,
                    forms_file: str | Path | None = None) -> MoeSchedule:
    """--moe-forms if given, else the benchmark's measurement when it fits this shape, else the model."""
    if max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    if spec:
        return MoeSchedule.parse(spec, max_tokens, "given (--moe-forms)")
    measured = measured_schedule(forms_file, cfg, tp, expert_split, max_tokens) if forms_file else None
    return measured or modeled_schedule(cfg, tp, expert_split, max_tokens)


@dataclass
class ExportPlan:
    """What an export will do, decided before anything is written."""
    ckpt: Checkpoint
    layout: GraphLayout
    root: Path
    twins: bool
    twins_source: str
    moe: MoeSchedule
    max_tokens: int
    jobs: int
    estimate: preflight.ExportEstimate
    specs: dict[tuple[str, int], list[SubgraphSpec]]
    stamps: dict[tuple[str, int], dict] = field(default_factory=dict)  # units already exported
    todo: list[UnitTask] = field(default_factory=list)
    seconds: float = 0.0       # the run's export time, once run
    unit_seconds: float = 0.0  # of which, summed over the units (more than `seconds` with several jobs)

    @property
    def needs(self) -> list[preflight.Need]:
        return preflight.export_needs(self.estimate, self.root, self.twins, self.jobs, set(self.stamps))

    def report(self, needs: bool = True) -> str:
        est, tp = self.estimate, self.layout.tp
        lines = [f"export of {self.ckpt.dir} at TP={tp} to {self.root}",
                 f"  BF16 graphs: {est.total(False) / preflight.GB:.2f} GB ({preflight.per_rank_line(est, False)})",
                 f"  MoE forms: {self.moe.spec()} ({self.moe.source})",
                 f"  FP32 twins: {'yes' if self.twins else 'no'} ({self.twins_source})"
                 + (f", {(est.total(True) - est.total(False)) / preflight.GB:.2f} GB" if self.twins else ""),
                 f"  layer-ranks: {len(self.todo)} to export, {len(self.stamps)} up to date; {self.jobs} job(s)"]
        return "\n".join(lines + ([preflight.table(self.needs)] if needs else []))


def plan_export(checkpoint: str | Path, out: str | Path | None = None, tp: int = 1,
                expert_split: str = "intermediate", twins: bool | None = None, moe_forms: str | None = None,
                max_tokens: int = DEFAULT_MAX_TOKENS, forms_file: str | Path | None = None,
                jobs: int | None = None, validate: bool = True) -> ExportPlan:
    """Everything but the work: read the config and the index (and, with validate, every shard's
    header), check the TP, choose the twins, the MoE forms and the job count, and find the units
    whose stamps are current. Writes nothing."""
    ckpt = Checkpoint(checkpoint, validate=validate)
    if not validate:
        check_names(ckpt.weight_map, ckpt.config, ckpt.specs)  # the index alone: no shard is opened
    Shard(tp, 0, expert_split).check(ckpt.config)  # a TP that does not divide fails here, before the schedule
    moe = choose_schedule(ckpt.config, tp, expert_split, max_tokens, moe_forms, forms_file)
    layout = make_layout(ckpt.config, tp, expert_split, moe.forms)
    est = preflight.estimate(layout, sum((ckpt.dir / f).stat().st_size for f in TEXT_FILES if (ckpt.dir / f).is_file()))
    if twins is None:
        twins = est.auto_twins()
        twins_source = (f"auto: a CPU run of this model takes {est.cpu_run_bytes() / preflight.GB:.1f} GB, "
                        + ("within" if twins else "over") + f" {preflight.AUTO_TWINS_MAX_BYTES / preflight.GB:g} GB")
    else:
        twins_source = "asked for" if twins else "turned off"
    specs = layout.units()
    root = tp_dir(export_dir(ckpt.dir, out), tp)
    code, shards = code_hash(), unit_shards(ckpt)
    stamps, todo = {}, []
    for unit, rank in specs:
        task = UnitTask(unit, rank, root / f"rank{rank}", unit_key(ckpt, layout, unit, rank, code, shards[unit]))
        stamp = valid_stamp(task, twins)
        if stamp:
            stamps[(unit, rank)] = stamp
        else:
            todo.append(task)
    # Largest first: the embedding and the LM head do not end up last, alone, on one job.
    todo.sort(key=lambda t: -est.units[(t.unit, t.rank)].written(twins))
    if jobs is not None and jobs < 1:
        raise ValueError("--jobs must be at least 1")
    jobs = min(jobs or preflight.default_jobs(len(todo), est.total(twins, {(t.unit, t.rank) for t in todo})),
               max(1, len(todo)))
    return ExportPlan(ckpt, layout, root, twins, twins_source, moe, max_tokens, jobs, est, specs,
                      stamps, todo)


def run_export(plan: ExportPlan, progress: bool = True) -> Path:
    """Check the plan's needs, take the output folder's lock, remove what a killed run left, export
    what is not up to date, and write the manifest last. A disk that fills up is an ExportError
    naming the folder and the bytes."""
    short = [n for n in plan.needs if not n.ok]
    if short:
        raise ExportError("preflight: " + "; ".join(n.problem for n in short))
    stamps: dict = dict(plan.stamps)
    try:
        with FolderLock(plan.root, "export"):
            return _run_locked(plan, stamps, progress)
    except FolderLocked as e:
        raise ExportError(str(e)) from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        left = plan.estimate.to_write(plan.twins, {k for k in plan.estimate.units if k not in stamps})
        at, free = preflight.free_bytes(plan.root)
        raise ExportError(f"the disk holding {plan.root} is full ({e.strerror}"
                          + (f" writing {e.filename}" if e.filename else "") + f"): the export still needs "
                          f"{preflight.size(left)} there, {preflight.size(free)} is free"
                          + ("" if at == plan.root.absolute() else f" at {at}")
                          + "; free some space and run it again (the layer-ranks done are kept)") from None


def _run_locked(plan: ExportPlan, stamps: dict, progress: bool) -> Path:
    layout, root, est, twins = plan.layout, plan.root, plan.estimate, plan.twins
    (root / MANIFEST).unlink(missing_ok=True)  # from here on, nothing in root is trusted until the end
    remove_temporaries(root, keep=(".stamps", LOCK_FILE))  # a killed run's half-written files
    for task in plan.todo:
        task.rank_dir.mkdir(exist_ok=True)
    timings = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(est.units[(t.unit, t.rank)].written(twins) for t in plan.todo), unit="B",
                   unit_scale=True, desc=f"export tp{layout.tp}, {plan.jobs} job(s)")

    def done(task: UnitTask, stamp: dict) -> None:
        stamps[(task.unit, task.rank)] = stamp
        timings.append((task.unit, task.rank, stamp["seconds"]))
        if bar:
            bar.update(est.units[(task.unit, task.rank)].written(twins))
            bar.set_postfix_str(f"{len(timings)}/{len(plan.todo)} layer-ranks")

    t0 = time.perf_counter()
    if plan.jobs == 1:
        traces = _traces_of(layout)
        for task in plan.todo:
            done(task, export_unit(plan.ckpt, layout, task, plan.specs[(task.unit, task.rank)], twins, traces))
    elif plan.todo:
        if bar:
            bar.set_postfix_str("starting the jobs and tracing the graphs")
        run_parallel(plan.ckpt, layout, plan.specs, plan.todo, twins, plan.jobs, preflight.cpu_count(), done)
    plan.seconds = time.perf_counter() - t0
    plan.unit_seconds = sum(seconds for _, _, seconds in timings)
    if bar:
        bar.close()
    return write_manifest(plan, stamps, timings)


def write_manifest(plan: ExportPlan, stamps: dict, timings: list) -> Path:
    layout, root, ckpt = plan.layout, plan.root, plan.ckpt
    subgraphs, files = {}, {}
    for s in layout.subgraphs:
        s.files = {r: {kind: GraphFiles(onnx=f"rank{r}/{paths['onnx']}", weights=f"rank{r}/{paths['weights']}",
                                        inputs_at=paths.get("inputs_at", {}))
                       for kind, paths in stamps[(s.unit, r)]["graphs"][s.name].items()} for r in s.ranks}
        for r in s.ranks:
            files.update({f"rank{r}/{f}": FileRecord(**m) for f, m in stamps[(s.unit, r)]["files"].items()})
        subgraphs[s.name] = s
    # The runtime needs the tokenizer, chat template and sampling defaults, not the checkpoint.
    text_files = []
    for name in TEXT_FILES:
        if (ckpt.dir / name).is_file():
            tmp = root / f".{name}.tmp"
            shutil.copyfile(ckpt.dir / name, tmp)
            os.chmod(tmp, file_mode())  # the umask's mode, whatever the checkpoint's files have
            os.replace(tmp, root / name)
            text_files.append(name)
    twins = all("fp32" in g for st in stamps.values() for g in st["graphs"].values())
    manifest = Manifest(
        config=layout.cfg, tp=layout.tp, expert_split=layout.expert_split, opset=surgery.OPSET, fp32_twins=twins,
        moe=plan.moe, max_tokens=plan.max_tokens,
        steps=layout.steps, subgraphs=subgraphs, files=files, checkpoint=str(ckpt.dir.resolve()),
        checkpoint_relative=os.path.relpath(ckpt.dir.resolve(), root.resolve()), text_files=text_files,
        exported=[{"unit": u, "rank": r, "seconds": s} for u, r, s in timings])
    return manifest.save(root)


def export(checkpoint: str | Path, out: str | Path | None = None, tp: int = 1, expert_split: str = "intermediate",
           twins: bool | None = None, moe_forms: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
           progress: bool = True, forms_file: str | Path | None = None, jobs: int | None = None) -> Path:
    """Export (or bring up to date) and return the manifest's path. twins None: auto (for models a
    CPU can run). The MoE forms: `moe_forms` ("gather:32,dense:256,block") if given, else the
    measurement in `forms_file` when it fits this shape, else the A100 model. jobs None: from cores and RAM."""
    plan = plan_export(checkpoint, out, tp, expert_split, twins, moe_forms, max_tokens, forms_file, jobs)
    return run_export(plan, progress)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.to_onnx", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="MiniMax-M2 FP8 checkpoint directory")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (must divide heads, KV heads, experts)")
    ap.add_argument("--out", help="output folder (default build/<checkpoint name>/onnx)")
    ap.add_argument("--expert-split", choices=EXPERT_SPLITS, default="intermediate",
                    help="split every expert's intermediate dim across ranks, or give each rank whole experts")
    ap.add_argument("--fp32-twins", choices=TWINS, default="auto",
                    help="FP32 copies of the graphs for ONNX Runtime on CPU (`--backend ort`). auto (default): "
                         f"only when a CPU run of the model takes at most {preflight.AUTO_TWINS_MAX_BYTES / 1e9:g} GB "
                         "(the toy and test models; not the real one, nor `make engines`)")
    ap.add_argument("--no-fp32-twins", dest="fp32_twins", action="store_const", const="off", help="= --fp32-twins off")
    ap.add_argument("--jobs", type=int,
                    help="worker processes exporting layer-ranks side by side (default: the cores, as many as "
                         f"the available RAM holds at {preflight.JOB_RAM / 2**30:g} GiB each)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print what would be written and the preflight (disk, RAM), then stop; reads the "
                         "shard headers (a truncated shard is refused), no weights")
    ap.add_argument("--moe-forms", metavar="SPEC",
                    help="which MoE form runs up to which step size, e.g. gather:16,dense:400,block (the last "
                         "takes the rest; forms left out are not exported). Default: --moe-forms-file's "
                         "measurement when it fits this expert-shard shape, else modeled for an A100")
    ap.add_argument("--moe-forms-file", help="a schedule measured by `make bench` (build/bench/moe_forms.json)")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                    help=f"largest tokens per step the engines must take (default {DEFAULT_MAX_TOKENS})")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    twins = {"auto": None, "on": True, "off": False}[a.fp32_twins]
    try:
        plan = plan_export(a.checkpoint, a.out, a.tp, a.expert_split, twins, a.moe_forms, a.max_tokens,
                           a.moe_forms_file, a.jobs)
        if a.dry_run or not a.quiet:
            print(plan.report(), flush=True)
        if a.dry_run:
            return 1 if any(not n.ok for n in plan.needs) else 0
        path = run_export(plan, progress=not a.quiet)
        if plan.todo:
            print(f"exported {len(plan.todo)} layer-ranks in {plan.seconds:.1f} s with {plan.jobs} job(s) "
                  f"({plan.unit_seconds:.1f} s inside the units)")
    except (CheckpointError, ConfigError, ShardingError, ExportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s (peak RSS {rss:.2f} GiB"
          + (f", largest job {workers:.2f} GiB" if workers else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
