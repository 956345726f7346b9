"""MiniMax-M2 tool calls in the answer text, parsed as they stream into OpenAI `tool_calls`.

The model writes (between the <minimax:tool_call> and </minimax:tool_call> tokens):

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="location">Paris</parameter>
    <parameter name="days">3</parameter>
    </invoke>
    </minimax:tool_call>

What holds for every input: each call's `arguments` is one complete JSON object with unique keys,
and its streamed fragments join to exactly it; markup this parser recognises never reaches content.
- A call is sent (id and name) once its `<invoke ...>` tag is complete and names a declared tool
  (any name when no tool list was given); its arguments follow parameter by parameter, each once it
  is closed, typed by the tool's schema (tool_schema.py); `}` at `</invoke>`.
- Tags may carry other attributes than `name` (in any order, either quote); they are ignored.
- A `</parameter>` ends a value only where a tag follows it (after optional whitespace): the next
  `<parameter`, `</invoke>`, `<invoke` or `</minimax:tool_call>`. Anywhere else it is value text, so
  values may hold XML, even this format.
- A parameter given twice keeps its first value (the first was already sent).
- Dropped, never content, as the serving engines do: an invoke of an undeclared tool or without a
  name (no index is used: the calls' indices stay dense), text between the elements of a block, a
  stray `</minimax:tool_call>` outside one, and whatever a truncated block leaves unfinished. A call
  already begun is then closed with the parameters it has (finish(), or the block's end).
Text outside the blocks is content, verbatim. The work per fed piece is proportional to the piece
(values are kept as a list of parts; only a possible partial tag is rescanned).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from .tool_schema import tool_types, typed_value

BEGIN, END = "<minimax:tool_call>", "</minimax:tool_call>"
INVOKE_END, PARAM_END = "</invoke>", "</parameter>"
# An opening tag: attributes up to the first `>` outside quotes.
_OPEN = {w: re.compile(r"<" + w + r"""(?=[\s>])((?:[^>"']|"[^"]*"|'[^']*')*)>""") for w in ("invoke", "parameter")}
_ATTR = re.compile(r"""([^\s=/>"']+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>"']+))""")
# A tag longer than this is not one (so a stray `<invoke` with an unbalanced quote is not waited on forever).
MAX_TAG = 4096
NEED = "need"  # "not decided yet: more text is needed"
OUT, BLOCK, INVOKE, VALUE = range(4)


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


def _open_tag(s: str, word: str):
    """`s` (starting with "<") as the opening tag `word`: (name attribute or None, length), NEED, or None."""
    head = "<" + word
    if len(s) <= len(head):
        return NEED if head.startswith(s) else None
    if not s.startswith(head) or not (s[len(head)].isspace() or s[len(head)] == ">"):
        return None
    m = _OPEN[word].match(s, 0, MAX_TAG)
    if m is None:
        return NEED if len(s) < MAX_TAG else None
    name = None
    for a in _ATTR.finditer(m.group(1)):
        if a.group(1).lower() == "name":
            name = next(g for g in a.groups()[1:] if g is not None).strip()
            break
    return name, m.end()


def _close_tag(s: str, tag: str):
    """`s` as the closing tag `tag`: its length, NEED, or None."""
    if s.startswith(tag):
        return len(tag)
    return NEED if tag.startswith(s) else None


def _starts_open(s: str, word: str):
    """`s` begins the opening tag `word` (its name and a space or `>`): True, NEED, or None."""
    head = "<" + word
    if len(s) <= len(head):
        return NEED if head.startswith(s) else None
    return True if s.startswith(head) and (s[len(head)].isspace() or s[len(head)] == ">") else None


def _ends_value(after: str):
    """Whether a `</parameter>` followed by `after` (whitespace stripped) ends its value: True, False or NEED."""
    if not after:
        return NEED
    found = [_starts_open(after, "parameter"), _starts_open(after, "invoke"),
             _close_tag(after, INVOKE_END), _close_tag(after, END)]
    if any(r is not None and r is not NEED for r in found):
        return True
    return NEED if NEED in found else False


class ToolCallParser:
    """Feed the answer text (content, not reasoning) piece by piece; finish() at the end.

    `tools`: the request's tools (OpenAI `function.parameters` or Anthropic `input_schema`); only
    their names become calls and their schemas type the values. None: no tool list is known (any
    name is a call, every value a string)."""

    def __init__(self, tools: list | None = None):
        self.types = tool_types(tools)
        self.buf = ""          # text not yet decided
        self.state = OUT
        self.call: CallDelta | None = None  # the open invoke, when it is being sent
        self.sent: set[str] = set()         # parameter names the open call has sent
        self.param: str | None = None       # the open parameter's name
        self.value: list[str] = []          # the open value's text so far
        self.count = 0                      # calls sent

    def feed(self, text: str) -> Parsed:
        self.buf += text
        out = Parsed()
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> Parsed:
        """The end of the output: a held-back partial tag outside a block is content; a call still
        open is closed with the parameters it has; anything else unfinished is dropped."""
        out = Parsed()
        while self._step(out, final=True):
            pass
        if self.state == OUT:
            out.content += self.buf
        else:
            self._end_invoke(out)
        self.buf, self.state, self.value = "", OUT, []
        return out

    # ---- one element at a time; False: nothing more can be decided now -------------------------
    def _step(self, out: Parsed, final: bool) -> bool:
        if self.state == OUT:
            return self._outside(out)
        if self.state == VALUE:
            return self._in_value(out, final)
        s = self.buf.lstrip()
        if not s:
            self.buf = ""
            return False
        if s[0] != "<":  # text between elements: dropped
            k = s.find("<")
            self.buf = s[k:] if k >= 0 else ""
            return k >= 0
        self.buf = s
        opened = _open_tag(s, "invoke")
        if isinstance(opened, tuple):
            self._end_invoke(out)  # an invoke without its </invoke> ends where the next begins
            self.buf = s[opened[1]:]
            self._begin_invoke(opened[0], out)
            return True
        pending = opened is NEED
        if self.state == INVOKE:
            param = _open_tag(s, "parameter")
            if isinstance(param, tuple):
                self.buf, self.param, self.value, self.state = s[param[1]:], param[0], [], VALUE
                return True
            n = _close_tag(s, INVOKE_END)
            if isinstance(n, int):
                self.buf = s[n:]
                self._end_invoke(out)
                self.state = BLOCK
                return True
            pending = pending or param is NEED or n is NEED
        n = _close_tag(s, END)
        if isinstance(n, int):
            self._end_invoke(out)
            self.buf, self.state = s[n:], OUT
            return True
        if (pending or n is NEED) and not final:
            return False
        self.buf = s[1:]  # not a tag this parser knows here: dropped
        return True

    def _outside(self, out: Parsed) -> bool:
        b, e = self.buf.find(BEGIN), self.buf.find(END)
        i = min(x for x in (b, e) if x >= 0) if b >= 0 or e >= 0 else -1
        if i < 0:
            k = self.buf.rfind("<")  # both tags hold one "<", at their start
            keep = k >= 0 and (BEGIN.startswith(self.buf[k:]) or END.startswith(self.buf[k:]))
            cut = k if keep else len(self.buf)
            out.content += self.buf[:cut]
            self.buf = self.buf[cut:]
            return False
        out.content += self.buf[:i]
        if i == b:
            self.buf, self.state = self.buf[i + len(BEGIN):], BLOCK
        else:  # a stray end tag
            self.buf = self.buf[i + len(END):]
        return True

    def _in_value(self, out: Parsed, final: bool) -> bool:
        i = self.buf.find(PARAM_END)
        if i < 0:
            cut = max(0, len(self.buf) - (len(PARAM_END) - 1))  # keep what may begin a </parameter>
            self.value.append(self.buf[:cut])
            self.buf = self.buf[cut:]
            return False
        ends = _ends_value(self.buf[i + len(PARAM_END):].lstrip())
        if ends is NEED and not final:
            self.value.append(self.buf[:i])
            self.buf = self.buf[i:]
            return False
        if ends is False:
            self.value.append(self.buf[:i + 1])
            self.buf = self.buf[i + 1:]
            return True
        text = "".join(self.value) + self.buf[:i]
        self.buf, self.value, self.state = self.buf[i + len(PARAM_END):], [], INVOKE
        self._parameter(self.param, text, out)
        return True

    # ---- calls out ------------------------------------------------------------------------------
    def _begin_invoke(self, name: str | None, out: Parsed) -> None:
        self.state, self.sent = INVOKE, set()
        if name and (self.types is None or name in self.types):
            self.call = CallDelta(self.count, f"call_{uuid.uuid4().hex[:24]}", name, "")
            self.count += 1
            out.calls.append(self.call)

    def _parameter(self, name: str | None, text: str, out: Parsed) -> None:
        if self.call is None or not name or name in self.sent:
            return
        kinds = (self.types or {}).get(self.call.name, {}).get(name, frozenset())
        try:
            value = json.dumps(typed_value(text, kinds), ensure_ascii=False)
        except (ValueError, RecursionError):  # a value JSON cannot write back: kept as text
            value = json.dumps(text.strip("\n"), ensure_ascii=False)
        frag = ("{" if not self.sent else ", ") + json.dumps(name, ensure_ascii=False) + ": " + value
        self.sent.add(name)
        out.calls.append(CallDelta(self.call.index, arguments=frag))

    def _end_invoke(self, out: Parsed) -> None:
        if self.call is not None:
            out.calls.append(CallDelta(self.call.index, arguments="}" if self.sent else "{}"))
        self.call, self.sent = None, set()


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
