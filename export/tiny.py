"""Write a toy MiniMax-M2 checkpoint in the exact published layout: the embedded default model.

Same architecture and file layout as MiniMaxAI/MiniMax-M2.5 (float8_e4m3fn weights with float32
128x128 `weight_scale_inv` blocks, per-expert w1/w2/w3, float32 router gate and bias, bf16 norms,
embeddings and lm_head, several shards and an index, config.json with quantization_config, a
byte-level BPE tokenizer with the MiniMax special tokens, tokenizer_config.json without a template
and a separate chat_template.jinja, generation_config.json holding the special ids and sampling
defaults, config.json with exactly the published keys), at a size that runs on a CPU in seconds. Random weights from a fixed seed: the same seed gives the same
bytes.

    python -m export.tiny build/tiny-minimax-m2            # the embedded default
    python -m export.tiny /tmp/alt --preset alt            # another shape, for tests
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import fp8

BLOCK = (128, 128)
NUM_SPECIAL = 54  # ids n_regular .. n_regular+53, as 200000..200053 in the published tokenizer
BPE_TRAINED = 4096  # regular tokens learned from the toy corpus; the rest are unreachable fillers

# Offsets (from the first special id) of the special tokens whose meaning is published.
SPECIAL_TOKENS = {
    0: "]!p~[",
    19: "]~b]",        # turn start (generation_config.json's bos)
    20: "[e~[",        # end of turn: the stop token
    21: "]!d~[",       # unk
    34: "]~!b[",       # begin of text (tokenizer_config.json's bos)
    50: "<think>",
    51: "</think>",
    52: "<minimax:tool_call>",
    53: "</minimax:tool_call>",
}
NOT_SKIPPED = {"<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>"}  # kept when decoding

# Written for this project; renders what the published chat_template.jinja renders: the begin-of-text
# token and system header (with a default identity), tool definitions in <tools>, assistant turns
# with <think> reasoning (kept only after the last user turn) and <minimax:tool_call> blocks,
# consecutive tool results grouped in one ]~b]tool turn as <response>s, and a generation prompt that
# opens the thinking block.
CHAT_TEMPLATE = (Path(__file__).parent / "data" / "toy_chat_template.jinja").read_text()


@dataclass(frozen=True)
class ToySpec:
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    n_regular_tokens: int
    vocab_size: int
    num_mtp_modules: int = 3  # declared (use_mtp true) as published; no MTP tensors are written
    max_position_embeddings: int = 4096
    # fast: random FP8 bytes drawn from a normal's quantiles, shards written side by side by worker
    # processes (the big presets); else normal weights quantized one tensor at a time, in one
    # process (the CI models, whose bytes the tests were written against).
    fast: bool = False

    @property
    def first_special(self) -> int:
        return self.n_regular_tokens


PRESETS = {
    # intermediate_size 192 is not a multiple of 128: w1/w3/w2 have partial edge scale blocks.
    "tiny": ToySpec(num_hidden_layers=3, hidden_size=256, intermediate_size=192, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=32, rotary_dim=16, num_local_experts=16,
                    num_experts_per_tok=4, n_regular_tokens=896, vocab_size=960),
    # Every dimension is either a multiple of 128 or below it, the case transformers' own FP8
    # loader handles (it infers the block size from the scale grid).
    "alt": ToySpec(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=64, rotary_dim=32, num_local_experts=8,
                   num_experts_per_tok=2, n_regular_tokens=448, vocab_size=512),
    # 8 KV heads like the real model, so TP=8 gives one KV head per rank (and QK-norm sums over
    # eight ranks); every dimension a multiple of 128 or below it (transformers loads it itself).
    "kv8": ToySpec(num_hidden_layers=2, hidden_size=256, intermediate_size=256, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=32, rotary_dim=16, num_local_experts=16,
                   num_experts_per_tok=4, n_regular_tokens=896, vocab_size=960),
    # MiniMax-M2.5's true widths (hidden 3072, 48/8 heads of 128, 256 experts of 1536, top-8,
    # vocabulary 200064) with one layer by default: for export and GPU benchmarks, not for CI.
    "real": ToySpec(num_hidden_layers=1, hidden_size=3072, intermediate_size=1536, num_attention_heads=48,
                    num_key_value_heads=8, head_dim=128, rotary_dim=64, num_local_experts=256,
                    num_experts_per_tok=8, n_regular_tokens=200000, vocab_size=200064,
                    max_position_embeddings=196608, fast=True),
    # One TP=8 rank of MiniMax-M2.5 as a model of its own, at full depth and breadth: 6 query / 1 KV
    # heads of 128, experts of 1536 / 8 = 192, hidden 3072, 62 layers, 256 experts, top-8, and a
    # vocabulary of 200064 / 8 = 25008 rows. The special tokens sit at the top of that vocabulary,
    # in the 64 rows past the regular ones as published (24944.., not 200000..): ids must index the
    # embedding. A real-scale run of one GPU's compute through the normal load path (~30 GB).
    "rank8": ToySpec(num_hidden_layers=62, hidden_size=3072, intermediate_size=192, num_attention_heads=6,
                     num_key_value_heads=1, head_dim=128, rotary_dim=64, num_local_experts=256,
                     num_experts_per_tok=8, n_regular_tokens=25008 - 64, vocab_size=25008,
                     max_position_embeddings=196608, fast=True),
}


def hf_config(spec: ToySpec) -> dict:
    """config.json with exactly the published keys: no bos/eos (they live in generation_config.json),
    use_mtp true with no MTP tensors, no torch_dtype."""
    return {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "attn_type_list": [1] * spec.num_hidden_layers,
        "auto_map": {"AutoConfig": "configuration_minimax_m2.MiniMaxM2Config",
                     "AutoModelForCausalLM": "modeling_minimax_m2.MiniMaxM2ForCausalLM"},
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "model_type": "minimax_m2",
        "mtp_transformer_layers": 1,
        "num_attention_heads": spec.num_attention_heads,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "num_local_experts": spec.num_local_experts,
        "num_mtp_modules": spec.num_mtp_modules,
        "qk_norm_type": "per_layer",
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "float8_e4m3fn",
            "quant_method": "fp8",
            "weight_block_size": list(BLOCK),
            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"],
        },
        "rms_norm_eps": 1e-06,
        "rope_theta": 5000000,
        "rotary_dim": spec.rotary_dim,
        "scoring_func": "sigmoid",
        "shared_intermediate_size": 0,
        "tie_word_embeddings": False,
        "transformers_version": "4.46.1",
        "use_cache": True,
        "use_mtp": spec.num_mtp_modules > 0,
        "use_qk_norm": True,
        "use_routing_bias": True,
        "vocab_size": spec.vocab_size,
    }


def generation_config(spec: ToySpec) -> dict:
    return {"bos_token_id": spec.first_special + 19, "eos_token_id": spec.first_special + 20, "do_sample": True,
            "temperature": 1.0, "top_p": 0.95, "top_k": 40}


class _Weights:
    """Seeded random weights, with block-to-block scale variation so every scale block matters."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g)

    def norm(self, n: int) -> torch.Tensor:
        return (1.0 + 0.1 * self.randn(n)).to(torch.bfloat16)

    def quantized(self, name: str, rows: int, cols: int):
        gr, gc = fp8.scale_grid(rows, cols, BLOCK)
        block_gain = torch.exp(0.5 * self.randn(gr, gc))
        gain = block_gain.repeat_interleave(BLOCK[0], 0)[:rows].repeat_interleave(BLOCK[1], 1)[:, :cols]
        w = self.randn(rows, cols) * gain / cols ** 0.5
        q, scale_inv = fp8.quantize(w, BLOCK)
        yield name + ".weight", q
        yield name + ".weight_scale_inv", scale_inv

    def bf16(self, rows: int, cols: int, std: float, chunk: int = 8192) -> torch.Tensor:
        """A large BF16 matrix, generated a few thousand rows at a time to bound memory."""
        out = torch.empty(rows, cols, dtype=torch.bfloat16)
        for r in range(0, rows, chunk):
            out[r:r + chunk] = (std * self.randn(min(chunk, rows - r), cols)).to(torch.bfloat16)
        return out


