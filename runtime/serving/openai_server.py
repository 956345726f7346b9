"""An OpenAI-compatible HTTP API over the runtime (FastAPI): /v1/models, /v1/chat/completions,
/v1/completions (streaming by server-sent events, or not), /health and /metrics (Prometheus).

Every request goes through the shared serving loop (runtime/serving/loop.py), so concurrent requests
share continuous batching. The answer is split as the model writes it: text up to </think> is
`reasoning_content` (the published generation prompt opens the thinking block), <minimax:tool_call>
blocks become `tool_calls` (runtime/serving/tool_calls.py), the rest is `content`. A client that
disconnects cancels its request, which frees its KV blocks. The same app serves Anthropic's Messages
API (/v1/messages, runtime/serving/anthropic_api.py) through the same checks, loop and parser.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import jinja2
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import validation
from . import anthropic_api
from ..llm_engine import LLMEngine, RequestError
from ..output_text import OutputText
from ..constrained import SchemaError, Spec
from .constraints import chat_spec, spec_param
from .logprobs import ChatLogprobs, CompletionLogprobs
from .loop import Event, Request, ServingLoop
from .openai_protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, OpenAIError
from .tool_calls import CallDelta, Parsed, ToolCallParser, merge_calls

DEFAULT_MAX_TOKENS = 512
EXIT_CODE_DEAD = 3
UNION_FORMS = {"prompt": "must be a non-empty string or a non-empty list of token ids (integers >= 0)",
               "stop": "must be a string or a list of strings", "tool_choice": "must be 'none', 'auto', 'required' "
               "or {\"type\": \"function\", \"function\": {\"name\": ...}}"}  # the engine died: a supervisor restarts the server


@dataclass
class ServerLimits:
    """What one client may ask of the server (python -m runtime.serve's flags)."""
    api_key: str | None = None           # every route but /health and /metrics needs it
    max_body_bytes: int = 32 * 2 ** 20   # a 196K-token prompt is ~1 MB of text
    max_waiting: int = 512               # requests queued beyond the running batch; more get 429
    exit_on_dead: bool = True            # a dead engine ends the process (for a supervisor to restart it)
    exit_grace_s: float = 1.0            # time for the error events to reach the open streams


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
        self.preemptions = Counter("minimax_preemptions", "Sequences preempted (KV cache full), to be recomputed",
                                   registry=r)
        self.rejected = Counter("minimax_requests_rejected", "Requests refused before reaching the engine",
                                ["status"], registry=r)
        self._seen_preemptions = 0
        self._sched = sched

    def on_step(self, batch: int) -> None:
        self.batch.observe(batch)
        n = self._sched.num_preemptions
        if n > self._seen_preemptions:
            self.preemptions.inc(n - self._seen_preemptions)
            self._seen_preemptions = n


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
        if isinstance(m.get("content"), list):  # text parts only (the protocol refuses others)
            m["content"] = "".join(p.get("text", "") for p in m["content"])
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
                if not isinstance(f["arguments"], dict):
                    raise OpenAIError("tool call arguments must be a JSON object", "messages")
            calls.append({**c, "function": f})
        if calls:
            m["tool_calls"] = calls
        out.append(m)
    return out


class OpenAIServer:
    def __init__(self, engine: LLMEngine, model_name: str, limits: ServerLimits | None = None):
        self.engine, self.codec, self.model_name = engine, engine.codec, model_name
        self.limits = limits or ServerLimits()
        self.metrics = Metrics(engine, lambda: self.loop)  # the loop is read lazily, by the gauges
        self.loop = ServingLoop(engine, "openai-serve", on_step=self.metrics.on_step, on_dead=self._on_dead)
        self.app = self._make_app()

    def _on_dead(self, message: str) -> None:
        """The engine cannot serve any more: stop its ranks and, unless told otherwise, exit non-zero
        once the open streams had a moment to get their error, so that a supervisor restarts us."""
        self.engine.kill_ranks()
        if not self.limits.exit_on_dead:
            return

        def leave():
            time.sleep(self.limits.exit_grace_s)
            print(f"minimax: exiting with code {EXIT_CODE_DEAD}: {message}", file=sys.stderr, flush=True)
            os._exit(EXIT_CODE_DEAD)

        threading.Thread(target=leave, daemon=True).start()

    # ---- requests -> engine requests ----------------------------------------------------------
    def _params(self, body, prompt: list[int], max_tokens: int | None, max_tokens_param: str = "max_tokens",
                prompt_param: str = "prompt"):
        """Every sampling field checked (runtime/validation.py) and the prompt checked by the engine."""
        try:
            validation.check_prompt_ids(prompt, self.engine.model_config.vocab_size)
            params = validation.sampling_params(
                validation.Limits(self.engine.model_config.vocab_size, self.engine.max_model_len, DEFAULT_MAX_TOKENS),
                self.engine.generation_defaults, len(prompt), temperature=body.temperature, top_p=body.top_p,
                top_k=body.top_k, max_tokens=max_tokens, seed=body.seed, stop_token_ids=body.stop_token_ids,
                ignore_eos=body.ignore_eos, max_tokens_param=max_tokens_param, prompt_param=prompt_param)
            self.engine.check_request(prompt, params)
        except RequestError as e:
            raise OpenAIError(str(e), getattr(e, "param", None)) from None
        return params

    def _check_model(self, body) -> None:
        if body.model is not None and body.model != self.model_name:
            raise OpenAIError(f"The model `{body.model}` does not exist (this server serves `{self.model_name}`)",
                              "model", status=404, code="model_not_found")

    def _check_capacity(self) -> None:
        if self.loop.dead:
            raise OpenAIError(f"the engine cannot serve: {self.loop.dead}", status=503, kind="server_error")
        if self.loop.queued() >= self.limits.max_waiting:
            raise OpenAIError(f"the server is at capacity ({self.loop.queued()} requests waiting); retry later",
                              status=429, kind="rate_limit_error")

    def _need_codec(self, what: str) -> None:
        if self.codec is None:
            raise OpenAIError(f"this model has no tokenizer.json: {what} needs one; send token ids to /v1/completions")

    async def constraint(self, spec: Spec | None, prompt: list[int], param: str | None = None):
        """The request's grammar matcher (None: free text). The compile runs on a worker thread (the
        library caches it by the grammar's text), so neither this event loop nor the serving loop waits.
        param: the request field a compile error names (default: the OpenAI one)."""
        if spec is None:
            return None
        try:
            grammars = self.engine.grammars
            compiled = await asyncio.to_thread(grammars.compile, spec)
        except (SchemaError, RequestError) as e:
            raise OpenAIError(str(e), param or spec_param(spec)) from None
        return grammars.constraint_for(compiled, self.codec.in_thinking(prompt), spec.kind)

    async def _events(self, http: HTTPRequest, prompt: list[int], params, text: OutputText | None,
                      constraint=None) -> AsyncIterator[Event]:
        """The request's events as they come; cancelled (blocks freed) if the client goes away."""
        aloop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()
        req = Request(prompt, params, lambda ev: aloop.call_soon_threadsafe(q.put_nowait, ev), text,
                      constraint=constraint)
        self.loop.submit(req)
        done, first = False, True
        checked = time.monotonic()
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    ev = None
                if time.monotonic() - checked >= 1.0:  # also while tokens flow: a gone client stops its work
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return
                if ev is None:
                    continue
                if ev.error is None:
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
                self.metrics.finished.labels("abort").inc()

    @staticmethod
    def _usage(ev: Event, n_prompt: int) -> dict:
        done = ev.completion_tokens
        cached = ev.seq.num_cached_prompt if ev.seq else 0
        return {"prompt_tokens": n_prompt, "completion_tokens": done, "total_tokens": n_prompt + done,
                "prompt_tokens_details": {"cached_tokens": cached}}

    # ---- chat ---------------------------------------------------------------------------------
    def _chat_prompt(self, body: ChatCompletionRequest):
        self._check_model(body)
        self._need_codec("/v1/chat/completions")
        body.check()
        stops = body.stops()
        try:
            tools = validation.check_tools(body.tool_dicts()) if body.tool_choice != "none" else None
        except RequestError as e:
            raise OpenAIError(str(e), e.param) from None
        try:
            ids = self.codec.encode_chat(_render_messages(body.message_dicts()), thinking=body.thinking,
                                         **({"tools": tools} if tools else {}))
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise OpenAIError(f"the messages do not fit the chat template: {e}", "messages") from None
        name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        params = self._params(body, ids, body.max_completion_tokens or body.max_tokens, name, "messages")
        self._check_capacity()
        if body.logprobs:
            params.logprobs = body.top_logprobs or 0
        spec = chat_spec(body.response_format, tools, body.tool_choice, body.parallel_tool_calls)
        text = OutputText(self.codec, self.codec.in_thinking(ids), stops)
        # Always a parser: without declared tools (or with tool_choice 'none') every invoke is undeclared,
        # so the markup is dropped and never shown as content.
        return ids, params, text, ToolCallParser(tools or []), spec

    async def chat(self, body: ChatCompletionRequest, http: HTTPRequest):
        ids, params, text, parser, spec = self._chat_prompt(body)
        constraint = await self.constraint(spec, ids)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", _now()
        events = self._events(http, ids, params, text, constraint)
        lp = ChatLogprobs(self.codec) if body.logprobs else None

        def split(ev: Event) -> tuple[str, Parsed]:
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
                    logprobs = lp.entry(ev) if lp else None
                    if delta or ev.finished or logprobs:
                        choice = {"index": 0, "delta": delta, "finish_reason": reason(ev, called) if ev.finished else None}
                        if logprobs:
                            choice["logprobs"] = {"content": logprobs}
                        yield _sse(head | {"choices": [choice]})
                    if ev.finished and include_usage:
                        yield _sse(head | {"choices": [], "usage": self._usage(ev, len(ids))})
                yield b"data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        reasoning, content, calls, last, entries = "", "", [], None, []
        async for ev in events:
            if ev.error is not None:
                raise OpenAIError(ev.error, status=503 if self.loop.dead else 500, kind="server_error")
            r, parsed = split(ev)
            reasoning, content, calls, last = reasoning + r, content + parsed.content, calls + parsed.calls, ev
            if lp:
                entries += lp.entry(ev)
        if last is None:  # the client went away
            return Response(status_code=499)
        message = {"role": "assistant", "content": content or (None if calls else ""),
                   "reasoning_content": reasoning or None}
        if calls:
            message["tool_calls"] = merge_calls(calls)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": reason(last, bool(calls)),
                             "logprobs": {"content": entries} if lp else None}],
                "usage": self._usage(last, len(ids))}

    # ---- completions --------------------------------------------------------------------------
    async def complete(self, body: CompletionRequest, http: HTTPRequest):
        self._check_model(body)
        body.check()
        if isinstance(body.prompt, str):
            self._need_codec("a text prompt")
            ids = self.codec.encode(body.prompt)
        else:
            ids = list(body.prompt)
        if body.stops() and self.codec is None:
            self._need_codec("stop strings")
        params = self._params(body, ids, body.max_tokens)
        params.logprobs = body.logprobs
        spec = chat_spec(body.response_format, None, None, None)
        if (spec is not None or body.logprobs is not None) and self.codec is None:
            self._need_codec("response_format and logprobs")
        self._check_capacity()
        constraint = await self.constraint(spec, ids)
        # Raw completion: the text in order, thinking included (no </think> split is asked for here).
        text = OutputText(self.codec, False, body.stops()) if self.codec else None
        rid, created = f"cmpl-{uuid.uuid4().hex}", _now()
        events = self._events(http, ids, params, text, constraint)
        lp = CompletionLogprobs(self.codec) if body.logprobs is not None else None

        def choice(ev: Event, toks: list[int]) -> dict:
            c = {"index": 0, "text": ev.delta.reasoning + ev.delta.content,
                 "logprobs": lp.chunk(ev) if lp else None,
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
                raise OpenAIError(ev.error, status=503 if self.loop.dead else 500, kind="server_error")
            text_out, last = text_out + ev.delta.reasoning + ev.delta.content, ev
            toks.append(ev.token)
            if lp:
                lp.add(ev)
        if last is None:
            return Response(status_code=499)
        c = {"index": 0, "text": text_out, "logprobs": lp.whole() if lp else None, "finish_reason": last.finish_reason}
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

        app = FastAPI(title="MiniMax-M2 (OpenAI- and Anthropic-compatible)", lifespan=lifespan)
        errors = {status: {"model": ErrorResponse, "description": what} for status, what in (
            (400, "invalid request (the field is named in error.param)"), (401, "missing or wrong API key"),
            (404, "unknown model"), (413, "request body too large"), (429, "too many requests waiting"),
            (500, "the request failed inside the engine"), (503, "the engine cannot serve"))}
        errors[200] = {"description": "the answer: a JSON object, or with stream=true server-sent events",
                       "content": {"application/json": {}, "text/event-stream": {}}}

        @app.exception_handler(OpenAIError)
        async def _openai_error(request, e: OpenAIError):
            if e.status >= 400 and e.status != 500:
                self.metrics.rejected.labels(str(e.status)).inc()
            body = anthropic_api.error_body(e) if anthropic_api.is_messages(request.url.path) else e.body()
            return JSONResponse(body, status_code=e.status)

        @app.exception_handler(RequestValidationError)
        async def _invalid(request, e: RequestValidationError):
            errs = e.errors()
            err = errs[0] if errs else {}
            if err.get("type") == "json_invalid":
                return await _openai_error(request, OpenAIError("the body is not valid JSON"))
            # pydantic's location, less its union-branch tags ("constrained-str", "list[...]")
            loc = [str(x) for x in err.get("loc", ())[1:]]
            where = ".".join(x for x in loc if "[" not in x and "-" not in x) or None
            msg = err.get("msg", "invalid request")
            if where == "messages" and err.get("type") == "too_short":
                msg = "must hold at least one message"
            if where == "n":
                msg = "n > 1 is not supported: send the request n times"
            if len({tuple(x.get("loc", ())[:2]) for x in errs}) == 1 and len(errs) > 1 and where in UNION_FORMS:
                msg = UNION_FORMS[where]  # every branch of a union failed: say what the field takes
            return await _openai_error(request, OpenAIError(f"{where or 'body'}: {msg}", where))

        @app.exception_handler(StarletteHTTPException)
        async def _http(request, e: StarletteHTTPException):
            # FastAPI's own answers (no such route, wrong method, a body it cannot parse) in OpenAI's shape.
            kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
            detail = str(e.detail)
            if detail == "There was an error parsing the body":
                detail = "the body could not be parsed as JSON (not UTF-8, or nested too deeply)"
            out = await _openai_error(request, OpenAIError(detail, status=e.status_code, kind=kind))
            out.headers.update(e.headers or {})  # e.g. Allow, with a 405
            return out

        @app.exception_handler(Exception)
        async def _bug(request, e: Exception):
            print(f"minimax: unexpected error on {request.url.path}:\n{traceback.format_exc()}", file=sys.stderr,
                  flush=True)
            return await _openai_error(request, OpenAIError(f"internal error: {type(e).__name__}", status=500,
                                                            kind="server_error"))

        @app.get("/health")
        async def health():
            if self.loop.dead:
                return JSONResponse({"status": "error", "detail": self.loop.dead}, status_code=503)
            return {"status": "ok"}

        @app.get("/metrics", response_class=PlainTextResponse,
                 responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}})
        async def metrics():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models", responses={401: errors[401]})
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                                "owned_by": "minimax-m2-trt",
                                                "max_model_len": self.engine.max_model_len}]}

        @app.post("/v1/chat/completions", responses=errors)
        async def chat(body: ChatCompletionRequest, request: HTTPRequest):
            return await self.chat(body, request)

        @app.post("/v1/completions", responses=errors)
        async def completions(body: CompletionRequest, request: HTTPRequest):
            return await self.complete(body, request)

        anthropic_api.MessagesAPI(self).install(app, errors)
        app.openapi = lambda: self._openapi(app)
        return _Guard(app, self)

    def _openapi(self, app: FastAPI) -> dict:
        """FastAPI's schema, saying what the server really answers: 400 (not 422) for a bad body, and the
        one model name it serves."""
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        comps = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            comps.pop(name, None)
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            if name in comps:
                comps[name]["properties"]["model"] = {"anyOf": [{"type": "string", "enum": [self.model_name]},
                                                                {"type": "null"}], "title": "Model"}
        for name in ("MessagesRequest", "CountTokensRequest"):  # Anthropic's: required
            if name in comps:
                comps[name]["properties"]["model"] = {"type": "string", "enum": [self.model_name], "title": "Model"}
        app.openapi_schema = schema
        return schema

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


