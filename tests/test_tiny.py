"""The embedded toy checkpoint has the published layout, file for file: config.json keys, special
ids in generation_config.json, tokenizer_config.json without a template, chat_template.jinja, shard
names; and it is deterministic."""
import hashlib
import json
import re

import jinja2
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

from export.tiny import PRESETS, build_tokenizer, hf_config, write_checkpoint
from tests.published import (PUBLISHED_CONFIG, PUBLISHED_GENERATION_CONFIG, PUBLISHED_SPECIALS,
                             PUBLISHED_TOKENIZER_CONFIG)

TEXT_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "model.safetensors.index.json"}


def _digest(d):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def _ids(d):
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    return {text: tok.token_to_id(text) for text in PUBLISHED_SPECIALS}


def test_same_seed_same_bytes(tmp_path, tiny_ckpt):
    again = write_checkpoint(tmp_path / "again", PRESETS["tiny"], seed=0)
    assert _digest(again) == _digest(tiny_ckpt)
    other = write_checkpoint(tmp_path / "other", PRESETS["tiny"], seed=1)
    shard = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.1.self_attn.q_proj.weight"]
    assert _digest(other)[shard] != _digest(tiny_ckpt)[shard]


def test_published_files_and_config_keys(tiny_ckpt):
    files = {f.name for f in tiny_ckpt.iterdir()}
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert files == TEXT_FILES | set(shards)
    # Shards numbered from 0 with an "-of-N" count one more than the files, as published.
    assert shards == [f"model-{i:05d}-of-{len(shards) + 1:05d}.safetensors" for i in range(len(shards))]
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert set(cfg) == set(PUBLISHED_CONFIG)  # no bos/eos, no torch_dtype
    for key in ("model_type", "architectures", "auto_map", "quantization_config", "use_mtp", "num_mtp_modules",
                "qk_norm_type", "scoring_func", "transformers_version"):
        assert cfg[key] == PUBLISHED_CONFIG[key], key
    assert not [n for n in index["weight_map"] if n.startswith(f"model.layers.{cfg['num_hidden_layers']}.")]
    tc = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())
    assert "chat_template" not in tc and "pad_token" not in tc
    assert {k: tc[k] for k in PUBLISHED_TOKENIZER_CONFIG} == PUBLISHED_TOKENIZER_CONFIG
    gen = json.loads((tiny_ckpt / "generation_config.json").read_text())
    ids = _ids(tiny_ckpt)
    assert gen == PUBLISHED_GENERATION_CONFIG | {"bos_token_id": ids["]~b]"], "eos_token_id": ids["[e~["]}


def test_published_dtypes(tiny_ckpt):
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    dtypes = {}
    for shard in sorted(set(index["weight_map"].values())):
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


def test_special_tokens_at_published_offsets(tiny_ckpt):
    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    first = PRESETS["tiny"].first_special
    for text, published in PUBLISHED_SPECIALS.items():
        assert tok.token_to_id(text) == first + published - 200000, text
    text = "hello model, what is 2 + 3?"
    ids = tok.encode(text).ids
    assert max(ids) < first and tok.decode(ids) == text  # byte-level BPE round-trips


def test_real_preset_specials_at_published_ids():
    spec = PRESETS["real"]
    tok = build_tokenizer(spec, 0)
    assert {t: tok.token_to_id(t) for t in PUBLISHED_SPECIALS} == PUBLISHED_SPECIALS
    assert tok.get_vocab_size() == 200054 <= spec.vocab_size
    text = "hello model, what is 2 + 3?"
    assert tok.decode(tok.encode(text).ids) == text
    cfg = hf_config(spec)
    assert {k: v for k, v in cfg.items() if k not in ("num_hidden_layers", "attn_type_list")} == \
        {k: v for k, v in PUBLISHED_CONFIG.items() if k not in ("num_hidden_layers", "attn_type_list")}


def _render(ckpt, **kw):
    env = jinja2.Environment()  # the test's own: no filters or globals of the project's
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(jinja2.TemplateError(m))
    return env.from_string((ckpt / "chat_template.jinja").read_text()).render(**kw)