def _layer_tensors(w: _Weights, spec: ToySpec, n: int):
    """(name, tensor) pairs of one decoder layer, generated one tensor at a time."""
    H, I, E = spec.hidden_size, spec.intermediate_size, spec.num_local_experts
    q, kv = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
    p = f"model.layers.{n}."
    yield p + "input_layernorm.weight", w.norm(H)
    yield p + "post_attention_layernorm.weight", w.norm(H)
    yield from w.quantized(p + "self_attn.q_proj", q, H)
    yield from w.quantized(p + "self_attn.k_proj", kv, H)
    yield from w.quantized(p + "self_attn.v_proj", kv, H)
    yield from w.quantized(p + "self_attn.o_proj", H, q)
    yield p + "self_attn.q_norm.weight", w.norm(q)
    yield p + "self_attn.k_norm.weight", w.norm(kv)
    yield p + "block_sparse_moe.gate.weight", w.randn(E, H) / H ** 0.5
    yield p + "block_sparse_moe.e_score_correction_bias", 0.1 * w.randn(E)
    for e in range(E):
        yield from w.quantized(p + f"block_sparse_moe.experts.{e}.w1", I, H)
        yield from w.quantized(p + f"block_sparse_moe.experts.{e}.w3", I, H)
        yield from w.quantized(p + f"block_sparse_moe.experts.{e}.w2", H, I)


