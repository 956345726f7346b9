"""An Anthropic-compatible Messages API on the OpenAI server's app: POST /v1/messages (streaming by
Anthropic's server-sent events, or not) and POST /v1/messages/count_tokens.

A request is turned into the OpenAI route's chat messages (the same dicts, so the chat template renders
a tool_use / tool_result round trip exactly as it renders assistant `tool_calls` and `tool` messages)
and its tools into OpenAI form, then goes through the same checks (runtime/validation.py), the same
serving loop and the same tool-call parser as /v1/chat/completions. The answer becomes content blocks:
`thinking` (the text up to </think>), `text`, `tool_use` (one per parsed call). Errors on these paths
have Anthropic's shape, `{"type": "error", "error": {"type": ..., "message": ...}}`.
"""
from __future__ import annotations

import json
import uuid
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import jinja2
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from .. import validation
from ..constrained import Spec
from ..llm_engine import RequestError
from ..output_text import OutputText
from .loop import Event
from .openai_protocol import OpenAIError, text_parts_only
from .constraints import json_spec, tools_spec
from .tool_calls import CallDelta, ToolCallParser

if TYPE_CHECKING:
    from .openai_server import OpenAIServer

PREFIX = "/v1/messages"
# Accepted and without effect on the tokens (cache_control: the prefix cache works by itself).
HARMLESS = {"service_tier", "cache_control", "inference_geo", "speed", "diagnostics", "user_profile_id",
            "workspace_id"}
# OpenAIError's kinds -> Anthropic's error types (a dead engine, 503, is an api_error: it is not overload).
KINDS = {"server_error": "api_error"}
STATUS_KINDS = {404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                401: "authentication_error"}
BLOCK_TYPES = {"user": ("text", "tool_result"), "assistant": ("text", "tool_use", "thinking", "redacted_thinking")}


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """Every error on the Messages routes, as Anthropic shapes it."""
    type: Literal["error"]
    error: AnthropicErrorDetail


def is_messages(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_body(e: OpenAIError) -> dict:
    kind = STATUS_KINDS.get(e.status) or KINDS.get(e.kind, e.kind)
    return {"type": "error", "error": {"type": kind, "message": e.message}}


# ---- request bodies -----------------------------------------------------------------------------

class _Block(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, citations: no effect here


class TextBlock(_Block):
    type: Literal["text"]
    text: StrictStr


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: StrictStr
    name: StrictStr
    input: dict[str, Any]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: StrictStr
    content: Union[StrictStr, list[TextBlock], None] = None
    is_error: StrictBool | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any):
        return _text_parts(v)


class ThinkingBlock(_Block):
    type: Literal["thinking"]
    thinking: StrictStr
    signature: StrictStr | None = None


class RedactedThinkingBlock(_Block):
    type: Literal["redacted_thinking"]
    data: StrictStr = ""


Block = Annotated[Union[TextBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock],
                  Field(discriminator="type")]


def _text_parts(v: Any):
    return text_parts_only(v, "content blocks of type {!r} are not supported here")


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: Union[StrictStr, list[Block]]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, v: Any):
        if isinstance(v, list):
            for p in v:
                kind = p.get("type") if isinstance(p, dict) else None
                if kind not in ("text", "tool_use", "tool_result", "thinking", "redacted_thinking"):
                    raise ValueError(f"content blocks of type {kind!r} are not supported: this model takes text, "
                                     "tool_use, tool_result and (in assistant turns) thinking blocks")
        return v


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control
    type: Literal["custom"] | None = None    # server tools (web search, bash, ...) do not run here
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: StrictStr | None = None
    input_schema: dict[str, Any]


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: StrictStr | None = None
    disable_parallel_tool_use: StrictBool | None = None


class Thinking(BaseModel):
    model_config = ConfigDict(extra="allow")  # display: the thinking is always shown
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: StrictInt | None = None   # not enforced: the model ends its thinking itself