def test_chat_template_turns(tiny_ckpt):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    text = _render(tiny_ckpt, messages=msgs, add_generation_prompt=True)
    assert text == ("]~!b[]~b]system\nBe brief.[e~[\n]~b]user\nhi[e~[\n]~b]ai\nhello[e~[\n"
                    "]~b]user\nbye[e~[\n]~b]ai\n<think>\n")
    default = _render(tiny_ckpt, messages=msgs[1:2], add_generation_prompt=False)
    assert default == ("]~!b[]~b]system\nYou are a helpful assistant. Your name is MiniMax-M2.5 and is built by "
                       "MiniMax.[e~[\n]~b]user\nhi[e~[\n")
    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    ids = tok.encode(text).ids
    first = PRESETS["tiny"].first_special
    assert ids[:2] == [first + 34, first + 19] and ids[-2] == first + 50 and tok.decode(ids[-1:]) == "\n"


def test_chat_template_tools_and_results(tiny_ckpt):
    """The publisher's tool format: definitions in <tools>, calls as <invoke>/<parameter>, results as
    <response>s of one ]~b]tool turn, reasoning kept only after the last user turn."""
    tools = [{"type": "function", "function": {"name": "search_web", "parameters": {
        "type": "object", "properties": {"query_list": {"type": "array", "items": {"type": "string"}}}}}}]
    msgs = [{"role": "user", "content": "news?"},
            {"role": "assistant", "content": "<think>\nlook it up\n</think>\n\n", "tool_calls": [
                {"type": "function", "function": {"name": "search_web", "arguments": {"query_list": ["a", "b"]}}}]},
            {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}]
    text = _render(tiny_ckpt, messages=msgs, tools=tools, add_generation_prompt=True)
    assert '<tools>\n<tool>{"name": "search_web", "parameters": ' in text
    assert "When making tool calls, use XML format to invoke tools and pass parameters:" in text
    assert text.endswith(
        "]~b]user\nnews?[e~[\n]~b]ai\n<think>\nlook it up\n</think>\n\n\n<minimax:tool_call>\n"
        '<invoke name="search_web">\n<parameter name="query_list">["a", "b"]</parameter>\n</invoke>\n'
        "</minimax:tool_call>[e~[\n]~b]tool\n<response>r1</response>\n<response>r2</response>[e~[\n]~b]ai\n<think>\n")
    # Reasoning before the last user turn is dropped, as the published template does.
    later = _render(tiny_ckpt, messages=msgs + [{"role": "assistant", "content": "done"},
                                                {"role": "user", "content": "thanks"}], add_generation_prompt=True)
    assert "look it up" not in later
    with pytest.raises(jinja2.TemplateError, match="tool message must follow"):
        _render(tiny_ckpt, messages=[{"role": "tool", "content": "x"}], add_generation_prompt=True)


def test_transformers_reads_tokenizer_template_and_eos(tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    from runtime.text import TextCodec

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_ckpt))
    tools = [{"type": "function", "function": {"name": "f", "description": "x <y> & 'z'",
                                               "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": "f", "arguments": {"a": 1}}}]}, {"role": "tool", "content": "2"}]
    theirs = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=False)
    assert TextCodec(tiny_ckpt).render(msgs, True, tools=tools) == theirs
    gen = transformers.GenerationConfig.from_pretrained(str(tiny_ckpt))
    assert gen.eos_token_id == tok.convert_tokens_to_ids("[e~[") == _ids(tiny_ckpt)["[e~["]
    assert re.fullmatch(r"\]~!b\[", tok.bos_token)


@pytest.mark.long
def test_fast_weights_keep_activations_finite_over_the_full_depth(tmp_path):
    """The fast path's random FP8 bytes (the rank8 and real presets) at the real depth (62 layers),
    on a small width: every weight finite, the rank8 preset's special ids inside its vocabulary,
    and the model's logits in BF16 finite and not degenerate after all 62 layers."""
    from dataclasses import replace

    from export.checkpoint import Checkpoint
    from export.model import Model
    from export.tiny import write_checkpoint
    import torch

    rank8 = PRESETS["rank8"]
    assert rank8.fast and rank8.num_hidden_layers == 62 and rank8.vocab_size == 200064 // 8
    assert rank8.first_special + 54 <= rank8.vocab_size  # every special id indexes the embedding
    spec = replace(PRESETS["tiny"], num_hidden_layers=rank8.num_hidden_layers, fast=True)
    ckpt = Checkpoint(write_checkpoint(tmp_path / "deep", spec, seed=0))
    model = Model(ckpt, torch.bfloat16)  # reading checks every weight finite (export/checkpoint.py)
    logits = model.logits(torch.tensor([1, 5, 9, 200, 31, 7]))
    assert torch.isfinite(logits).all()
    # not collapsed: the logits spread (a std far from 0 and from overflow) and positions differ
    assert 0.05 < float(logits.float().std()) < 1e3 and len({int(i) for i in logits.argmax(-1)}) > 1
