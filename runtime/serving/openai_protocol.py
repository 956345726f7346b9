"""The OpenAI API's request bodies (pydantic), as far as this server implements them, and its error
shape. The models say each field's JSON type and range, so /openapi.json documents what the server
accepts; runtime/validation.py then checks what a schema cannot say (the context, the vocabulary).

A field that would change the result and is not implemented (n > 1, penalties, echo, ...) is
refused with a 400, never ignored; fields that change nothing here
(user, metadata, store, stream_options' include_usage, ...) are accepted."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

from ..sampling import MAX_LOGPROBS
from ..validation import MAX_STOP_CHARS, MAX_STOP_IDS, MAX_STOP_STRINGS, MAX_TOOLS, SEED_RANGE

# Accepted and without effect on the tokens.
HARMLESS = {"user", "metadata", "store", "stream_options", "service_tier"}
# Not implemented; accepted only at the value that means "off".
OFF_VALUES = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0), "repetition_penalty": (None, 1),
              "logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None, ""), "min_tokens": (None, 0),
              "prompt_logprobs": (None, 0)}


class OpenAIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server answers, as OpenAI shapes it."""
    error: ErrorDetail


Finite = dict(allow_inf_nan=False)
Stop = Union[Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)],
             Annotated[list[Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP_STRINGS)],
             None]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None  # checked against the served name by the server (404 otherwise)
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0, **Finite)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0, le=1, **Finite)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None          # vLLM's extension; -1 or 0: off
    seed: Annotated[StrictInt, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    stop: Stop = None
    stream: StrictBool = False
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1
    ignore_eos: StrictBool = False                                          # vLLM's extension
    stop_token_ids: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=MAX_STOP_IDS)] | None = None

    def check(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in HARMLESS:
                continue
            if name in OFF_VALUES and any(value == v and type(value) is type(v) or value is v
                                          for v in OFF_VALUES[name]):
                continue
            raise OpenAIError(f"{name} is not supported by this server", name)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def text_parts_only(v: Any, what: str = "content parts of type {!r} are not supported") -> Any:
    """A content list (OpenAI parts, Anthropic blocks) of text only: this model takes nothing else."""
    if isinstance(v, list):
        for p in v:
            kind = p.get("type") if isinstance(p, dict) else None
            if kind != "text":
                raise ValueError(what.format(kind) + ": this model takes text only")
    return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any):
        return text_parts_only(v)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")] = "response"
    description: str | None = None
    # "schema" shadows a pydantic BaseModel attribute: held under another name, read by its alias
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON matching a schema
    (runtime/constrained.py enforces it token by token)."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


TopLogprobs = Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)]


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: StrictBool | None = None  # false: at most (with tool_choice required/named: exactly) one
    response_format: ResponseFormat | None = None
    logprobs: StrictBool | None = None
    top_logprobs: TopLogprobs | None = None
    thinking: StrictBool = True                  # false: the prompt closes the thinking block

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise OpenAIError("top_logprobs needs logprobs: true", "top_logprobs")
        forced = self.tool_choice not in (None, "none", "auto")
        if forced and not self.tools:
            raise OpenAIError("tool_choice 'required' or a named function needs tools", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and \
                self.tool_choice.function.name not in {t.function.name for t in self.tools}:
            raise OpenAIError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools",
                              "tool_choice")
        rf = self.response_format
        if forced and rf is not None and rf.type != "text":
            raise OpenAIError("response_format and a forced tool_choice cannot both hold the answer", "response_format")
        if rf is not None and rf.type == "json_schema" and (rf.json_schema is None or rf.json_schema.schema_ is None):
            raise OpenAIError("response_format json_schema needs json_schema.schema", "response_format.json_schema")

    def message_dicts(self) -> list[dict]:
        return [m.model_dump(exclude_none=True) for m in self.messages]

    def tool_dicts(self) -> list[dict] | None:
        return None if self.tools is None else [t.model_dump(exclude_none=True) for t in self.tools]


TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    # One prompt: a string, or token ids; a batch of one is taken as that one.
    prompt: Union[Annotated[str, Field(min_length=1)], TokenIds,
                  Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)],
                  Annotated[list[TokenIds], Field(min_length=1, max_length=1)]]
    return_token_ids: StrictBool = False         # vLLM's extension: token_ids in each choice
    logprobs: TopLogprobs | None = None          # the legacy form: how many alternatives per token
    echo: StrictBool = False
    response_format: ResponseFormat | None = None  # vLLM's extension on completions

    def check(self) -> None:
        super().check()
        if self.echo:
            raise OpenAIError("echo is not supported: the LM head runs only where a token is sampled, so prompt "
                              "logprobs are not computed", "echo")
        if self.response_format is not None and self.response_format.type == "json_schema" and (
                self.response_format.json_schema is None or self.response_format.json_schema.schema_ is None):
            raise OpenAIError("response_format json_schema needs json_schema.schema", "response_format.json_schema")
        p = self.prompt
        if isinstance(p, list) and isinstance(p[0], (str, list)):
            self.prompt = p[0]
