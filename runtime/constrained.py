"""Constrained decoding: a request's answer held to a grammar (a JSON schema, any JSON object, or a
MiniMax tool-call block for `tool_choice` required / named), token by token.

The grammar library is xgrammar (chosen by measurement, docs/BENCHMARKS.md "Constrained decoding"),
imported only when the first constrained request arrives: a server that never sees one never needs it.
- `Grammars` (one per engine): the vocabulary as the library sees it, and a compiler whose cache is
  keyed by the grammar's text (an agent framework sends the same tools every turn). Compiling is done
  by the front end's thread, never the serving loop's (`compile` is thread-safe).
- `Constraint` (one per request): the matcher, and where the constraint starts. After a prompt that
  opens a thinking block the reasoning is free; the grammar starts after the `</think>` token. An
  answer that ends inside its thinking (max_tokens) has no constrained part at all.
- `check_schema`: a schema the grammar cannot hold to (a keyword it would ignore) is refused, so every
  answer that finishes validates against the schema it was given.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass

import torch

from .text import TOOL_CALL_END, TOOL_CALL_START

# The JSON-schema keywords the compiled grammar enforces (checked against jsonschema in
# tests/test_constrained.py), and those that only annotate. Anything else is refused: a keyword the
# grammar ignored would let an answer through that does not validate.
ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "enum", "const",
            "anyOf", "$ref", "$defs", "definitions", "minItems", "maxItems", "minLength", "maxLength", "pattern",
            "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "format"}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "strict"}
FORMATS = {"date", "time", "date-time", "uuid", "ipv4", "ipv6", "email"}
# What the model writes between `</think>` and its tool-call block (the published template's "\n\n").
TOOL_BLOCK_LEAD = r"[ \n]{0,4}"
# At most one whitespace character in a row inside a parameter's JSON value (objects, arrays): a free
# run of whitespace is where constrained models loop. (The library takes no 0.)
JSON_WHITESPACE = 1
# The library's optional whitespace rule (`name ::= ("" | ([ \n\r\t]))`) in its printed grammar, and
# the XML rules (those that write a `<parameter name="` tag): see `documented_layout`.
_WS_RULE = re.compile(r'^(\w+) ::= \(""\s*\|\s*\(\[ \\n\\r\\t\]\)\)$', re.M)
_XML_RULE = re.compile(r'^.*"<parameter name=\\".*$', re.M)


class SchemaError(ValueError):
    """A schema (or a keyword in it) the grammar cannot enforce; `where` is its JSON path."""


def check_schema(schema, where: str = "schema") -> None:
    """SchemaError naming the first keyword or value the grammar cannot enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise SchemaError(f"{where} must be a JSON-schema object, got {type(schema).__name__}")
    for key, value in schema.items():
        at = f"{where}.{key}"
        if key in ANNOTATIONS:
            continue
        if key not in ENFORCED:
            hint = " (use anyOf)" if key == "oneOf" else ""
            raise SchemaError(f"{at}: the keyword {key!r} is not supported in constrained decoding{hint}")
        if key == "format" and value not in FORMATS:
            raise SchemaError(f"{at}: format {value!r} is not supported (supported: {', '.join(sorted(FORMATS))})")
        if key in ("properties", "$defs", "definitions"):
            if not isinstance(value, dict):
                raise SchemaError(f"{at} must map names to schemas")
            for name, sub in value.items():
                check_schema(sub, f"{at}.{name}")
        elif key in ("items", "additionalProperties") and isinstance(value, (dict, bool)):
            check_schema(value, at)
        elif key in ("anyOf", "prefixItems"):
            if not isinstance(value, list) or not value:
                raise SchemaError(f"{at} must be a non-empty list of schemas")
            for i, sub in enumerate(value):
                check_schema(sub, f"{at}[{i}]")


