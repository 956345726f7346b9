"""Text in and out: tokenizer.json through `tokenizers`, the checkpoint's chat template through
jinja2, incremental detokenization for streaming, and the thinking block kept apart from the answer."""
from __future__ import annotations

import json
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer

from export.text_config import TOKENIZER, TOKENIZER_CONFIG, chat_template_file, read_json

THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<minimax:tool_call>", "</minimax:tool_call>"


class TextCodec:
    """tokenizer.json and the chat template of an export (or checkpoint) folder. A folder without
    tokenizer.json has no codec: ids in, ids out (`TextCodec.load` returns None)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / TOKENIZER).is_file():
            raise FileNotFoundError(f"{folder / TOKENIZER}: not found (the export copies it from the checkpoint)")
        try:
            self.tok = Tokenizer.from_file(str(folder / TOKENIZER))
        except Exception as e:  # tokenizers raises a bare Exception with serde's message
            raise ValueError(f"{folder / TOKENIZER}: not a tokenizer the `tokenizers` library can read ({e})") from e
        tc = read_json(folder / TOKENIZER_CONFIG) or {}
        eos = tc.get("eos_token")
        self.eos_text = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_id = self.tok.token_to_id(self.eos_text) if self.eos_text else None
        self.think_start = self.tok.token_to_id(THINK_START)
        self.think_end = self.tok.token_to_id(THINK_END)
        # Shown as their text whether or not the tokenizer marks them special (the tool-call parser reads them).
        self.literal = {i: t for t in (TOOL_CALL_START, TOOL_CALL_END) if (i := self.tok.token_to_id(t)) is not None}
        self._special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special} - set(self.literal)
        decoder = json.loads(self.tok.to_str()).get("decoder") or {}
        kinds = [d.get("type") for d in decoder.get("decoders", [decoder])]
        self.byte_level = "ByteLevel" in kinds
        self._byte_of = None  # the byte-level alphabet's inverse, built on first use
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                         extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # As transformers renders chat templates: no HTML escaping, keys in the given order.
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = tojson
        source, where = chat_template_file(folder)
        try:
            self.template = env.from_string(source) if source else None
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"the chat template in {where} does not parse: {e.message} (line {e.lineno})") from e

    @classmethod
    def load(cls, folder: str | Path) -> "TextCodec | None":
        return cls(folder) if (Path(folder) / TOKENIZER).is_file() else None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def render(self, messages: list[dict], add_generation_prompt: bool = True, thinking: bool = True,
               **extra) -> str:
        """The chat template's text. thinking=False closes the thinking block the published generation
        prompt opens (`<think>\n` + `</think>\n\n`), so the answer starts at once."""
        if self.template is None:
            raise ValueError("this model has no chat template (neither tokenizer_config.json's chat_template "
                             "nor chat_template.jinja): send token ids or raw text")
        text = self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
        if add_generation_prompt and not thinking and text.rfind(THINK_START) > text.rfind(THINK_END):
            text += THINK_END + "\n\n"
        return text

    def encode_chat(self, messages: list[dict], thinking: bool = True, **extra) -> list[int]:
        return self.encode(self.render(messages, True, thinking, **extra))

    def in_thinking(self, prompt: list[int]) -> bool:
        """Whether output after this prompt starts inside a thinking block: the prompt's last <think>
        comes after its last </think> (the published generation prompt ends with `<think>\n`)."""
        if self.think_start is None:
            return False
        last = lambda t: max((i for i, x in enumerate(prompt) if x == t), default=-1)  # noqa: E731
        return last(self.think_start) > last(self.think_end)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token: int) -> bytes:
        """One token's bytes as the output shows them (logprobs' `bytes`; the grammar's vocabulary):
        a regular token's byte-level BPE string mapped back to bytes, a tool-call tag its text, any
        other special token nothing (the output never shows one)."""
        if self._byte_of is None:
            self._byte_of = _byte_level_decoder()
        if token in self.literal:
            return self.literal[token].encode()
        if token in self._special:
            return b""
        piece = self.tok.id_to_token(token)
        if piece is None:
            return b""
        return bytes(self._byte_of[c] for c in piece)

    def grammar_vocab(self) -> list[bytes]:
        """Every token's bytes (token_bytes), for the grammar library; byte-level BPE only (the published
        tokenizer's kind)."""
        if not self.byte_level:
            raise ValueError("constrained decoding needs a byte-level BPE tokenizer (tokenizer.json's decoder "
                             "is not ByteLevel)")
        return [self.token_bytes(i) for i in range(self.tok.get_vocab_size())]


def _byte_level_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (each byte as one printable character, GPT-2's table) inverted."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


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


class Conversation:
    """A multi-turn chat held as token ids, so the next turn's prompt starts with exactly the tokens
    already in the KV cache (prefix caching then prefills only the new turn)."""

    def __init__(self, codec: TextCodec, system: str | None = None, thinking: bool = True):
        self.codec, self.thinking = codec, thinking
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.ids: list[int] = []

    def prompt(self, user: str) -> list[int]:
        msgs = self.messages + [{"role": "user", "content": user}]
        eos = self.codec.eos_text
        if not self.ids or not eos:
            return self.codec.encode_chat(msgs, self.thinking)
        full = self.codec.render(msgs, True, self.thinking)
        before = self.codec.render(self.messages, False)
        cut = before.rfind(eos) + len(eos)  # end of the last turn
        if cut < len(eos) or not full.startswith(before[:cut]):
            return self.codec.encode_chat(msgs, self.thinking)  # template does not extend: tokenize it all again
        return self.ids + self.codec.encode(full[cut:])

    def commit(self, user: str, prompt_ids: list[int], output_ids: list[int]) -> None:
        out = list(output_ids)
        eos = self.codec.eos_id
        if eos is not None and (not out or out[-1] != eos):
            out.append(eos)  # a turn cut short still ends as a turn
        self.ids = prompt_ids + out
        reply = self.codec.tok.decode(out[:-1] if eos is not None else out, skip_special_tokens=False)
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
