"""The OpenAI API's request bodies (pydantic), as far as this server implements them, and its error
shape. A field that would change the result and is not implemented (n > 1, logprobs, penalties,
response_format, ...) is refused with a 400, never ignored; fields that change nothing here
(user, metadata, store, stream_options' include_usage, ...) are accepted."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# Accepted and without effect on the tokens.
HARMLESS = {"user", "metadata", "store", "stream_options", "service_tier", "parallel_tool_calls", "model"}


class OpenAIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None               # vLLM's extension
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    n: int = 1
    ignore_eos: bool = False               # vLLM's extension
    stop_token_ids: list[int] | None = None

    def check(self) -> None:
        if self.n != 1:
            raise OpenAIError("n > 1 is not supported: send the request n times", "n")
        for name, value in (self.model_extra or {}).items():
            if name in HARMLESS:
                continue
            if value in (None, False, 0, [], {}) and name in ("logprobs", "presence_penalty", "frequency_penalty",
                                                               "logit_bias", "top_logprobs", "echo", "best_of"):
                continue  # the default: no effect
            raise OpenAIError(f"{name} is not supported by this server", name)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(default_factory=list)
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto"], dict, str, None] = None
    thinking: bool = True                  # false: the prompt closes the thinking block

    def check(self) -> None:
        super().check()
        if not self.messages:
            raise OpenAIError("messages must hold at least one message", "messages")
        if self.tool_choice not in (None, "none", "auto"):
            raise OpenAIError("tool_choice other than 'auto' or 'none' is not supported", "tool_choice")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    return_token_ids: bool = False         # vLLM's extension: token_ids in each choice

    def check(self) -> None:
        super().check()
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise OpenAIError("a batch of prompts is not supported: send one prompt per request", "prompt")
            self.prompt = p[0]
        if not self.prompt:
            raise OpenAIError("the prompt is empty", "prompt")