class _ShardWriter:
    """Writes tensors into numbered shards of at most `limit` bytes, then names them -of-N and
    writes the index, as the published checkpoint is laid out."""

    def __init__(self, d: Path, limit: int = 2 << 30):
        self.d, self.limit = d, limit
        self.files: list[Path] = []
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.where: dict[str, int] = {}
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.current and self.size + nbytes > self.limit:
            self.flush()
        self.current[name] = t.contiguous()
        self.where[name] = len(self.files)
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if self.current:
            path = self.d / f"shard-{len(self.files):05d}.tmp"
            save_file(self.current, str(path), metadata={"format": "pt"})
            self.files.append(path)
            self.current, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        # As published: numbered from 0, and the "-of-N" count one more than the files there are.
        names = [f"model-{i:05d}-of-{len(self.files) + 1:05d}.safetensors" for i in range(len(self.files))]
        for f, n in zip(self.files, names):
            f.rename(self.d / n)
        weight_map = {k: names[i] for k, i in sorted(self.where.items())}
        (self.d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))


def _corpus(seed: int, words: int = 30000) -> list[str]:
    """Deterministic text with enough repeated structure for a few hundred BPE merges."""
    rng = random.Random(seed)
    common = ("the of and to in is you that it he was for on are as with his they at be this have from or "
              "one had by word but not what all were we when your can said there use an each which she do how "
              "their if will up other about out many then them these so some her would make like him into time "
              "has look two more write go see number no way could people my than first water been call who oil "
              "its now find long down day did get come made may part hello thanks please answer question model "
              "system user assistant think code python tensor engine layer expert token").split()
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    lines, line = [], []
    for _ in range(words):
        if rng.random() < 0.7:
            word = rng.choice(common)
        else:
            word = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
        if rng.random() < 0.05:
            word = word.capitalize()
        line.append(word + (rng.choice([",", ".", "?", "!", ":"]) if rng.random() < 0.08 else ""))
        if len(line) >= rng.randint(6, 16):
            lines.append(" ".join(line) + ("\n" if rng.random() < 0.3 else ""))
            line = []
    lines += [f"{i} + {i * 7 % 13} = {i + i * 7 % 13}" for i in range(200)]
    return lines


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the rest for chr(256 + n)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def _filler(i: int, alphabet: dict[int, str]) -> str:
    """A vocabulary entry no merge can produce (control bytes never occur in the corpus): pads the
    regular vocabulary to its published size without training that many merges."""
    digits = alphabet[0]
    while True:
        digits += alphabet[1 + i % 16]
        i //= 16
        if not i:
            return digits


