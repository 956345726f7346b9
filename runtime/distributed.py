"""Tensor parallelism: one process per rank, collectives through torch.distributed (gloo on CPU,
NCCL on GPUs). Rank 0 runs the engine (scheduler, sampler, text) and sends each step's metadata;
every rank runs its own subgraphs on its own slice of the KV cache.

Two ways to start:
- `LLMEngine.start(export)` in one process: it spawns ranks 1..N-1 on this machine (`python -m
  runtime.distributed --worker ...`) and watches them: a rank that dies ends the run at once with an
  error naming it; ranks watch rank 0 the same way, so no process outlives the run.
- torchrun, one process per rank, any number of machines (its standard rendezvous):
      torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
          runtime/chat.py --model build/<model>/onnx/tp8 --backend torch --device cuda ...
  Rank 0 is the chat; the others serve. torchrun ends every rank if one fails.
A collective that waits longer than `timeout_s` (default 300 s) raises, as a last resort.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from export.manifest import Manifest

from .config import EngineConfig
from .ports import free_port
from .rank import build_rank

TIMEOUT_S = 300


class RankLost(RuntimeError):
    """Another rank of the group died or stopped answering."""


class TorchComm:
    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.broken = False
        self.describe_failure = lambda: "another tensor-parallel rank stopped answering"

    def _guard(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except (RuntimeError, dist.DistError) as e:  # gloo: connection closed; NCCL: watchdog abort
            self.broken = True
            raise RankLost(f"{self.describe_failure()} ({type(e).__name__}); stopping the run") from e

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        self._guard(dist.all_reduce, t)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[world, *t.shape]: every rank's t, in rank order."""
        out = torch.empty((self.world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        self._guard(dist.all_gather_into_tensor, out, t.contiguous())  # gloo takes only the concatenated form
        return out.view(self.world, *t.shape)

    def broadcast(self, t: torch.Tensor | None, src: int, like: torch.Tensor | None = None) -> torch.Tensor:
        buf = t.contiguous() if self.rank == src else like
        self._guard(dist.broadcast, buf, src)
        return buf

    def share_step(self, payload):
        """Rank 0's step (a Python object) to every rank, over the CPU: a gloo group beside NCCL."""
        box = [payload]
        self._guard(dist.broadcast_object_list, box, src=0, group=_meta_group)
        return box[0]


def _backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _die(msg: str, code: int = 3) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    os._exit(code)  # a collective may be blocking the main thread: end the process from here


class Group:
    """Rank 0's view of a started group: the communicator and the processes it spawned."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.comm, self.procs, self._stopping = None, procs, False
        # Called (from the watcher thread) when a rank dies; a server sets it to fail its requests and exit
        # in its own way. Unset: this process exits at once with code 3.
        self.on_lost = None
        # Watch from the start: a rank that dies before the rendezvous would leave rank 0 waiting in
        # init_process_group for the whole collective timeout.
        if procs:
            threading.Thread(target=self._watch, daemon=True).start()

    def joined(self, comm: TorchComm) -> "Group":
        """The rendezvous is done: the group's communicator."""
        self.comm = comm
        comm.describe_failure = self._describe
        return self

    def _exited(self) -> str | None:
        for rank, p in enumerate(self.procs, start=1):
            if p.poll() is not None:
                return f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {p.returncode}"
        return None

    def _describe(self) -> str:
        deadline = time.time() + 2
        while time.time() < deadline and self.procs and not self._exited():
            time.sleep(0.05)
        return self._exited() or "another tensor-parallel rank stopped answering"

    def _watch(self) -> None:
        """A rank that dies while rank 0 is not in a collective would go unnoticed until the next one;
        notice it here instead, and end the run."""
        while not self._stopping:
            what = self._exited()
            if what and not self._stopping:
                self._kill_alive()
                if self.on_lost is None:
                    _die(f"{what}; stopping the run")
                self._stopping = True
                self.on_lost(f"{what}; stopping the run")
                return
            time.sleep(0.2)

    def stall_report(self) -> str:
        """Each spawned rank's process state (from /proc): a stopped or dead rank is the likely cause."""
        states = {"R": "running", "S": "waiting", "D": "in uninterruptible I/O", "T": "stopped by a signal",
                  "t": "stopped by a tracer", "Z": "dead", "X": "dead"}
        parts, suspects = [], []
        for rank, p in enumerate(self.procs, start=1):
            state = "exited"
            if p.poll() is None:
                try:
                    state = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except (OSError, IndexError):
                    state = "?"
            if state in ("exited", "T", "t", "Z", "X"):
                suspects.append(rank)
            what = f"exited with code {p.returncode}" if state == "exited" else states.get(state, f"state {state}")
            parts.append(f"rank {rank} (pid {p.pid}) {what}")
        lead = (f"tensor-parallel rank {', '.join(map(str, suspects))} not answering; " if suspects else "")
        return lead + ("; ".join(parts) if parts else "no spawned ranks")

    def _kill_alive(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()

    def kill(self) -> None:
        self._stopping = True
        self._kill_alive()
        for p in self.procs:
            try:  # reaped: none is left behind as a zombie of a long-lived rank 0
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # unkillable (uninterruptible I/O): never block an exit on it
                pass

    def abort(self) -> None:
        """Rank 0 failed while starting: end the other ranks and leave no process group behind (a later
        start in this process makes its own)."""
        self.kill()
        if self.comm is not None:
            dist.destroy_process_group()
            self.comm = None

    def stop(self, before_destroy=None) -> None:
        self._stopping = True
        try:
            if self.comm is not None and not self.comm.broken:
                self.comm.share_step(None)
            else:  # ranks still blocked in a collective will not hear a stop
                self._kill_alive()
            if before_destroy:
                before_destroy()
        finally:
            for p in self.procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            if self.comm is not None:
                dist.destroy_process_group()


# A gloo group for each step's metadata (TorchComm.share_step), beside the default group (NCCL on
# GPUs). Over NCCL, broadcast_object_list copies the pickled step to the GPU with a blocking copy, which
# waits for the step before it: rank 0's host would wait for its device every step, and async
# scheduling's overlap would be lost at TP > 1. Made on CPU runs too, so that the CPU tests run this path.
_meta_group = None


def _init(backend: str, rank: int, world: int, init_method: str, timeout_s: float) -> None:
    global _meta_group
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    _meta_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def start_group(manifest_path: Path, config: EngineConfig, tp: int, timeout_s: float = TIMEOUT_S) -> Group:
    """Start (or, under torchrun, join) the group; returns on rank 0 only."""
    backend = _backend_for(config.device)
    torchrun = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    # Under torchrun this rank's own GPU, cuda:LOCAL_RANK, is set below (and comes back on a second start).
    own = f"cuda:{os.environ.get('LOCAL_RANK', os.environ.get('RANK'))}"
    if ":" in config.device and not (torchrun and config.device == own):
        raise ValueError(f"--device {config.device} names one GPU, and this export runs {tp} ranks, one a GPU: pass "
                         "--device cuda (rank r on cuda:r; under torchrun, cuda:LOCAL_RANK) and choose the GPUs "
                         "with CUDA_VISIBLE_DEVICES")
    if torchrun:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != tp:
            raise RuntimeError(f"torchrun started {world} processes; this export needs {tp}")
        if config.device.startswith("cuda") and ":" not in config.device:
            config.device = own
        _init(backend, rank, world, "env://", timeout_s)
        if rank != 0:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            build_rank(Manifest.load(manifest_path), config, rank, TorchComm()).serve()
            dist.destroy_process_group()
            sys.exit(0)
        return Group([]).joined(TorchComm())
    port = free_port()
    cfg_json = json.dumps(asdict(config))
    procs = [subprocess.Popen([sys.executable, "-m", "runtime.distributed", "--worker", str(manifest_path),
                               "--rank", str(r), "--world", str(tp), "--port", str(port), "--config", cfg_json,
                               "--parent", str(os.getpid()), "--timeout", str(timeout_s)],
                              cwd=Path(__file__).resolve().parents[1])
             for r in range(1, tp)]
    group = Group(procs)
    try:
        _init(backend, 0, tp, f"tcp://127.0.0.1:{port}", timeout_s)
    except Exception:
        group.kill()
        raise
    return group.joined(TorchComm())


def _watch_parent(pid: int) -> None:
    while True:
        if os.getppid() != pid:
            _die(f"rank 0 (pid {pid}) is gone; this rank stops too", 4)
        time.sleep(0.2)


def worker_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one tensor-parallel rank (started by rank 0)")
    ap.add_argument("--worker", required=True, help="manifest path")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S)
    a = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to rank 0, which stops the group
    threading.Thread(target=_watch_parent, args=(a.parent,), daemon=True).start()
    config = EngineConfig(**json.loads(a.config))
    _init(_backend_for(config.device), a.rank, a.world, f"tcp://127.0.0.1:{a.port}", a.timeout)
    build_rank(Manifest.load(a.worker), config, a.rank, TorchComm()).serve()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
