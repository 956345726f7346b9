"""Logprobs in the OpenAI shapes, from the engine's per-token values (raw model distribution,
float32 log-softmax over the whole vocabulary: runtime/vocab_parallel.py). Every generated token is
reported, thinking included (the same tokens `usage.completion_tokens` counts)."""
from __future__ import annotations

from .loop import Event


def _token(codec, token: int) -> tuple[str, list[int]]:
    raw = codec.token_bytes(token)
    return raw.decode("utf-8", errors="replace"), list(raw)


class ChatLogprobs:
    """choices[].logprobs.content entries: token, logprob, bytes, top_logprobs."""

    def __init__(self, codec):
        self.codec = codec

    def entry(self, ev: Event) -> list[dict]:
        if ev.logprob is None:
            return []
        text, raw = _token(self.codec, ev.token)
        top = []
        for t, lp in ev.top_logprobs or []:
            tt, tb = _token(self.codec, t)
            top.append({"token": tt, "logprob": lp, "bytes": tb})
        return [{"token": text, "logprob": ev.logprob, "bytes": raw, "top_logprobs": top}]


class CompletionLogprobs:
    """The completions route's legacy form: tokens, token_logprobs, top_logprobs (token -> logprob),
    text_offset (each token's offset in the generated text)."""

    def __init__(self, codec):
        self.codec, self.offset = codec, 0
        self.all = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def chunk(self, ev: Event) -> dict | None:
        if ev.logprob is None:
            return None
        text, _ = _token(self.codec, ev.token)
        top = {}
        for t, lp in ev.top_logprobs or []:
            top.setdefault(_token(self.codec, t)[0], lp)  # two ids of one text: the likelier (listed first)
        out = {"tokens": [text], "token_logprobs": [ev.logprob], "top_logprobs": [top], "text_offset": [self.offset]}
        self.offset += len(text)
        return out

    def add(self, ev: Event) -> None:
        c = self.chunk(ev)
        if c:
            for k in self.all:
                self.all[k] += c[k]

    def whole(self) -> dict:
        return self.all
