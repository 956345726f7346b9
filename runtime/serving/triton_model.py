"""The runtime inside Triton Inference Server: a decoupled Python-backend model (runtime/serving/triton_repo.py
writes its repository; the inputs and outputs are listed there).

`execute` only parses requests and submits them to the shared serving loop (runtime/serving/loop.py),
whose thread owns the engine, batches concurrent requests together and reports each generated token;
each becomes one response (stream=false: one response at the end). A bad request gets an error
response and changes nothing else; its fields go through the same checks as the OpenAI server's
(runtime/validation.py).

If the engine dies (a lost or hung rank, a kernel fault), every open request gets an error and the
model shuts the server down (SIGTERM to tritonserver, SIGKILL if it is still there 3 s later, then this
stub exits): Triton 2.51 keeps a
Python model "ready" after its stub is gone, answering every request with an error for good, so
only an exit lets its supervisor restart the service.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from runtime import validation
from runtime.config import EngineConfig
from runtime.llm_engine import LLMEngine, RequestError
from runtime.output_text import Delta, OutputText
from runtime.serving.loop import Event, Request, ServingLoop
from runtime.serving.tool_calls import CallDelta, ToolCallParser

DEFAULT_MAX_TOKENS = 512
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


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


def _tools(request) -> list[dict] | None:
    """The optional `tools` input: a JSON list of OpenAI tool definitions, checked as the OpenAI server does."""
    raw = _scalar(request, "tools")
    if raw is None:
        return None
    try:
        tools = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestError(f"tools must be a JSON list of tool definitions: {e}", "tools") from None
    return validation.check_tools(tools)


def _string(values: list[str]) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_)


class _Responder:
    """Turns one request's events into Triton responses (one per token, or one at the end). The
    answer text goes through the same tool-call parser as the OpenAI server's."""

    def __init__(self, sender, stream: bool, parser: ToolCallParser):
        self.sender, self.stream, self.parser = sender, stream, parser
        self.ids: list[int] = []
        self.unsent = Delta()
        self.calls: list[CallDelta] = []

    def __call__(self, ev: Event) -> None:
        if ev.error is not None:
            TritonPythonModel.fail(self.sender, ev.error)
            return
        self.ids.append(ev.token)
        parsed = self.parser.feed(ev.delta.content)
        if ev.finished:
            parsed += self.parser.finish()
        self.unsent += Delta(ev.delta.reasoning, parsed.content)
        self.calls += parsed.calls
        if not (self.stream or ev.finished):
            return
        seq = ev.seq
        outputs = [
            pb_utils.Tensor("text_output", _string([self.unsent.content])),
            pb_utils.Tensor("reasoning_output", _string([self.unsent.reasoning])),
            pb_utils.Tensor("tool_calls_output", _string([json.dumps([asdict(c) for c in self.calls])])),
            pb_utils.Tensor("output_ids", np.array(self.ids, dtype=np.int64)),
            pb_utils.Tensor("finish_reason", _string([ev.finish_reason or "" if ev.finished else ""])),
            pb_utils.Tensor("prompt_tokens", np.array([len(seq.prompt)], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([ev.completion_tokens], dtype=np.int32)),
            pb_utils.Tensor("cached_tokens", np.array([seq.num_cached_prompt], dtype=np.int32)),
            pb_utils.Tensor("batch_size", np.array([ev.batch_size], dtype=np.int32)),
        ]
        self.ids, self.unsent, self.calls = [], Delta(), []
        # Raises when the client went away: the loop then cancels the request.
        self.sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if ev.finished else 0)


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
        config = EngineConfig.from_strings({k: v for k, v in p.items() if k not in ("model", "engines")})
        config.engines = str(engines) if engines else None
        self.exit_on_dead = p.get("exit_on_engine_failure", "true").lower() == "true"
        self.engine = LLMEngine.start(model, config)
        self.codec = self.engine.codec
        self.loop = ServingLoop(self.engine, on_dead=self._on_dead)
        pb_utils.Logger.log_info(f"minimax: serving {model} (backend {self.engine.backend.name}, "
                                 f"TP {self.engine.manifest.tp}, {self.engine.blocks.num_usable} KV blocks)")

    # ---- requests in (Triton's thread) ----------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                req = self._parse(request, sender)
            except (RequestError, UnicodeDecodeError, ValueError, TypeError) as e:
                self.fail(sender, str(e))
                continue
            self.loop.submit(req)
        return None

    def _parse(self, request, sender) -> Request:
        text, ids = _scalar(request, "text_input"), _list(request, "input_ids")
        if (text is None) == (not ids):
            raise RequestError("give exactly one of text_input (a string) or input_ids (token ids)")
        stops = [s for s in _list(request, "stop") if s]
        if self.codec is None and (text is not None or stops):
            raise RequestError("this export has no tokenizer.json: text_input and stop strings need one; "
                               "send input_ids")
        tools = _tools(request)
        if text is not None:
            try:
                if _scalar(request, "chat_template", True):
                    ids = self.codec.encode_chat([{"role": "user", "content": text}],
                                                 thinking=bool(_scalar(request, "thinking", True)),
                                                 **({"tools": tools} if tools else {}))
                else:
                    ids = self.codec.encode(text)
            except ValueError as e:
                raise RequestError(str(e)) from None
        if self.loop.dead:
            raise RequestError(f"the engine cannot serve: {self.loop.dead}")
        validation.check_stops(stops)
        validation.check_prompt_ids(ids, self.engine.model_config.vocab_size, "input_ids")
        params = validation.sampling_params(
            validation.Limits(self.engine.model_config.vocab_size, self.engine.max_model_len, DEFAULT_MAX_TOKENS),
            self.engine.generation_defaults, len(ids), temperature=_scalar(request, "temperature"),
            top_p=_scalar(request, "top_p"), top_k=_scalar(request, "top_k"), max_tokens=_scalar(request, "max_tokens"),
            seed=_scalar(request, "seed"), stop_token_ids=_list(request, "stop_token_ids") or None,
            ignore_eos=bool(_scalar(request, "ignore_eos", False)))
        out = OutputText(self.codec, self.codec.in_thinking(ids), stops) if self.codec else None
        # Without a `tools` input the prompt may still declare tools (raw text): any name is then a call and
        # every value a string (ToolCallParser(None)); with it, calls are typed by it as the OpenAI server does.
        responder = _Responder(sender, bool(_scalar(request, "stream", True)), ToolCallParser(tools))
        return Request(ids, params, responder, out, is_cancelled=getattr(sender, "is_cancelled", None))

    def _on_dead(self, message: str) -> None:
        pb_utils.Logger.log_error(f"minimax: {message}")
        self.engine.kill_ranks()
        if not self.exit_on_dead:
            return

        def leave():
            time.sleep(1.0)  # the error responses reach their clients first
            pb_utils.Logger.log_error("minimax: the engine is dead; shutting tritonserver down so that its "
                                      "supervisor restarts it")
            server = os.getppid()
            try:
                os.kill(server, signal.SIGTERM)
                # Triton waits its whole exit timeout (30 s) for a model whose engine is gone, and may not
                # exit even then: end it if it is still there after a few seconds.
                for _ in range(30):
                    time.sleep(0.1)
                    os.kill(server, 0)
                os.kill(server, signal.SIGKILL)
            except ProcessLookupError:
                pass
            finally:
                os._exit(3)

        threading.Thread(target=leave, daemon=True).start()

    @staticmethod
    def fail(sender, message: str) -> None:
        try:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
        except Exception as e:
            pb_utils.Logger.log_warn(f"minimax: could not send an error ({message}): {e}")

    def finalize(self):
        for req in self.loop.stop():
            try:
                req.on_event(Event(None, Delta(), True, "error", req.seq, error="the model is unloading"))
            except Exception:
                pass
        self.engine.close()
        pb_utils.Logger.log_info("minimax: unloaded (engine closed)")
