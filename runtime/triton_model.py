"""The runtime inside Triton Inference Server: a decoupled Python-backend model (runtime/triton_repo.py
writes its repository; the inputs and outputs are listed there).

`execute` only parses requests and queues them; one serving thread owns the engine: it admits
queued requests between steps, so concurrent requests share continuous batching, and sends one
response per generated token as the step makes it. A bad request gets an error response and
changes nothing else.
"""
from __future__ import annotations

import json
import queue
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from .engine import Engine, EngineConfig, RequestError
from .sampling import SamplingParams
from .sequence import Sequence
from .output_text import Delta, OutputText

DEFAULT_MAX_TOKENS = 512
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


@dataclass
class Job:
    """One request from admission to its final response."""
    sender: object
    prompt: list[int]
    params: SamplingParams
    text: OutputText | None        # None: the export has no tokenizer (ids only)
    stream: bool = True            # else one response at the end with all tokens and text
    seq: Sequence | None = None
    ids: list[int] = field(default_factory=list)   # not yet sent (stream=False)
    unsent: Delta = field(default_factory=Delta)   # text not yet sent (stream=False)
    finish_reason: str | None = None


def _scalar(request, name: str, default=None):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    a = t.as_numpy().reshape(-1)
    if a.size != 1:
        raise RequestError(f"input {name} must hold one value, got {a.size}")
    v = a[0]
    return v.decode("utf-8") if isinstance(v, bytes) else v.item()


def _list(request, name: str) -> list:
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return []
    return [v.decode("utf-8") if isinstance(v, bytes) else v.item() for v in t.as_numpy().reshape(-1)]


