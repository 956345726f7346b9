"""Text in and out: tokenizer.json through `tokenizers`, the checkpoint's chat template through
jinja2, incremental detokenization for streaming, and the thinking block kept apart from the answer."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer

THINK_START, THINK_END = "<think>", "</think>"


class TextCodec:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder / 'tokenizer.json'}: not found (the export copies it from the checkpoint)")
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        self.eos_text = cfg["eos_token"]
        self.eos_id = self.tok.token_to_id(self.eos_text)
        self.think_start = self.tok.token_to_id(THINK_START)
        self.think_end = self.tok.token_to_id(THINK_END)
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(cfg["chat_template"])
        gen = folder / "generation_config.json"
        self.generation_defaults = json.loads(gen.read_text()) if gen.is_file() else {}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render(messages, True))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class Detokenizer:
    """Streams text as tokens arrive, holding back bytes that do not yet form whole characters."""

    def __init__(self, codec: TextCodec):
        self.codec, self.ids, self.prefix, self.read = codec, [], 0, 0

    def feed(self, token: int) -> str:
        self.ids.append(token)
        before = self.codec.decode(self.ids[self.prefix:self.read])
        text = self.codec.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """At the end of a sequence: whatever is held back, incomplete characters included."""
        before = self.codec.decode(self.ids[self.prefix:self.read])
        text = self.codec.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


@dataclass
class StreamSplitter:
    """Routes generated tokens to ("thinking", text) or ("answer", text). The generation prompt opens
    a thinking block, so output starts in it; </think> ends it and is not shown."""
    codec: TextCodec
    thinking: bool = True
    _detok: dict = field(default_factory=dict)

    def feed(self, token: int) -> tuple[str, str]:
        if token == self.codec.think_end:
            self.thinking = False
            return "answer", ""
        if token == self.codec.think_start:
            self.thinking = True
            return "thinking", ""
        channel = "thinking" if self.thinking else "answer"
        d = self._detok.setdefault(channel, Detokenizer(self.codec))
        return channel, d.feed(token)


class Conversation:
    """A multi-turn chat held as token ids, so the next turn's prompt starts with exactly the tokens
    already in the KV cache (prefix caching then prefills only the new turn)."""

    def __init__(self, codec: TextCodec, system: str | None = None):
        self.codec = codec
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.ids: list[int] = []

    def prompt(self, user: str) -> list[int]:
        msgs = self.messages + [{"role": "user", "content": user}]
        if not self.ids:
            return self.codec.encode_chat(msgs)
        full = self.codec.render(msgs, True)
        before = self.codec.render(self.messages, False)
        cut = before.rfind(self.codec.eos_text) + len(self.codec.eos_text)  # end of the last turn
        if cut < len(self.codec.eos_text) or not full.startswith(before[:cut]):
            return self.codec.encode_chat(msgs)  # template does not extend: tokenize it all again
        return self.ids + self.codec.encode(full[cut:])

    def commit(self, user: str, prompt_ids: list[int], output_ids: list[int]) -> None:
        out = list(output_ids)
        if not out or out[-1] != self.codec.eos_id:
            out.append(self.codec.eos_id)  # a turn cut short still ends as a turn
        self.ids = prompt_ids + out
        reply = self.codec.tok.decode(out[:-1], skip_special_tokens=False)
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
