"""What an OpenAI request's answer is held to (runtime/constrained.py's Spec), from its
`response_format`, `tool_choice` and `parallel_tool_calls`, every schema checked first (a 400 naming
the field, never a grammar that would ignore part of a schema)."""
from __future__ import annotations

from ..constrained import SchemaError, Spec, validate_schema
from .openai_protocol import NamedToolChoice, OpenAIError


def chat_spec(response_format, tools: list[dict] | None, tool_choice, parallel_tool_calls: bool | None
              ) -> Spec | None:
    """None (free text), a tool-call block (tool_choice 'required': any declared tool; a named
    function: that one; parallel_tool_calls false: exactly one call) or JSON (response_format)."""
    if tool_choice == "required" or isinstance(tool_choice, NamedToolChoice):
        name = tool_choice.function.name if isinstance(tool_choice, NamedToolChoice) else None
        return tools_spec(tools, name, parallel_tool_calls is False)
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Spec("json")
    return json_spec(response_format.json_schema.schema_, "response_format.json_schema.schema")


def tools_spec(tools: list[dict] | None, name: str | None, one_call: bool,
               where=lambda i: f"tools[{i}].function.parameters") -> Spec:
    """A tool-call block of the OpenAI-form `tools` (name: only that one, and exactly one call, as
    OpenAI answers a named function); where(i): the request path of tool i's schema, for a 400."""
    chosen = [(i, t) for i, t in enumerate(tools or []) if name is None or t["function"]["name"] == name]
    for i, t in chosen:
        _check(t["function"].get("parameters") or {"type": "object"}, where(i))
    return Spec("tools", tools=tuple(t for _, t in chosen), one_call=one_call or name is not None)


def json_spec(schema, where: str) -> Spec:
    _check(schema, where)
    return Spec("json", schema=schema)


def spec_param(spec: Spec) -> str:
    """The request field a spec came from (for a compile error's 400)."""
    return "tools" if spec.kind == "tools" else "response_format"


def _check(schema, where: str) -> None:
    try:
        validate_schema(schema, where)
    except SchemaError as e:
        raise OpenAIError(str(e), where) from None
