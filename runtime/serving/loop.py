"""The serving loop shared by every server (the Triton model, the OpenAI-compatible HTTP server): one
thread owns the engine, admits queued requests between steps (so concurrent requests share
continuous batching) and reports every generated token of every request as an `Event`.

Front ends build a `Request` (prompt ids, sampling parameters, an OutputText for its text) with an
`on_event` callback, `submit` it from any thread, and `cancel` it when the client goes away: the
loop then aborts the sequence and frees its KV blocks. A bad request gets one error event; an
engine that breaks (a lost rank) fails every request and every later one.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..llm_engine import LLMEngine, RequestError
from ..output_text import Delta, OutputText
from ..sampling import SamplingParams
from ..sequence import Sequence


@dataclass
class Event:
    """One generated token of a request (token -1 and `error` set: the request failed)."""
    token: int
    delta: Delta
    finished: bool
    finish_reason: str | None
    seq: Sequence | None
    batch_size: int = 0
    error: str | None = None


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]          # called on the loop's thread; must not block
    text: OutputText | None = None             # None: ids only (no tokenizer)
    is_cancelled: Callable[[], bool] | None = None  # polled between steps (e.g. Triton's sender)
    seq: Sequence | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    _cancelled: bool = False

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled or bool(self.is_cancelled and self.is_cancelled())


class ServingLoop:
    def __init__(self, engine: LLMEngine, name: str = "minimax-serve", on_step: Callable[[int], None] | None = None):
        self.engine = engine
        self.on_step = on_step  # called with each step's batch size (metrics)
        self.inbox: queue.Queue[Request] = queue.Queue()
        self.active: dict[int, Request] = {}
        self.dead: str | None = None  # why the engine can no longer serve
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    # ---- any thread ---------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        self.inbox.put(req)

    def stop(self, timeout: float = 60) -> list[Request]:
        """Stop after the current step; returns the requests that did not finish (queued or running)."""
        self.stopping.set()
        self.thread.join(timeout=timeout)
        left = list(self.active.values())
        while not self.inbox.empty():
            left.append(self.inbox.get_nowait())
        self.active.clear()
        return left

    # ---- the loop's thread --------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not self.stopping.is_set():
            self._admit(wait=not engine.has_unfinished())
            self._drop_cancelled()
            if not engine.has_unfinished():
                continue
            try:
                outs = engine.step()
            except Exception as e:  # the engine is broken (a lost rank, a failed kernel): say so to everyone
                self.dead = f"the engine stopped: {type(e).__name__}: {e}"
                for req in list(self.active.values()):
                    self._fail(req, self.dead)
                self.active.clear()
                continue
            if self.on_step and outs:
                self.on_step(len(outs))
            for out in outs:
                req = self.active.get(out.seq.id)
                if req is not None:
                    self._emit(req, out.token, out.finished, len(outs))

    def _admit(self, wait: bool) -> None:
        try:
            req = self.inbox.get(timeout=0.05) if wait else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if req.cancelled:
                pass
            elif self.dead:
                self._fail(req, self.dead)
            else:
                try:
                    req.seq = self.engine.add_request(req.prompt, req.params)
                    self.active[req.seq.id] = req
                except RequestError as e:
                    self._fail(req, str(e))
            try:
                req = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _emit(self, req: Request, token: int, finished: bool, batch: int) -> None:
        seq = req.seq
        if token < 0:  # the engine failed this sequence (it cannot fit in the KV cache)
            self.active.pop(seq.id, None)
            self._fail(req, f"request failed: {seq.finish_reason}")
            return
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        delta = req.text.feed(token) if req.text else Delta()
        reason = None
        if req.text and req.text.stopped:  # a stop string ended it
            reason = "stop"
            if not finished:
                self.engine.abort(seq)
                finished = True
        if finished:
            if req.text:
                delta += req.text.finish()
            reason = reason or seq.finish_reason
            self.active.pop(seq.id, None)
        self._send(req, Event(token, delta, finished, reason, seq, batch))

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.active.values() if r.cancelled]:
            self.engine.abort(req.seq)
            self.active.pop(req.seq.id, None)

    def _send(self, req: Request, ev: Event) -> None:
        try:
            req.on_event(ev)
        except Exception:  # the client is gone: stop its work
            req.cancel()

    def _fail(self, req: Request, message: str) -> None:
        self._send(req, Event(-1, Delta(), True, "error", req.seq, error=message))
