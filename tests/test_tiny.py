"""The embedded toy checkpoint: the published layout, determinism, tokenizer and chat template."""
import hashlib
import json

import jinja2
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

from export.tiny import PRESETS, SPECIAL_TOKENS, write_checkpoint


def _digest(d):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def test_same_seed_same_bytes(tmp_path, tiny_ckpt):
    again = write_checkpoint(tmp_path / "again", PRESETS["tiny"], seed=0)
    assert _digest(again) == _digest(tiny_ckpt)
    other = write_checkpoint(tmp_path / "other", PRESETS["tiny"], seed=1)
    assert _digest(other)["model-00002-of-00005.safetensors"] != _digest(tiny_ckpt)["model-00002-of-00005.safetensors"]


def test_published_layout(tiny_ckpt):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["model_type"] == "minimax_m2" and cfg["architectures"] == ["MiniMaxM2ForCausalLM"]
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert cfg["quantization_config"]["fmt"] == "float8_e4m3fn"
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    dtypes = {}
    for shard in shards:
        with safe_open(str(tiny_ckpt / shard), framework="pt") as f:
            for name in f.keys():
                dtypes[name] = f.get_slice(name).get_dtype()
    assert dtypes.keys() == index["weight_map"].keys()
    p = "model.layers.0."
    assert dtypes[p + "self_attn.q_proj.weight"] == "F8_E4M3"
    assert dtypes[p + "self_attn.q_proj.weight_scale_inv"] == "F32"
    assert dtypes[p + "block_sparse_moe.experts.3.w2.weight"] == "F8_E4M3"
    assert dtypes[p + "block_sparse_moe.gate.weight"] == "F32"
    assert dtypes[p + "block_sparse_moe.e_score_correction_bias"] == "F32"
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", p + "input_layernorm.weight",
              p + "self_attn.q_norm.weight"):
        assert dtypes[n] == "BF16", n
    # Partial edge blocks: intermediate 192 -> a 2-block scale grid for 192 rows.
    with safe_open(str(tiny_ckpt / index["weight_map"][p + "block_sparse_moe.experts.0.w1.weight_scale_inv"]),
                   framework="pt") as f:
        assert f.get_slice(p + "block_sparse_moe.experts.0.w1.weight_scale_inv").get_shape() == [2, 2]
    gen = json.loads((tiny_ckpt / "generation_config.json").read_text())
    assert (gen["temperature"], gen["top_p"], gen["top_k"]) == (1.0, 0.95, 40)


def test_tokenizer_special_tokens(tiny_ckpt):
    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    first = PRESETS["tiny"].first_special
    for offset, text in SPECIAL_TOKENS.items():
        assert tok.token_to_id(text) == first + offset
    assert cfg["eos_token_id"] == tok.token_to_id("[e~[") and cfg["bos_token_id"] == tok.token_to_id("]~!b[")
    assert tok.get_vocab_size() <= cfg["vocab_size"]
    text = "hello model, what is 2 + 3?"
    ids = tok.encode(text).ids
    assert max(ids) < first and tok.decode(ids) == text  # byte-level BPE round-trips


def test_chat_template(tiny_ckpt):
    tc = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())
    template = jinja2.Environment().from_string(tc["chat_template"])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    text = template.render(messages=msgs, add_generation_prompt=True)
    assert text == ("]~!b[]~b]system\nBe brief.[e~[\n]~b]user\nhi[e~[\n]~b]ai\nhello[e~[\n"
                    "]~b]user\nbye[e~[\n]~b]ai\n<think>\n")
    default = template.render(messages=msgs[1:2], add_generation_prompt=False)
    assert default == "]~!b[]~b]system\nYou are a helpful assistant.[e~[\n]~b]user\nhi[e~[\n"
    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    ids = tok.encode(text).ids
    first = PRESETS["tiny"].first_special
    assert ids[:2] == [first + 34, first + 19] and tok.decode([ids[-1]]) == "\n" and first + 50 in ids


def test_transformers_reads_tokenizer_and_template(tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_ckpt))
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ours = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json")).encode(
        "]~!b[]~b]system\nYou are a helpful assistant.[e~[\n]~b]user\nhi[e~[\n]~b]ai\n<think>\n").ids
    assert list(ids) == ours
    assert tok.eos_token_id == json.loads((tiny_ckpt / "config.json").read_text())["eos_token_id"]
