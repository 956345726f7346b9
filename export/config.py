"""The model's shape, read from a checkpoint's config.json and checked before any weight is read."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .text_config import TextConfigError, special_ids


class ConfigError(ValueError):
    """config.json is missing, unreadable, or describes a model this project cannot serve."""


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    intermediate_size: int  # per expert
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rotary_dim: int
    max_position_embeddings: int
    fp8_block: tuple[int, int]  # (rows, cols) of one weight_scale_inv block
    num_mtp_modules: int = 0
    # From the checkpoint's folder (export/text_config.py), not from config.json alone: the
    # published config.json has no bos/eos. No eos ids: generation has no end-of-sequence stop.
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fp8_block"] = list(self.fp8_block)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["fp8_block"] = tuple(d["fp8_block"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path) -> "ModelConfig":
        path = Path(ckpt_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found; is {ckpt_dir} a MiniMax-M2 checkpoint directory?")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot be parsed as JSON ({e})") from e
        cfg = parse_hf_config(raw, source=str(path))
        try:
            ids = special_ids(path.parent, cfg.vocab_size)
        except TextConfigError as e:
            raise ConfigError(str(e)) from e
        return replace(cfg, bos_token_id=ids.bos_token_id, eos_token_ids=ids.eos_token_ids)


_told_no_eos = False


def note_missing_eos(cfg: ModelConfig) -> None:
    """Say once per process that generation will not stop at an end-of-sequence token."""
    global _told_no_eos
    if not cfg.eos_token_ids and not _told_no_eos:
        _told_no_eos = True
        print("note: no end-of-sequence token in generation_config.json, tokenizer_config.json or config.json; "
              "generation stops only at max tokens, stop strings or stop token ids", file=sys.stderr)


def _require(raw: dict, key: str, source: str):
    if key not in raw:
        raise ConfigError(f"{source}: required field '{key}' is missing")
    return raw[key]


def _positive_int(raw: dict, key: str, source: str) -> int:
    v = _require(raw, key, source)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{source}: '{key}' must be a positive integer, got {v!r}")
    return v


def parse_hf_config(raw: dict, source: str = "config.json") -> ModelConfig:
    """Validate a HuggingFace MiniMax-M2 config.json and return the fields the project uses.

    Every check here is one that, if it failed silently, would produce wrong numbers later. The
    special token ids are not taken from here: `ModelConfig.from_checkpoint` reads them from the
    folder's files in their published order (export/text_config.py).
    """
    model_type = raw.get("model_type")
    if model_type != "minimax_m2":
        raise ConfigError(
            f"{source}: model_type is {model_type!r}; this project serves only 'minimax_m2' "
            "(MiniMax-M2, M2.1, M2.5)")

    hidden = _positive_int(raw, "hidden_size", source)
    inter = _positive_int(raw, "intermediate_size", source)
    layers = _positive_int(raw, "num_hidden_layers", source)
    heads = _positive_int(raw, "num_attention_heads", source)
    kv_heads = _positive_int(raw, "num_key_value_heads", source)
    head_dim = raw.get("head_dim") or hidden // heads
    experts = _positive_int(raw, "num_local_experts", source)
    top_k = _positive_int(raw, "num_experts_per_tok", source)
    vocab = _positive_int(raw, "vocab_size", source)
    max_pos = _positive_int(raw, "max_position_embeddings", source)

    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads ({heads}) is not a multiple of "
                          f"num_key_value_heads ({kv_heads})")
    if top_k > experts:
        raise ConfigError(f"{source}: num_experts_per_tok ({top_k}) exceeds num_local_experts ({experts})")

    rotary_dim = raw.get("rotary_dim")
    if rotary_dim is None:
        rotary_dim = int(head_dim * raw.get("partial_rotary_factor", 1.0))
    if not (0 < rotary_dim <= head_dim) or rotary_dim % 2:
        raise ConfigError(f"{source}: rotary_dim ({rotary_dim}) must be even and in 1..head_dim ({head_dim})")
    rope_theta = raw.get("rope_theta")
    if rope_theta is None:
        rope_theta = (raw.get("rope_parameters") or {}).get("rope_theta")
    if not isinstance(rope_theta, (int, float)) or rope_theta <= 1:
        raise ConfigError(f"{source}: rope_theta must be a number > 1, got {rope_theta!r}")
    eps = raw.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or not (0 < eps < 1):
        raise ConfigError(f"{source}: rms_norm_eps must be in (0, 1), got {eps!r}")

    # Architecture switches: anything but the published values would need code this project lacks.
    attn_types = raw.get("attn_type_list")
    if attn_types is not None and (len(attn_types) < layers or any(t != 1 for t in attn_types[:layers])):
        raise ConfigError(f"{source}: attn_type_list must be all 1 (full attention) for every layer")
    if raw.get("sliding_window"):
        raise ConfigError(f"{source}: sliding_window attention is not supported")
    if raw.get("use_qk_norm", True) is not True or raw.get("qk_norm_type", "per_layer") != "per_layer":
        raise ConfigError(f"{source}: only use_qk_norm=true with qk_norm_type='per_layer' is supported")
    if raw.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"{source}: scoring_func {raw.get('scoring_func')!r} is not supported (only 'sigmoid')")
    if raw.get("use_routing_bias", True) is not True:
        raise ConfigError(f"{source}: use_routing_bias must be true")
    if raw.get("shared_intermediate_size", 0):
        raise ConfigError(f"{source}: shared experts (shared_intermediate_size > 0) are not supported")
    if raw.get("tie_word_embeddings", False):
        raise ConfigError(f"{source}: tie_word_embeddings must be false")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {raw.get('hidden_act')!r} is not supported (only 'silu')")

    q = raw.get("quantization_config")
    if q is None:
        raise ConfigError(f"{source}: no quantization_config; this project reads the published FP8 checkpoint")
    if q.get("quant_method") != "fp8":
        raise ConfigError(f"{source}: quantization_config.quant_method is {q.get('quant_method')!r}; "
                          "only 'fp8' (block-scaled float8_e4m3fn) is supported")
    if q.get("fmt", "float8_e4m3fn") not in ("float8_e4m3fn", "e4m3"):
        raise ConfigError(f"{source}: quantization_config.fmt {q.get('fmt')!r} is not supported (only float8_e4m3fn)")
    block = q.get("weight_block_size")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"{source}: quantization_config.weight_block_size must be two positive integers, "
                          f"got {block!r}")

    mtp = raw.get("num_mtp_modules", 0) if raw.get("use_mtp", False) else 0
    return ModelConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        num_experts=experts, top_k=top_k, vocab_size=vocab, rms_norm_eps=float(eps),
        rope_theta=float(rope_theta), rotary_dim=rotary_dim, max_position_embeddings=max_pos,
        fp8_block=(block[0], block[1]), num_mtp_modules=int(mtp or 0),
    )
