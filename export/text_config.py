"""What a checkpoint's text files say: the special token ids, the sampling defaults, the chat template.

The published MiniMax-M2.5 config.json has no bos/eos keys at all; the ids live in
generation_config.json (bos 200019 `]~b]`, eos 200020 `[e~[`) and, as token strings, in
tokenizer_config.json. The chat template is a file of its own, chat_template.jinja. So each value is
looked up in the order below, and a missing one is never a reason to refuse the model:

- special ids: generation_config.json, then tokenizer_config.json's tokens (through tokenizer.json),
  then config.json;
- sampling defaults: generation_config.json (temperature, top_p, top_k, do_sample);
- chat template: tokenizer_config.json's `chat_template` key, else chat_template.jinja.

The same folder layout is read in a checkpoint and in an export (which copies these files).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Everything the runtime needs besides the graphs; the export copies those present.
TEXT_FILES = (TOKENIZER, TOKENIZER_CONFIG, GENERATION_CONFIG, CHAT_TEMPLATE_FILE, "config.json")


class TextConfigError(ValueError):
    """A text file is unreadable or names an impossible token id."""


@dataclass(frozen=True)
class SpecialIds:
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # empty: no end-of-sequence stop
    eos_source: str                 # which file the eos came from ("" when none did)


def read_json(path: Path) -> dict | None:
    """A JSON object file, or None when the file is absent."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TextConfigError(f"{path}: cannot be parsed as JSON ({e})") from e
    if not isinstance(data, dict):
        raise TextConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _ids(value, path: Path, key: str, vocab_size: int) -> tuple[int, ...]:
    """An id or a list of ids, each checked against the vocabulary."""
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab_size:
            raise TextConfigError(f"{path}: {key} {value!r} is not a token id below vocab_size ({vocab_size})")
    return tuple(values)


def _token_text(entry) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) and entry else None


def _token_ids_by_text(folder: Path) -> dict[str, int]:
    """Token text -> id for tokenizer.json's added tokens (where the special tokens live)."""
    tok = read_json(folder / TOKENIZER)
    if tok is None:
        return {}
    return {t["content"]: t["id"] for t in tok.get("added_tokens", []) if "content" in t and "id" in t}


def special_ids(folder: str | Path, vocab_size: int) -> SpecialIds:
    """bos and eos in the order generation_config.json, tokenizer_config.json, config.json."""
    folder = Path(folder)
    bos: int | None = None
    eos: tuple[int, ...] = ()
    eos_source = ""
    gen_path = folder / GENERATION_CONFIG
    gen = read_json(gen_path) or {}
    if gen.get("eos_token_id") is not None:
        eos, eos_source = _ids(gen["eos_token_id"], gen_path, "eos_token_id", vocab_size), GENERATION_CONFIG
    if gen.get("bos_token_id") is not None:
        bos = _ids(gen["bos_token_id"], gen_path, "bos_token_id", vocab_size)[0]
    tc_path = folder / TOKENIZER_CONFIG
    tc = read_json(tc_path) or {}
    if (not eos or bos is None) and tc:
        by_text = _token_ids_by_text(folder)
        eos_text, bos_text = _token_text(tc.get("eos_token")), _token_text(tc.get("bos_token"))
        if not eos and eos_text in by_text:
            eos = _ids(by_text[eos_text], tc_path, f"eos_token {eos_text!r}", vocab_size)
            eos_source = f"{TOKENIZER_CONFIG} ({eos_text!r})"
        if bos is None and bos_text in by_text:
            bos = _ids(by_text[bos_text], tc_path, f"bos_token {bos_text!r}", vocab_size)[0]
    cfg_path = folder / "config.json"
    cfg = read_json(cfg_path) or {}
    if not eos and cfg.get("eos_token_id") is not None:
        eos, eos_source = _ids(cfg["eos_token_id"], cfg_path, "eos_token_id", vocab_size), "config.json"
    if bos is None and cfg.get("bos_token_id") is not None:
        bos = _ids(cfg["bos_token_id"], cfg_path, "bos_token_id", vocab_size)[0]
    return SpecialIds(bos, eos, eos_source)


@dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json's sampling settings; None where it has none."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    do_sample: bool | None = None

    @classmethod
    def read(cls, folder: str | Path) -> "GenerationDefaults":
        gen = read_json(Path(folder) / GENERATION_CONFIG) or {}
        return cls(temperature=gen.get("temperature"), top_p=gen.get("top_p"), top_k=gen.get("top_k"),
                   do_sample=gen.get("do_sample"))


def chat_template(folder: str | Path) -> str | None:
    """tokenizer_config.json's template (a string, or the "default" of a named list), else
    chat_template.jinja, else None."""
    return chat_template_file(folder)[0]


def chat_template_file(folder: str | Path) -> tuple[str | None, Path | None]:
    """chat_template's text and the file it came from (for errors that point at it)."""
    folder = Path(folder)
    tc = read_json(folder / TOKENIZER_CONFIG) or {}
    t = tc.get("chat_template")
    if isinstance(t, list):  # [{"name": ..., "template": ...}, ...]
        named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    if isinstance(t, str) and t:
        return t, folder / TOKENIZER_CONFIG
    path = folder / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text(), path
    return None, None