class OutputFormat(BaseModel):
    """Structured output: the answer's text is JSON that validates against `schema`."""
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    effort: StrictStr | None = None            # accepted; the model decides how long it thinks
    format: OutputFormat | None = None


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    messages: Annotated[list[Message], Field(min_length=1)]
    system: Union[StrictStr, list[TextBlock], None] = None
    tools: Annotated[list[Tool], Field(max_length=validation.MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None

    def check(self) -> None:
        for name in self.model_extra or {}:
            if name not in HARMLESS:
                raise OpenAIError(f"{name} is not supported by this server", name)
        c = self.tool_choice
        if c is not None and c.type in ("any", "tool"):
            if not self.tools:
                raise OpenAIError(f"tool_choice {c.type!r} needs tools", "tool_choice")
            if c.type == "tool" and c.name not in {t.name for t in self.tools}:
                raise OpenAIError(f"tool_choice names {c.name!r}, which is not in tools", "tool_choice.name")
            if self.output_config is not None and self.output_config.format is not None:
                raise OpenAIError("output_config.format and a forced tool_choice cannot both hold the answer",
                                  "output_config.format")
        elif c is not None and c.name is not None:
            raise OpenAIError(f"tool_choice {c.type!r} takes no name", "tool_choice.name")

    def spec(self, tools: list[dict] | None) -> Spec | None:
        """What the answer is held to (runtime/constrained.py): tool_choice any -> a call of any tool,
        tool -> of that one (and one call only), disable_parallel_tool_use -> exactly one call;
        output_config.format -> JSON of its schema; None: free text."""
        c = self.tool_choice
        if c is not None and c.type in ("any", "tool"):
            return tools_spec(tools, c.name if c.type == "tool" else None, c.disable_parallel_tool_use is True,
                              lambda i: f"tools[{i}].input_schema")
        if self.output_config is not None and self.output_config.format is not None:
            return json_spec(self.output_config.format.schema_, "output_config.format.schema")
        return None


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[StrictInt, Field(ge=1)]
    stop_sequences: Annotated[list[Annotated[StrictStr, Field(max_length=validation.MAX_STOP_CHARS)]],
                              Field(max_length=validation.MAX_STOP_STRINGS)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    metadata: dict[str, Any] | None = None
    stream: StrictBool = False


# ---- requests -> the chat template's messages ---------------------------------------------------

def _text(content) -> str:
    return content if isinstance(content, str) else "".join(b.text for b in content or [])


def chat_messages(body: CountTokensRequest) -> list[dict]:
    """The request as the OpenAI route's messages: assistant tool_use -> `tool_calls` (arguments as an
    object, as the OpenAI route passes them to the template), tool_result -> `tool` messages (in the
    blocks' order, text blocks of the same turn after them as a user message), thinking ->
    `reasoning_content` (the template shows it only after the last user turn, as for OpenAI)."""
    if body.messages[-1].role == "assistant":  # the template would open a new turn after it, not continue it
        raise OpenAIError("a final assistant turn (prefill) is not supported: end with a user turn", "messages")
    out = [{"role": "system", "content": _text(body.system)}] if body.system is not None else []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        for b in m.content:
            if b.type not in BLOCK_TYPES[m.role]:
                raise OpenAIError(f"messages[{i}]: {b.type} blocks belong in "
                                  f"{'assistant' if m.role == 'user' else 'user'} turns", "messages")
        if m.role == "assistant":
            msg = {"role": "assistant", "content": "".join(b.text for b in m.content if b.type == "text")}
            thinking = "".join(b.thinking for b in m.content if b.type == "thinking")
            if thinking:
                msg["reasoning_content"] = thinking
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
                     for b in m.content if b.type == "tool_use"]
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        text: list[str] = []
        for b in m.content:
            if b.type == "tool_result":
                if text:
                    out.append({"role": "user", "content": "".join(text)})
                    text = []
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": _text(b.content)})
            else:
                text.append(b.text)
        if text or not m.content:
            out.append({"role": "user", "content": "".join(text)})
    return out


def openai_tools(body: CountTokensRequest) -> list[dict] | None:
    """Anthropic tools in OpenAI form for the chat template, checked as the OpenAI route checks them;
    None when there are none or tool_choice is 'none' (the template then shows no tools)."""
    if not body.tools or (body.tool_choice is not None and body.tool_choice.type == "none"):
        return None
    tools = [{"type": "function", "function": {"name": t.name, **({"description": t.description}
                                                                 if t.description is not None else {}),
                                               "parameters": t.input_schema}} for t in body.tools]
    try:
        return validation.check_tools(tools)
    except RequestError as e:
        name = lambda s: s.replace(".function.parameters", ".input_schema").replace(".function", "")  # noqa: E731
        raise OpenAIError(name(str(e)), name(e.param or "tools")) from None


# ---- the answer as content blocks ---------------------------------------------------------------

class Blocks:
    """Builds the answer's content blocks from the events, as the stream's events (`feed` returns them);
    the non-streaming answer is the same blocks, joined. A text block does not start with whitespace,
    and whitespace alone makes none (the model writes `\\n\\n` after </think> and before a tool call)."""

    def __init__(self):
        self.blocks: list[dict] = []
        self.open: int | None = None          # index of the block being streamed
        self.kind: str | None = None
        self.by_call: dict[int, int] = {}     # parsed call index -> block index
        self.args: dict[int, str] = {}        # block index -> its input JSON so far

    def _start(self, block: dict) -> list[dict]:
        out = self._stop()
        self.blocks.append(block)
        self.open, self.kind = len(self.blocks) - 1, block["type"]
        start = dict(block, input={}) if block["type"] == "tool_use" else dict(block)
        return out + [{"type": "content_block_start", "index": self.open, "content_block": start}]

    def _stop(self) -> list[dict]:
        if self.open is None:
            return []
        i, self.open, self.kind = self.open, None, None
        return [{"type": "content_block_stop", "index": i}]

    def _delta(self, index: int, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": index, "delta": delta}

    def feed(self, reasoning: str, content: str, calls: list[CallDelta]) -> list[dict]:
        out = []
        if reasoning:
            if self.kind != "thinking":
                out += self._start({"type": "thinking", "thinking": "", "signature": ""})
            self.blocks[self.open]["thinking"] += reasoning
            out.append(self._delta(self.open, {"type": "thinking_delta", "thinking": reasoning}))
        if content and self.kind != "text":
            content = content.lstrip()
            if content:
                out += self._start({"type": "text", "text": ""})
        if content:
            self.blocks[self.open]["text"] += content
            out.append(self._delta(self.open, {"type": "text_delta", "text": content}))
        for c in calls:
            if c.id:
                out += self._start({"type": "tool_use", "id": c.id, "name": c.name, "input": {}})
                self.by_call[c.index], self.args[self.open] = self.open, ""
            i = self.by_call[c.index]
            if c.arguments:
                self.args[i] += c.arguments
                out.append(self._delta(i, {"type": "input_json_delta", "partial_json": c.arguments}))
        return out

    def finish(self) -> list[dict]:
        for i, text in self.args.items():  # the parser's invariant: each call's fragments join to one object
            self.blocks[i]["input"] = json.loads(text or "{}")
        return self._stop()

    @property
    def called(self) -> bool:
        return bool(self.by_call)


def stop_reason(ev: Event, text: OutputText, called: bool) -> tuple[str, str | None]:
    if ev.finish_reason == "length":
        return "max_tokens", None
    if text.stop_hit is not None:
        return "stop_sequence", text.stop_hit
    return ("tool_use" if called else "end_turn"), None


def _usage(ev: Event, n_prompt: int) -> dict:
    """Anthropic's counts: input_tokens are the prompt tokens not read from the prefix cache."""
    cached = ev.seq.num_cached_prompt if ev.seq else 0
    return {"input_tokens": n_prompt - cached, "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0,
            "output_tokens": ev.completion_tokens}


def _sse(event: dict) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


# ---- the routes ---------------------------------------------------------------------------------

class MessagesAPI:
    def __init__(self, server: "OpenAIServer"):
        self.s = server

    def _prompt(self, body: CountTokensRequest) -> tuple[list[int], list[dict] | None]:
        s = self.s
        s._check_model(body)
        s._need_codec(PREFIX)
        body.check()
        tools = openai_tools(body)
        thinking = body.thinking is None or body.thinking.type != "disabled"
        from .openai_server import _render_messages  # (that module installs this one)
        try:
            ids = s.codec.encode_chat(_render_messages(chat_messages(body)), thinking=thinking,
                                      **({"tools": tools} if tools else {}))
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise OpenAIError(f"the messages do not fit the chat template: {e}", "messages") from None
        return ids, tools

    async def count_tokens(self, body: CountTokensRequest) -> dict:
        ids, _ = self._prompt(body)
        return {"input_tokens": len(ids)}

    async def create(self, body: MessagesRequest, http: HTTPRequest):
        s = self.s
        ids, tools = self._prompt(body)
        spec = body.spec(tools)
        try:
            stops = validation.check_stops(body.stop_sequences)
        except RequestError as e:
            raise OpenAIError(str(e), "stop_sequences") from None
        knobs = SimpleNamespace(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=None,
                                stop_token_ids=None, ignore_eos=False)
        params = s._params(knobs, ids, body.max_tokens, prompt_param="messages")
        s._check_capacity()
        text = OutputText(s.codec, s.codec.in_thinking(ids), stops)
        parser = ToolCallParser(tools or [])  # no tools declared: markup is dropped, never content
        rid = f"msg_{uuid.uuid4().hex}"
        param = None if spec is None else "output_config.format" if spec.kind == "json" else "tools"
        events = s._events(http, ids, params, text, await s.constraint(spec, ids, param))
        blocks = Blocks()

        def step(ev: Event) -> list[dict]:
            parsed = parser.feed(ev.delta.content)
            if ev.finished:
                parsed += parser.finish()
            out = blocks.feed(ev.delta.reasoning, parsed.content, parsed.calls)
            return out + (blocks.finish() if ev.finished else [])

        def message(ev: Event, content: list[dict], reason=None, seq=None) -> dict:
            return {"id": rid, "type": "message", "role": "assistant", "model": s.model_name, "content": content,
                    "stop_reason": reason, "stop_sequence": seq, "usage": _usage(ev, len(ids))}

        if body.stream:
            async def stream():
                started = False
                async for ev in events:
                    if ev.error is not None:
                        yield _sse(error_body(OpenAIError(ev.error, status=500, kind="server_error")))
                        return
                    if not started:  # after the first token: the prefix-cache hits are known
                        started = True
                        usage = _usage(ev, len(ids)) | {"output_tokens": 0}
                        yield _sse({"type": "message_start", "message": message(ev, []) | {"usage": usage}})
                        yield _sse({"type": "ping"})
                    for e in step(ev):
                        yield _sse(e)
                    if ev.finished:
                        reason, seq = stop_reason(ev, text, blocks.called)
                        yield _sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq},
                                    "usage": _usage(ev, len(ids))})
                        yield _sse({"type": "message_stop"})

            return StreamingResponse(stream(), media_type="text/event-stream")

        last = None
        async for ev in events:
            if ev.error is not None:
                raise OpenAIError(ev.error, status=503 if self.s.loop.dead else 500, kind="server_error")
            step(ev)
            last = ev
        if last is None:  # the client went away
            return Response(status_code=499)
        return message(last, blocks.blocks, *stop_reason(last, text, blocks.called))

    def install(self, app: FastAPI, errors: dict) -> None:
        """The two routes; `errors`: the OpenAI routes' responses, their errors documented here in this shape."""
        errors = {k: v | {"model": AnthropicErrorResponse} if k >= 400 else v for k, v in errors.items()}
        errors[400] = errors[400] | {"description": "invalid request (the message names the field)"}

        @app.post(PREFIX, responses=errors, tags=["Anthropic"])
        async def messages(body: MessagesRequest, request: HTTPRequest):
            return await self.create(body, request)

        counted = {k: v for k, v in errors.items() if k not in (200, 429, 500, 503)}  # no engine involved

        @app.post(PREFIX + "/count_tokens", responses=counted, tags=["Anthropic"])
        async def count_tokens(body: CountTokensRequest):
            return await self.count_tokens(body)