def _string(values: list[str]) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_)


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        here = Path(args["model_repository"])
        model = here / p["model"]  # an absolute path stays as it is
        engines = here / p["engines"] if p.get("engines") else None
        if not sys.executable or not Path(sys.executable).name.startswith("python"):
            # Inside the backend stub sys.executable is the stub; TP ranks start as `python -m ...`.
            import shutil
            sys.executable = shutil.which("python3") or sys.executable
        self.engine = Engine.start(model, EngineConfig(
            backend=p.get("backend", "ort"), device=p.get("device", "cpu"), dtype=p.get("dtype") or None,
            engines=str(engines) if engines else None, kv_cache_gb=float(p.get("kv_cache_gb", 1.0)),
            max_num_seqs=int(p.get("max_num_seqs", 64)), block_size=int(p.get("block_size", 16)),
            cuda_graphs=p.get("cuda_graphs", "true") == "true"))
        self.codec = self.engine.codec
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.jobs: dict[int, Job] = {}
        self.dead: str | None = None  # why the engine can no longer serve
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="minimax-serve", daemon=True)
        self.thread.start()
        pb_utils.Logger.log_info(f"minimax: serving {model} (backend {self.engine.backend.name}, "
                                 f"TP {self.engine.manifest.tp}, {self.engine.executor.usable_blocks} KV blocks)")

    # ---- requests in (Triton's thread) ----------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.inbox.put(self._parse(request, sender))
            except (RequestError, UnicodeDecodeError) as e:
                self._fail(sender, str(e))
        return None

    def _parse(self, request, sender) -> Job:
        text, ids = _scalar(request, "text_input"), _list(request, "input_ids")
        if (text is None) == (not ids):
            raise RequestError("give exactly one of text_input (a string) or input_ids (token ids)")
        stops = [s for s in _list(request, "stop") if s]
        if self.codec is None and (text is not None or stops):
            raise RequestError("this export has no tokenizer.json: text_input and stop strings need one; "
                               "send input_ids")
        if text is not None:
            try:
                if _scalar(request, "chat_template", True):
                    ids = self.codec.encode_chat([{"role": "user", "content": text}],
                                                 thinking=bool(_scalar(request, "thinking", True)))
                else:
                    ids = self.codec.encode(text)
            except ValueError as e:
                raise RequestError(str(e)) from None
        params = self.engine.sampling_params(
            _scalar(request, "temperature"), _scalar(request, "top_p"), _scalar(request, "top_k"),
            max_tokens=_scalar(request, "max_tokens", DEFAULT_MAX_TOKENS), seed=_scalar(request, "seed"),
            stop_token_ids=_list(request, "stop_token_ids"), ignore_eos=bool(_scalar(request, "ignore_eos", False)))
        out = OutputText(self.codec, self.codec.in_thinking(ids), stops) if self.codec else None
        return Job(sender, ids, params, out, bool(_scalar(request, "stream", True)))

    # ---- the serving thread ---------------------------------------------------------------------
    def _serve(self) -> None:
        engine = self.engine
        while not self.stopping.is_set():
            self._admit(wait=not engine.has_unfinished())
            if not engine.has_unfinished():
                continue
            try:
                outs = engine.step()
            except Exception as e:  # the engine is broken (a lost rank, a failed kernel): say so to everyone
                self.dead = f"the engine stopped: {type(e).__name__}: {e}"
                pb_utils.Logger.log_error(f"minimax: {self.dead}")
                for job in list(self.jobs.values()):
                    self._fail(job.sender, self.dead)
                self.jobs.clear()
                continue
            batch = len(outs)
            for out in outs:
                job = self.jobs.get(out.seq.id)
                if job is not None:
                    self._emit(job, out.token, out.finished, batch)
            self._drop_cancelled()

    def _admit(self, wait: bool) -> None:
        try:
            job = self.inbox.get(timeout=0.1) if wait else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if self.dead:
                self._fail(job.sender, self.dead)
            else:
                try:
                    job.seq = self.engine.add_request(job.prompt, job.params)
                    self.jobs[job.seq.id] = job
                except RequestError as e:
                    self._fail(job.sender, str(e))
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _emit(self, job: Job, token: int, finished: bool, batch: int) -> None:
        seq = job.seq
        if token < 0:  # the engine failed this sequence (it cannot fit in the KV cache)
            self.jobs.pop(seq.id, None)
            self._fail(job.sender, f"request failed: {seq.finish_reason}")
            return
        delta = job.text.feed(token) if job.text else Delta()
        if job.text and job.text.stopped:  # a stop string ended it
            job.finish_reason = "stop"
            if not finished:
                self.engine.abort(seq)
                finished = True
        if finished:
            if job.text:
                delta += job.text.finish()
            job.finish_reason = job.finish_reason or seq.finish_reason
            self.jobs.pop(seq.id, None)
        job.ids.append(token)
        job.unsent += delta
        if not (job.stream or finished):
            return
        outputs = [
            pb_utils.Tensor("text_output", _string([job.unsent.content])),
            pb_utils.Tensor("reasoning_output", _string([job.unsent.reasoning])),
            pb_utils.Tensor("output_ids", np.array(job.ids, dtype=np.int64)),
            pb_utils.Tensor("finish_reason", _string([job.finish_reason or "" if finished else ""])),
            pb_utils.Tensor("prompt_tokens", np.array([len(seq.prompt)], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([len(seq.output)], dtype=np.int32)),
            pb_utils.Tensor("cached_tokens", np.array([seq.num_cached_prompt], dtype=np.int32)),
            pb_utils.Tensor("batch_size", np.array([batch], dtype=np.int32)),
        ]
        job.ids, job.unsent = [], Delta()
        try:
            job.sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if finished else 0)
        except Exception as e:  # the client went away
            pb_utils.Logger.log_warn(f"minimax: dropping request {seq.id}: {e}")
            self.engine.abort(seq)
            self.jobs.pop(seq.id, None)

    def _drop_cancelled(self) -> None:
        for job in list(self.jobs.values()):
            cancelled = getattr(job.sender, "is_cancelled", None)
            if cancelled is not None and cancelled():
                self.engine.abort(job.seq)
                self.jobs.pop(job.seq.id, None)
                try:
                    job.sender.send(flags=FINAL)
                except Exception:
                    pass

    @staticmethod
    def _fail(sender, message: str) -> None:
        try:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
        except Exception as e:
            pb_utils.Logger.log_warn(f"minimax: could not send an error ({message}): {e}")

    def finalize(self):
        self.stopping.set()
        self.thread.join(timeout=60)
        for job in list(self.jobs.values()):
            self._fail(job.sender, "the model is unloading")
        while not self.inbox.empty():
            self._fail(self.inbox.get_nowait().sender, "the model is unloading")
        self.engine.close()
        pb_utils.Logger.log_info("minimax: unloaded (engine closed)")