def build_tokenizer(spec: ToySpec, seed: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trained = min(spec.n_regular_tokens, BPE_TRAINED)
    trainer = trainers.BpeTrainer(vocab_size=trained, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed), trainer)
    if tok.get_vocab_size() != trained:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, wanted {trained}")
    if trained < spec.n_regular_tokens:
        data = json.loads(tok.to_str())
        alphabet = _bytes_to_unicode()
        vocab = data["model"]["vocab"]
        for i in range(trained, spec.n_regular_tokens):
            vocab[_filler(i, alphabet)] = i
        tok = Tokenizer.from_str(json.dumps(data))
    names = [SPECIAL_TOKENS.get(i, f"<minimax:reserved_{i}>") for i in range(NUM_SPECIAL)]
    tok.add_special_tokens([AddedToken(n, special=n not in NOT_SKIPPED, normalized=False) for n in names])
    for i, n in enumerate(names):
        assert tok.token_to_id(n) == spec.first_special + i, n
    return tok


def write_text_files(d: Path, spec: ToySpec, seed: int) -> None:
    """tokenizer.json, tokenizer_config.json (no chat_template key, as published),
    chat_template.jinja and generation_config.json."""
    (d / "generation_config.json").write_text(json.dumps(generation_config(spec), indent=2))
    build_tokenizer(spec, seed).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "]~!b[", "eos_token": "[e~[", "unk_token": "]!d~[",
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings}, indent=2))
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def write_checkpoint(out: str | Path, spec: ToySpec = PRESETS["tiny"], seed: int = 0) -> Path:
    """Write the checkpoint to `out`, atomically: a reader never sees a half-written directory."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write(tmp, spec, seed)
        tmp.chmod(0o755)  # mkdtemp and safetensors create owner-only files
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write(d: Path, spec: ToySpec, seed: int) -> None:
    if spec.fast:
        from .tiny_fast import write_shards
        weight_map, total = write_shards(d, spec, seed, BLOCK)
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    else:
        _write_quantized(d, spec, seed)
    (d / "config.json").write_text(json.dumps(hf_config(spec), indent=2))
    write_text_files(d, spec, seed)


def _write_quantized(d: Path, spec: ToySpec, seed: int) -> None:
    w = _Weights(seed)
    H, V = spec.hidden_size, spec.vocab_size
    shards = _ShardWriter(d)
    shards.add("model.embed_tokens.weight", w.bf16(V, H, 1.0))
    for n in range(spec.num_hidden_layers):  # each layer starts a shard, as in the published files
        shards.flush()
        for name, t in _layer_tensors(w, spec, n):
            shards.add(name, t)
    shards.flush()
    shards.add("model.norm.weight", w.norm(H))
    shards.add("lm_head.weight", w.bf16(V, H, 3.0 / H ** 0.5))
    shards.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="directory to write (replaced atomically if it exists)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape (default: tiny)")
    ap.add_argument("--seed", type=int, default=0, help="random seed for weights and tokenizer corpus")
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    a = ap.parse_args(argv)
    spec = PRESETS[a.preset]
    if a.layers:
        spec = replace(spec, num_hidden_layers=a.layers)
    path = write_checkpoint(a.out, spec, a.seed)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote {path} ({a.preset}, seed {a.seed}, {size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
