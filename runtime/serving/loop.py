"""The serving loop shared by every server (the Triton model, the OpenAI-compatible HTTP server): one
thread owns the engine, admits queued requests between steps (so concurrent requests share
continuous batching) and reports every generated token of every request as an `Event`.

Front ends build a `Request` (prompt ids, sampling parameters, an OutputText for its text) with an
`on_event` callback, `submit` it from any thread, and `cancel` it when the client goes away: the
loop then aborts the sequence and frees its KV blocks.

Failures, narrowest first:
- a request the engine refuses, or one that fails inside a step (its sampling, its text), gets one
  error event and its blocks back; every other request goes on;
- an engine that breaks (an exception from a step: a lost rank, a kernel fault, a bug) or a step that
  makes no progress for `step_timeout` seconds (a hung rank) makes the loop dead: the cause is logged
  with its traceback, every open and queued request gets an error event, every later one at once,
  the loop's thread ends (no spinning), and `on_dead` is called once so the front end can exit and
  let a supervisor restart the service.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from ..llm_engine import LLMEngine, RequestError
from ..output_text import Delta, OutputText
from ..sampling import SamplingParams
from ..sequence import Sequence


@dataclass
class Event:
    """One generated token of a request, or (token None, `error` set) the end of a failed request."""
    token: int | None
    delta: Delta
    finished: bool
    finish_reason: str | None
    seq: Sequence | None
    batch_size: int = 0
    error: str | None = None
    logprob: float | None = None                          # with logprobs asked: the token's
    top_logprobs: list[tuple[int, float]] | None = None   # and its alternatives (id, logprob)
    # The request's tokens reported so far, this one included: what usage counts. Not len(seq.output):
    # under async scheduling one step can give a sequence two tokens, and when a stop string ends the
    # text at the first, the second is generated but never reported.
    completion_tokens: int = 0


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]          # called on the loop's thread; must not block
    text: OutputText | None = None             # None: ids only (no tokenizer)
    is_cancelled: Callable[[], bool] | None = None  # polled between steps (e.g. Triton's sender)
    constraint: object | None = None           # a grammar's matcher (runtime/constrained.py)
    seq: Sequence | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    emitted: int = 0                           # tokens reported to on_event
    _cancelled: bool = False

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled or bool(self.is_cancelled and self.is_cancelled())


def _log(message: str) -> None:
    print(f"minimax: {message}", file=sys.stderr, flush=True)


class ServingLoop:
    def __init__(self, engine: LLMEngine, name: str = "minimax-serve", on_step: Callable[[int], None] | None = None,
                 on_dead: Callable[[str], None] | None = None, step_timeout: float | None = None):
        self.engine = engine
        self.on_step = on_step  # called with each step's batch size (metrics)
        self.on_dead = on_dead  # called once, from whichever thread found the engine dead
        self.step_timeout = step_timeout if step_timeout is not None else engine.config.step_timeout
        self.inbox: queue.Queue[Request] = queue.Queue()
        self.active: dict[int, Request] = {}
        self.dead: str | None = None  # why the engine can no longer serve
        self.stopping = threading.Event()
        self._lock = threading.Lock()  # the loop's thread and the watchdog both may end requests
        self._step_began: float | None = None
        engine.on_rank_lost(self._die)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        if self.step_timeout and self.step_timeout > 0:
            threading.Thread(target=self._watch, name=name + "-watchdog", daemon=True).start()

    # ---- any thread ---------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if self.dead:
            self._fail(req, self.dead)
            return
        self.inbox.put(req)

    def queued(self) -> int:
        """Requests not yet running: submitted and not admitted, or waiting in the scheduler."""
        return self.inbox.qsize() + len(self.engine.scheduler.waiting)

    def stop(self, timeout: float = 60) -> list[Request]:
        """Stop after the current step; returns the requests that did not finish (queued or running)."""
        self.stopping.set()
        self.thread.join(timeout=timeout)
        with self._lock:
            left = list(self.active.values())
            self.active.clear()
        while not self.inbox.empty():
            left.append(self.inbox.get_nowait())
        return left

    # ---- the loop's thread --------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self.stopping.is_set() and not self.dead:
                self._admit(wait=not engine.has_unfinished())
                self._drop_cancelled()
                if not engine.has_unfinished():
                    continue
                self._step_began = time.monotonic()
                outs = engine.step()
                self._step_began = None
                if self.dead:  # the watchdog gave up on this step while it ran
                    return
                if self.on_step and outs:
                    self.on_step(len(outs))
                for out in outs:
                    req = self.active.get(out.seq.id)
                    if req is not None:
                        self._emit(req, out, len(outs))
        except Exception as e:  # the engine is broken (a lost rank, a failed kernel, a bug)
            self._die(f"the engine stopped: {type(e).__name__}: {e}", traceback.format_exc())

    def _watch(self) -> None:
        """A step that never returns (a hung rank blocks a collective until its long timeout) is noticed
        here, well before: the engine is then treated as dead."""
        while not self.stopping.is_set() and not self.dead:
            began = self._step_began
            if began is not None and time.monotonic() - began > self.step_timeout:
                self._die(f"an engine step has made no progress for {time.monotonic() - began:.0f} s "
                          f"(--step-timeout {self.step_timeout:g}); {self.engine.stall_report()}")
                return
            time.sleep(min(1.0, self.step_timeout / 4))

    def _die(self, message: str, trace: str | None = None) -> None:
        with self._lock:
            if self.dead:
                return
            self.dead = message
            reqs = list(self.active.values())
            self.active.clear()
        _log(f"{message}; failing every request" + (f"\n{trace}" if trace else ""))
        while True:
            try:
                reqs.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for req in reqs:
            self._fail(req, message)
        if self.on_dead:
            self.on_dead(message)

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
                    req.seq = self.engine.add_request(req.prompt, req.params, req.constraint)
                    self.active[req.seq.id] = req
                except RequestError as e:
                    self._fail(req, str(e))
            try:
                req = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _emit(self, req: Request, out, batch: int) -> None:
        seq, finished = req.seq, out.finished
        if out.error is not None:  # the engine failed this sequence alone (its blocks are back)
            self.active.pop(seq.id, None)
            self._fail(req, f"request failed: {out.error}")
            return
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        try:
            delta = req.text.feed(out.token) if req.text else Delta()
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
        except Exception as e:  # noqa: BLE001 - this request's text failed: it alone ends
            self.engine.abort(seq)
            self.active.pop(seq.id, None)
            self._fail(req, f"request failed: could not detokenize the output ({type(e).__name__}: {e})")
            return
        if finished:
            self.active.pop(seq.id, None)
        req.emitted += 1
        self._send(req, Event(out.token, delta, finished, reason, seq, batch, None, out.logprob, out.top_logprobs,
                              req.emitted))

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
        self._send(req, Event(None, Delta(), True, "error", req.seq, error=message, completion_tokens=req.emitted))
