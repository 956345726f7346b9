"""Tool-call parameter values typed by the request's JSON schemas, as the serving engines that
serve MiniMax-M2 do it.

The model writes every value as text. A parameter is converted only by the types its tool's schema
gives it (`type`, a string or a list; the JSON types of `enum` values; `anyOf` / `oneOf` / `allOf`,
recursively). A parameter that is not in the schema, a tool without a schema, or a request without
tools: the value stays a string. With several types they are tried in the order integer, number,
boolean, object, array, string; the first that converts wins, and a value that converts to none of
them stays a string. The conversions:
- integer: an optional sign and digits;
- number: a JSON-style number (`5`, `-2.5`, `1e3`); a whole value becomes an integer (`5.0` -> 5);
  infinite or not-a-number never converts;
- boolean: true/1/yes/on and false/0/no/off, any case;
- object / array: strict JSON (no NaN or Infinity) of that kind;
- null: the word `null` (any case) when the types include null (`"type": ["string", "null"]`,
  `anyOf` with `{"type": "null"}`, or an enum holding null).
Leading and trailing newlines around a value are dropped (the model often puts the value on its own
lines); spaces are kept for strings and ignored for the other conversions.
"""
from __future__ import annotations

import json
import math
import re

_INT = re.compile(r"[-+]?\d+")
_NUM = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
# The spellings the serving engines accept for the JSON-schema type names.
_ALIAS = {"int": "integer", "float": "number", "bool": "boolean", "str": "string", "text": "string"}
_ORDER = ("integer", "number", "boolean", "object", "array", "string")
_NO = object()  # "does not convert"


def schema_types(schema) -> frozenset[str]:
    """The JSON types one property's schema allows (empty: no usable type)."""
    if not isinstance(schema, dict):
        return frozenset()
    out = set()
    t = schema.get("type")
    for name in [t] if isinstance(t, str) else (t if isinstance(t, list) else []):
        if isinstance(name, str):
            out.add(_ALIAS.get(name.lower(), name.lower()))
    if isinstance(schema.get("enum"), list):
        out.update(_json_type(v) for v in schema["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list):
            for sub in schema[key]:
                out |= schema_types(sub)
    return frozenset(out)


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    return "array" if isinstance(v, list) else "object" if isinstance(v, dict) else "string"


def tool_types(tools: list | None) -> dict[str, dict[str, frozenset[str]]] | None:
    """tool name -> parameter name -> allowed types, from OpenAI `tools` (`function.parameters`) or
    Anthropic ones (`input_schema`). None stays None: no tool list was given at all."""
    if tools is None:
        return None
    out = {}
    for t in tools:
        if not isinstance(t, dict):
            continue
        f = t.get("function", t) if isinstance(t.get("function", t), dict) else {}
        name = f.get("name")
        if not isinstance(name, str):
            continue
        schema = f.get("parameters", f.get("input_schema"))
        props = schema.get("properties") if isinstance(schema, dict) else None
        out[name] = {k: schema_types(v) for k, v in props.items()} if isinstance(props, dict) else {}
    return out


def typed_value(text: str, types: frozenset[str]):
    """A parameter's text as the first of its schema types it converts to; otherwise the text."""
    text = text.strip("\n")
    if not types:
        return text
    s = text.strip()
    if "null" in types and s.lower() == "null":
        return None
    for kind in _ORDER:
        if kind in types:
            if kind == "string":
                return text
            v = _CONVERT[kind](s)
            if v is not _NO:
                return v
    return text


def _integer(s: str):
    try:
        return int(s) if _INT.fullmatch(s) else _NO
    except ValueError:  # more digits than Python converts
        return _NO


def _number(s: str):
    if not _NUM.fullmatch(s):
        return _NO
    v = float(s)
    if not math.isfinite(v):
        return _NO
    return int(v) if v.is_integer() else v


def _boolean(s: str):
    low = s.lower()
    return True if low in _TRUE else False if low in _FALSE else _NO


def _reject(_):
    raise ValueError("not JSON")


def _finite(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError("not a finite number")
    return v


def _json_of(kind: type):
    def convert(s: str):
        try:
            v = json.loads(s, parse_constant=_reject, parse_float=_finite)
        except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError
            return _NO
        return v if isinstance(v, kind) else _NO
    return convert


_CONVERT = {"integer": _integer, "number": _number, "boolean": _boolean,
            "object": _json_of(dict), "array": _json_of(list)}
