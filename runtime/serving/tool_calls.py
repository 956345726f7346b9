"""MiniMax-M2 tool calls in the answer text, parsed as they stream into OpenAI `tool_calls`.

The model writes (between the <minimax:tool_call> and </minimax:tool_call> tokens):

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="location">Paris</parameter>
    <parameter name="days">3</parameter>
    </invoke>
    </minimax:tool_call>

Each <invoke> becomes a call: its id and name as soon as the invoke tag is complete, then its
arguments as a JSON object streamed parameter by parameter (each value typed by the tool's JSON
schema: numbers, booleans, objects and arrays parsed, strings kept), closed at </invoke>. The
argument fragments of a call join to exactly the JSON of its arguments. Text outside the blocks is
content. A block that does not follow the format is given back as content, never an exception.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

BEGIN, END = "<minimax:tool_call>", "</minimax:tool_call>"
_INVOKE = re.compile(r'\s*<invoke name="([^"]*)">')
_PARAM_OPEN = re.compile(r'\s*<parameter name="([^"]*)">')
_PARAM_CLOSE = "</parameter>"
_INVOKE_END = re.compile(r"\s*</invoke>")
_BLOCK_END = re.compile(r"\s*" + re.escape(END))
# What may come next inside a block, for telling "not yet complete" from "malformed".
_STARTS = ('<invoke name="', "</minimax:tool_call>")
_STARTS_IN_INVOKE = ('<parameter name="', "</invoke>")


@dataclass
class CallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Parsed:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def __iadd__(self, other: "Parsed") -> "Parsed":
        self.content += other.content
        self.calls += other.calls
        return self


def schema_types(tools: list[dict] | None) -> dict[str, dict[str, str]]:
    """tool name -> parameter name -> JSON-schema type, from OpenAI `tools`."""
    out = {}
    for t in tools or []:
        f = t.get("function", t) if isinstance(t, dict) else {}
        props = (f.get("parameters") or {}).get("properties") or {}
        out[f.get("name", "")] = {k: (v.get("type") if isinstance(v, dict) else None) for k, v in props.items()}
    return out


def typed_value(text: str, kind) -> object:
    """A parameter's text as its schema type (a value that does not parse stays a string)."""
    if text.startswith("\n"):
        text = text[1:]
    if text.endswith("\n"):
        text = text[:-1]
    kind = kind[0] if isinstance(kind, list) and kind else kind
    if kind == "string":
        return text
    if text.strip().lower() == "null":
        return None
    try:
        if kind == "integer":
            return int(text.strip())
        if kind == "number":
            v = float(text.strip())
            return int(v) if v.is_integer() and "." not in text and "e" not in text.lower() else v
        if kind == "boolean":
            low = text.strip().lower()
            if low in ("true", "false"):
                return low == "true"
            return text
        return json.loads(text)  # object, array, or no schema: JSON if it is JSON
    except (ValueError, json.JSONDecodeError):
        return text


def _could_start(rest: str, starts: tuple[str, ...]) -> bool:
    """`rest` (whitespace stripped) is empty or a prefix of, or begins with, one of `starts`."""
    rest = rest.lstrip()
    return not rest or any(s.startswith(rest) or rest.startswith(s) for s in starts)


class ToolCallParser:
    def __init__(self, tools: list[dict] | None = None):
        self.types = schema_types(tools)
        self.buf = ""          # text not yet given out
        self.block = ""        # raw text of the open block (given back as content if malformed)
        self.inside = False
        self.call: CallDelta | None = None  # the open <invoke>
        self.params = 0        # parameters written in the open call
        self.count = 0         # calls so far

    def feed(self, text: str) -> Parsed:
        self.buf += text
        out = Parsed()
        while True:
            if not self.inside:
                i = self.buf.find(BEGIN)
                if i < 0:
                    keep = max((n for n in range(len(BEGIN) - 1, 0, -1) if self.buf.endswith(BEGIN[:n])), default=0)
                    out.content += self.buf[:len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
                out.content += self.buf[:i]
                self.buf, self.block, self.inside = self.buf[i + len(BEGIN):], BEGIN, True
                continue
            step = self._step()
            if step is None:  # need more text
                return out
            if step is False:  # malformed: the block is content after all
                out.content += self.block + self.buf
                self.buf, self.block, self.inside, self.call = "", "", False, None
                return out
            out += step

    def _take(self, n: int) -> None:
        self.block += self.buf[:n]
        self.buf = self.buf[n:]

    def _step(self) -> Parsed | None | bool:
        """One element of the block: a Parsed when one was read, None for "need more", False if malformed."""
        if self.call is None:
            if m := _INVOKE.match(self.buf):
                self._take(m.end())
                self.call = CallDelta(self.count, f"call_{uuid.uuid4().hex[:24]}", m.group(1), "")
                self.count, self.params = self.count + 1, 0
                return Parsed(calls=[self.call])
            if m := _BLOCK_END.match(self.buf):
                self._take(m.end())
                self.inside, self.block = False, ""
                return Parsed()
            return None if _could_start(self.buf, _STARTS) else False
        if m := _PARAM_OPEN.match(self.buf):
            end = self.buf.find(_PARAM_CLOSE, m.end())
            if end < 0:
                return None
            name, value = m.group(1), self.buf[m.end():end]
            self._take(end + len(_PARAM_CLOSE))
            typed = typed_value(value, self.types.get(self.call.name, {}).get(name))
            frag = ("{" if self.params == 0 else ", ") + json.dumps(name) + ": " + json.dumps(typed, ensure_ascii=False)
            self.params += 1
            return Parsed(calls=[CallDelta(self.call.index, arguments=frag)])
        if m := _INVOKE_END.match(self.buf):
            self._take(m.end())
            frag = "{}" if self.params == 0 else "}"
            index, self.call = self.call.index, None
            return Parsed(calls=[CallDelta(index, arguments=frag)])
        return None if _could_start(self.buf, _STARTS_IN_INVOKE) else False

    def finish(self) -> Parsed:
        """At the end of the output: an unclosed block (or a held-back partial tag) is content."""
        out = Parsed(content=(self.block + self.buf) if self.inside else self.buf)
        self.buf, self.block, self.inside, self.call = "", "", False, None
        return out


def merge_calls(deltas: list[CallDelta]) -> list[dict]:
    """Stream deltas -> the OpenAI `tool_calls` of a whole message."""
    calls: dict[int, dict] = {}
    for d in deltas:
        c = calls.setdefault(d.index, {"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
        if d.id:
            c["id"] = d.id
        if d.name is not None:
            c["function"]["name"] = d.name
        c["function"]["arguments"] += d.arguments
    return [calls[i] for i in sorted(calls)]
