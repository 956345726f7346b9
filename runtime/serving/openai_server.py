"""An OpenAI-compatible HTTP API over the runtime (FastAPI): /v1/models, /v1/chat/completions,
/v1/completions (streaming by server-sent events, or not), /health and /metrics (Prometheus).

Every request goes through the shared serving loop (runtime/serving/loop.py), so concurrent requests
share continuous batching. The answer is split as the model writes it: text up to </think> is
`reasoning_content` (the published generation prompt opens the thinking block), <minimax:tool_call>
blocks become `tool_calls` (runtime/serving/tool_calls.py), the rest is `content`. A client that
disconnects cancels its request, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import jinja2
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..llm_engine import LLMEngine, RequestError
from ..output_text import OutputText
from .loop import Event, Request, ServingLoop
from .openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from .tool_calls import CallDelta, Parsed, ToolCallParser, merge_calls

DEFAULT_MAX_TOKENS = 512


class Metrics:
    def __init__(self, engine: LLMEngine, loop_ref):
        r = self.registry = CollectorRegistry()
        sched, blocks = engine.scheduler, engine.blocks
        Gauge("minimax_requests_running", "Sequences in the running batch", registry=r).set_function(
            lambda: len(sched.running))
        Gauge("minimax_requests_waiting", "Requests queued or waiting for KV blocks", registry=r).set_function(
            lambda: len(sched.waiting) + loop_ref().inbox.qsize())
        Gauge("minimax_kv_blocks_used", "KV-cache blocks held by sequences", registry=r).set_function(
            lambda: blocks.num_usable - blocks.num_free)
        Gauge("minimax_kv_blocks_total", "KV-cache blocks", registry=r).set(blocks.num_usable)
        self.prompt_tokens = Counter("minimax_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.cached_tokens = Counter("minimax_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.generated = Counter("minimax_generated_tokens", "Tokens generated", registry=r)
        self.finished = Counter("minimax_requests_finished", "Requests finished", ["reason"], registry=r)
        self.ttft = Histogram("minimax_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch = Histogram("minimax_step_batch_size", "Sequences per engine step", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


def _now() -> int:
    return int(time.time())


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _render_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> the chat template's: tool-call arguments as objects, content parts joined."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise OpenAIError("every message needs a role", "messages")
        m = dict(m)
        if m["role"] == "developer":
            m["role"] = "system"
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise OpenAIError(f"unknown role {m['role']!r}", "messages")
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
        if m.get("content") is None:
            m["content"] = ""
        calls = []
        for c in m.get("tool_calls") or []:
            f = dict(c.get("function", {}))
            if isinstance(f.get("arguments"), str):
                try:
                    f["arguments"] = json.loads(f["arguments"] or "{}")
                except json.JSONDecodeError as e:
                    raise OpenAIError(f"tool call arguments are not JSON: {e}", "messages") from None
            calls.append({**c, "function": f})
        if calls:
            m["tool_calls"] = calls
        out.append(m)
    return out


class OpenAIServer:
    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine, self.codec, self.model_name = engine, engine.codec, model_name
        self.metrics = Metrics(engine, lambda: self.loop)  # the loop is read lazily, by the gauges
        self.loop = ServingLoop(engine, "openai-serve", on_step=self.metrics.batch.observe)
        self.app = self._make_app()

    # ---- requests -> engine requests ----------------------------------------------------------
    def _params(self, body, max_tokens: int | None):
        return self.engine.sampling_params(
            body.temperature, body.top_p, body.top_k, max_tokens=max_tokens or DEFAULT_MAX_TOKENS, seed=body.seed,
            ignore_eos=body.ignore_eos, stop_token_ids=list(body.stop_token_ids or []))

    def _check(self, prompt: list[int], params) -> None:
        try:
            self.engine.check_request(prompt, params)
        except RequestError as e:
            raise OpenAIError(str(e)) from None

    def _need_codec(self, what: str) -> None:
        if self.codec is None:
            raise OpenAIError(f"this model has no tokenizer.json: {what} needs one; send token ids to /v1/completions")

    async def _events(self, http: HTTPRequest, prompt: list[int], params, text: OutputText | None
                      ) -> AsyncIterator[Event]:
        """The request's events as they come; cancelled (blocks freed) if the client goes away."""
        aloop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()
        req = Request(prompt, params, lambda ev: aloop.call_soon_threadsafe(q.put_nowait, ev), text)
        self.loop.submit(req)
        done, first = False, True
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if ev.token >= 0:
                    if first:
                        first = False
                        self.metrics.ttft.observe(req.first_token_at - req.arrived)
                        self.metrics.prompt_tokens.inc(len(prompt))
                        self.metrics.cached_tokens.inc(ev.seq.num_cached_prompt)
                    self.metrics.generated.inc()
                if ev.finished:
                    done = True
                    self.metrics.finished.labels(ev.finish_reason or "error").inc()
                yield ev
                if ev.finished:
                    return
        finally:
            if not done:
                req.cancel()

    @staticmethod
    def _usage(ev: Event, n_prompt: int) -> dict:
        done = len(ev.seq.output) if ev.seq else 0
        cached = ev.seq.num_cached_prompt if ev.seq else 0
        return {"prompt_tokens": n_prompt, "completion_tokens": done, "total_tokens": n_prompt + done,
                "prompt_tokens_details": {"cached_tokens": cached}}

    # ---- chat ---------------------------------------------------------------------------------
    def _chat_prompt(self, body: ChatCompletionRequest):
        self._need_codec("/v1/chat/completions")
        body.check()
        tools = body.tools if body.tool_choice != "none" else None
        try:
            ids = self.codec.encode_chat(_render_messages(body.messages), thinking=body.thinking,
                                         **({"tools": tools} if tools else {}))
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise OpenAIError(f"the messages do not fit the chat template: {e}", "messages") from None
        params = self._params(body, body.max_completion_tokens or body.max_tokens)
        self._check(ids, params)
        text = OutputText(self.codec, self.codec.in_thinking(ids), body.stops())
        return ids, params, text, (ToolCallParser(tools) if tools else None)

    async def chat(self, body: ChatCompletionRequest, http: HTTPRequest):
        ids, params, text, parser = self._chat_prompt(body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", _now()
        events = self._events(http, ids, params, text)

        def split(ev: Event) -> tuple[str, Parsed]:
            parsed = Parsed(content=ev.delta.content)
            if parser is not None:
                parsed = parser.feed(ev.delta.content)
                if ev.finished:
                    parsed += parser.finish()
            return ev.delta.reasoning, parsed

        def reason(ev: Event, called: bool) -> str:
            return "tool_calls" if called and ev.finish_reason == "stop" else (ev.finish_reason or "stop")

        if body.stream:
            include_usage = bool(((body.model_extra or {}).get("stream_options") or {}).get("include_usage"))

            async def stream():
                head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
                yield _sse(head | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None}]})
                called = False
                async for ev in events:
                    if ev.error is not None:
                        yield _sse({"error": OpenAIError(ev.error, status=500, kind="server_error").body()["error"]})
                        break
                    reasoning, parsed = split(ev)
                    delta = {}
                    if reasoning:
                        delta["reasoning_content"] = reasoning
                    if parsed.content:
                        delta["content"] = parsed.content
                    if parsed.calls:
                        called = True
                        delta["tool_calls"] = [_call_delta(c) for c in parsed.calls]
                    if delta or ev.finished:
                        yield _sse(head | {"choices": [{"index": 0, "delta": delta,
                                                        "finish_reason": reason(ev, called) if ev.finished else None}]})
                    if ev.finished and include_usage:
                        yield _sse(head | {"choices": [], "usage": self._usage(ev, len(ids))})
                yield b"data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        reasoning, content, calls, last = "", "", [], None
        async for ev in events:
            if ev.error is not None:
                raise OpenAIError(ev.error, status=500, kind="server_error")
            r, parsed = split(ev)
            reasoning, content, calls, last = reasoning + r, content + parsed.content, calls + parsed.calls, ev
        if last is None:  # the client went away
            return Response(status_code=499)
        message = {"role": "assistant", "content": content or (None if calls else ""),
                   "reasoning_content": reasoning or None}
        if calls:
            message["tool_calls"] = merge_calls(calls)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": reason(last, bool(calls)),
                             "logprobs": None}],
                "usage": self._usage(last, len(ids))}

    # ---- completions --------------------------------------------------------------------------
    async def complete(self, body: CompletionRequest, http: HTTPRequest):
        body.check()
        if isinstance(body.prompt, str):
            self._need_codec("a text prompt")
            ids = self.codec.encode(body.prompt)
        else:
            ids = list(body.prompt)
            if not all(isinstance(t, int) for t in ids):
                raise OpenAIError("a token-id prompt must be a list of integers", "prompt")
        if body.stops() and self.codec is None:
            self._need_codec("stop strings")
        params = self._params(body, body.max_tokens)
        self._check(ids, params)
        # Raw completion: the text in order, thinking included (no </think> split is asked for here).
        text = OutputText(self.codec, False, body.stops()) if self.codec else None
        rid, created = f"cmpl-{uuid.uuid4().hex}", _now()
        events = self._events(http, ids, params, text)

        def choice(ev: Event, toks: list[int]) -> dict:
            c = {"index": 0, "text": ev.delta.reasoning + ev.delta.content, "logprobs": None,
                 "finish_reason": ev.finish_reason if ev.finished else None}
            if body.return_token_ids:
                c["token_ids"] = toks
            return c

        if body.stream:
            async def stream():
                async for ev in events:
                    if ev.error is not None:
                        yield _sse({"error": OpenAIError(ev.error, status=500, kind="server_error").body()["error"]})
                        break
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                                "choices": [choice(ev, [ev.token])]})
                yield b"data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        text_out, toks, last = "", [], None
        async for ev in events:
            if ev.error is not None:
                raise OpenAIError(ev.error, status=500, kind="server_error")
            text_out, last = text_out + ev.delta.reasoning + ev.delta.content, ev
            toks.append(ev.token)
        if last is None:
            return Response(status_code=499)
        c = {"index": 0, "text": text_out, "logprobs": None, "finish_reason": last.finish_reason}
        if body.return_token_ids:
            c["token_ids"] = toks
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": [c], "usage": self._usage(last, len(ids))}

    # ---- the app ------------------------------------------------------------------------------
    def _make_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app):
            yield
            self.close()

        app = FastAPI(title="MiniMax-M2 (OpenAI-compatible)", lifespan=lifespan)

        @app.exception_handler(OpenAIError)
        async def _openai_error(request, e: OpenAIError):
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(RequestValidationError)
        async def _invalid(request, e: RequestValidationError):
            err = e.errors()[0] if e.errors() else {}
            where = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
            msg = "the body is not valid JSON" if err.get("type") == "json_invalid" else \
                f"{where or 'body'}: {err.get('msg', 'invalid request')}"
            return JSONResponse(OpenAIError(msg, None if err.get("type") == "json_invalid" else where).body(),
                                status_code=400)

        @app.get("/health")
        async def health():
            if self.loop.dead:
                return JSONResponse({"status": "error", "detail": self.loop.dead}, status_code=503)
            return {"status": "ok"}

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                                "owned_by": "minimax-m2-trt",
                                                "max_model_len": self.engine.max_model_len}]}

        @app.post("/v1/chat/completions")
        async def chat(body: ChatCompletionRequest, request: HTTPRequest):
            return await self.chat(body, request)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: HTTPRequest):
            return await self.complete(body, request)

        return app

    def close(self) -> None:
        """Stop the loop (requests still running are cancelled) and the engine with its ranks; once."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        for req in self.loop.stop():
            req.cancel()
        self.engine.close()
        print("minimax: stopped (engine and its ranks closed)", file=sys.stderr, flush=True)


def _call_delta(c: CallDelta) -> dict:
    d = {"index": c.index, "function": {"arguments": c.arguments}}
    if c.id:
        d["id"], d["type"] = c.id, "function"
    if c.name is not None:
        d["function"]["name"] = c.name
    return d