class _Guard:
    """ASGI wrapper in front of the app: the API key, and the body-size cap (read whole before the app
    sees it, so an oversized body never reaches the JSON parser and is never held past the cap)."""
    OPEN = ("/health", "/metrics")

    def __init__(self, app: FastAPI, server: OpenAIServer):
        self.app, self.server = app, server

    def __getattr__(self, name):  # app.state, app.routes, ... for whoever holds `server.app`
        return getattr(self.app, name)

    async def _refuse(self, send, path: str, e: OpenAIError) -> None:
        self.server.metrics.rejected.labels(str(e.status)).inc()
        body = json.dumps(anthropic_api.error_body(e) if anthropic_api.is_messages(path) else e.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if e.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": e.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limits, path = self.server.limits, scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if limits.api_key and path not in self.OPEN:
            given = headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), limits.api_key.encode()):
                return await self._refuse(send, path, OpenAIError(
                    "a valid API key is needed (Authorization: Bearer KEY, or x-api-key: KEY)", status=401,
                    kind="authentication_error", code="invalid_api_key"))
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = OpenAIError(f"the request body is larger than {limits.max_body_bytes} bytes", status=413,
                                code="request_too_large")
        try:
            if int(headers.get("content-length") or 0) > limits.max_body_bytes:
                return await self._refuse(send, path, too_large)
        except ValueError:
            return await self._refuse(send, path, OpenAIError("Content-Length is not a number"))
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > limits.max_body_bytes:
                return await self._refuse(send, path, too_large)
            if not msg.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the client's disconnect, for streaming responses

        return await self.app(scope, replay, send)