def validate_schema(schema, where: str = "schema") -> None:
    """The schema is valid JSON Schema (jsonschema's meta-schema) and enforceable (check_schema)."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.path)
        raise SchemaError(f"{where}{path}: not a valid JSON schema: {e.message}") from None
    check_schema(schema, where)


@dataclass(frozen=True)
class Spec:
    """What a request's answer is held to: kind "json" (schema None: any JSON object) or "tools"
    (tools: OpenAI function tools, the allowed ones; one_call: parallel_tool_calls false)."""
    kind: str
    schema: dict | None = None
    tools: tuple = ()
    one_call: bool = False

    def key(self) -> str:
        return json.dumps([self.kind, self.schema, list(self.tools), self.one_call], sort_keys=True)


def tool_call_tag(tools, one_call: bool, begin: int | None = None, end: int | None = None) -> dict:
    """The structural tag of one MiniMax tool-call block (docs/DESIGN.md "Tool calls"): invokes of
    the given tools (exactly one with one_call), each parameter's value as the schema's type in the
    published XML form (strings as text, the rest as JSON). begin / end: the block tags' token ids,
    where the tokenizer has them as single tokens (the model writes them so; their spelling
    character by character is then not allowed)."""
    edge = lambda tok, text: {"type": "token", "token": tok} if tok is not None \
        else {"type": "const_string", "value": text}  # noqa: E731
    tags = [{"type": "tag", "begin": f'<invoke name="{t["function"]["name"]}">\n',
             "content": {"type": "json_schema", "style": "minimax_xml", "max_whitespace_cnt": JSON_WHITESPACE,
                         "json_schema": t["function"].get("parameters") or {"type": "object"}},
             "end": "</invoke>\n"} for t in tools]
    return {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "regex", "pattern": TOOL_BLOCK_LEAD},
        edge(begin, TOOL_CALL_START), {"type": "const_string", "value": "\n"},
        {"type": "tags_with_separator", "tags": tags, "separator": "", "at_least_one": True,
         "stop_after_first": one_call},
        edge(end, TOOL_CALL_END)]}}


def documented_layout(ebnf: str) -> str:
    """The library's printed grammar of a tool-call block, its XML held to the documented layout
    (docs/reference: one `<parameter name="K">VALUE</parameter>` per line, nothing else): the library
    lets one whitespace character sit before, after and around each value, which is not the model's
    format, and which tool_calls.py keeps in a string value (an enum's " open" is not "open"; the
    published parser strips it, ours keeps spaces as text). So in the XML rules every optional
    whitespace is dropped and each `</parameter>` is followed by its newline. JSON values keep
    theirs (json.loads takes it). tests/test_constrained.py checks the result token by token."""
    ws = set(_WS_RULE.findall(ebnf))
    if not ws:
        return ebnf
    ref = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(ws))) + r")\b")

    def xml(m: re.Match) -> str:
        head, eq, body = m.group(0).partition(" ::= ")
        # a reference becomes the empty string (valid wherever a rule name was)
        return head + eq + ref.sub('""', body).replace('"</parameter>"', '"</parameter>\\n"')
    return _XML_RULE.sub(xml, ebnf)


class Grammars:
    """The compiler for one engine's vocabulary (built on first use: the vocabulary's table takes
    ~0.2 s at 200K tokens). Token ids past the tokenizer's (the LM head's padding rows) and special
    tokens other than the tool-call tags are never allowed; the end-of-turn tokens end the grammar."""

    def __init__(self, codec, vocab_size: int, eos_ids: list[int]):
        self.codec, self.vocab_size, self.eos_ids = codec, vocab_size, list(eos_ids)
        self._compiler = None
        self._keep: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def compiler(self):
        """The library's compiler of this vocabulary (its table built on the first call)."""
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                vocab = self.codec.grammar_vocab()
                info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                         stop_token_ids=self.eos_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)
            return self._compiler

    def compile(self, spec: Spec):
        """The compiled grammar (cached by the library); SchemaError for one it cannot compile."""
        c = self.compiler()
        try:
            if spec.kind == "json" and spec.schema is None:
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if spec.kind == "json":
                # Compact JSON (", " and ": "): a free run of whitespace is where constrained models loop.
                return c.compile_json_schema(json.dumps(spec.schema), any_whitespace=False, strict_mode=True)
            if spec.kind == "tools":
                import xgrammar as xgr

                ids = {t: i for i, t in self.codec.literal.items()}
                tag = tool_call_tag(spec.tools, spec.one_call, ids.get(TOOL_CALL_START), ids.get(TOOL_CALL_END))
                return c.compile_grammar(documented_layout(str(xgr.Grammar.from_structural_tag(json.dumps(tag)))))
        except (RuntimeError, ValueError) as e:
            raise SchemaError(f"the grammar could not be compiled: {str(e).strip().splitlines()[-1]}") from None
        raise ValueError(f"unknown constraint kind {spec.kind!r}")

    def constraint(self, spec: Spec, in_thinking: bool) -> "Constraint":
        return self.constraint_for(self.compile(spec), in_thinking, spec.kind)

    def constraint_for(self, compiled, in_thinking: bool, kind: str = "json") -> "Constraint":
        """A matcher of a compiled grammar, starting after `</think>` when the prompt opened a thinking block."""
        return Constraint(compiled, self.codec.think_end if in_thinking else None, self.vocab_size, self.keep(kind))

    def keep(self, kind: str) -> torch.Tensor:
        """[ceil(V / 32)] int32: the tokens a grammar of this kind may ever use. The library's JSON strings
        take raw control characters, which JSON forbids (json.loads and pydantic refuse them): tokens
        holding a byte below 0x20 are never allowed in JSON (compact: it needs no whitespace), and only
        the newline in a tool-call block (between its tags; string values are text)."""
        with self._lock:
            if kind not in self._keep:
                ok = b"\n" if kind == "tools" else b""
                words = [0xFFFFFFFF] * ((self.vocab_size + 31) // 32)
                for i, raw in enumerate(self.codec.grammar_vocab()):
                    if any(b < 0x20 and bytes([b]) not in ok for b in raw):
                        words[i // 32] &= ~(1 << (i % 32))
                # as int32 words (two's complement), the library's bitmask type
                self._keep[kind] = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)
            return self._keep[kind]


class Constraint:
    """One request's matcher. `wait_for`: the token id after which the grammar starts (the end of
    the thinking block), None to start at once."""

    def __init__(self, compiled, wait_for: int | None, vocab_size: int, keep: torch.Tensor | None = None):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.wait_for, self.vocab_size, self.keep = wait_for, vocab_size, keep

    @property
    def active(self) -> bool:
        """Whether the next token is constrained."""
        return self.wait_for is None and not self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.keep is not None:
            bitmask[row] &= self.keep

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False if the grammar does not allow it (a bug: the mask did)."""
        if self.wait_for is not None:
            if token == self.wait_for:
                self.wait_for = None
            return True
        return self.matcher.is_terminated() or self.matcher.accept_token(token)


def bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(V / 32)] int32, every token allowed: bit j of word w allows token 32 w + j."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)
