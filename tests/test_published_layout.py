"""First contact with the published files: config.json without bos/eos, the special ids from
generation_config.json, shard names that do not match their count, the full published tensor list,
and a checkpoint in that layout giving transformers' tokens through export.generate and chat.py."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from export.checkpoint import Checkpoint, CheckpointError, check_names
from export.config import ConfigError, ModelConfig, parse_hf_config
from export.text_config import GenerationDefaults, chat_template, special_ids
from tests.published import (NUM_SHARDS, NUM_TENSORS, PUBLISHED_CONFIG, PUBLISHED_GENERATION_CONFIG,
                             PUBLISHED_TOKENIZER_CONFIG, SHARD_COUNT_IN_NAME, published_weight_map)
from tests.cli import chat_outputs, last_json, run_module
from tests.reference import bf16_weight_reference



def _write(d: Path, **files) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (d / name.replace("__", ".")).write_text(content if isinstance(content, str) else json.dumps(content))
    return d


def test_published_config_parses(tmp_path):
    cfg = parse_hf_config(PUBLISHED_CONFIG)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (3072, 1536, 62)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rotary_dim) == (48, 8, 128, 64)
    assert (cfg.num_experts, cfg.top_k, cfg.vocab_size, cfg.max_position_embeddings) == (256, 8, 200064, 196608)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.fp8_block, cfg.num_mtp_modules) == (5e6, 1e-6, (128, 128), 3)
    # From the folder: ids from generation_config.json, never refused for config.json lacking them.
    d = _write(tmp_path / "m", config__json=PUBLISHED_CONFIG, generation_config__json=PUBLISHED_GENERATION_CONFIG,
               tokenizer_config__json=PUBLISHED_TOKENIZER_CONFIG)
    full = ModelConfig.from_checkpoint(d)
    assert (full.bos_token_id, full.eos_token_ids) == (200019, (200020,))
    assert GenerationDefaults.read(d) == GenerationDefaults(temperature=1.0, top_p=0.95, top_k=40, do_sample=True)


def test_published_tensor_names_pass_the_index_check():
    cfg = parse_hf_config(PUBLISHED_CONFIG)
    weight_map = published_weight_map()
    assert len(weight_map) == NUM_TENSORS
    shards = sorted(set(weight_map.values()))
    assert len(shards) == NUM_SHARDS and shards[-1] == f"model-{NUM_SHARDS - 1:05d}-of-{SHARD_COUNT_IN_NAME:05d}.safetensors"
    check_names(weight_map, cfg)
    missing = dict(weight_map)
    del missing["model.layers.61.block_sparse_moe.experts.255.w2.weight_scale_inv"]
    with pytest.raises(CheckpointError, match="experts.255.w2.weight_scale_inv: missing.*block scale"):
        check_names(missing, cfg)
    with pytest.raises(CheckpointError, match="shared_experts.*unexpected tensor"):
        check_names(weight_map | {"model.layers.3.block_sparse_moe.shared_experts.w1.weight": shards[0]}, cfg)
    check_names(weight_map | {"model.layers.62.enorm.weight": shards[-1]}, cfg)  # MTP heads: skipped


def test_special_ids_in_published_order(tiny_ckpt, tmp_path):
    """generation_config.json, then tokenizer_config.json's tokens (ids from tokenizer.json), then
    config.json; none anywhere is allowed (no EOS stop)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    end, turn, begin = tok.token_to_id("[e~["), tok.token_to_id("]~b]"), tok.token_to_id("]~!b[")
    ids = lambda d: (special_ids(d, 960).bos_token_id, special_ids(d, 960).eos_token_ids)  # noqa: E731
    d = tmp_path / "m"
    shutil.copytree(tiny_ckpt, d)
    assert ids(d) == (turn, (end,))
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.5}))
    assert ids(d) == (begin, (end,))  # the tokenizer's own bos and eos
    (d / "tokenizer_config.json").write_text(json.dumps({}))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"eos_token_id": [7, 8], "bos_token_id": 3}))
    assert ids(d) == (3, (7, 8))
    (d / "config.json").write_text(json.dumps(cfg))
    assert ids(d) == (None, ())
    assert ModelConfig.from_checkpoint(d).eos_token_ids == ()
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 5000}))
    with pytest.raises(ConfigError, match="generation_config.json: eos_token_id 5000 is not a token id"):
        ModelConfig.from_checkpoint(d)
    (d / "generation_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="generation_config.json: cannot be parsed"):
        ModelConfig.from_checkpoint(d)


def test_chat_template_sources(tiny_ckpt, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_ckpt, d)
    assert chat_template(d) == (tiny_ckpt / "chat_template.jinja").read_text()
    tc = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(tc | {"chat_template": "T{{ messages|length }}"}))
    assert chat_template(d) == "T{{ messages|length }}"  # the key wins over the file
    (d / "tokenizer_config.json").write_text(json.dumps(tc | {"chat_template": [
        {"name": "tool_use", "template": "A"}, {"name": "default", "template": "B"}]}))
    assert chat_template(d) == "B"
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    (d / "chat_template.jinja").unlink()
    assert chat_template(d) is None


def test_shard_names_come_from_the_index(tiny_ckpt, tmp_path):
    """Shards renamed to anything (the index updated) read the same tensors."""
    d = tmp_path / "m"
    shutil.copytree(tiny_ckpt, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    renames = {old: f"weights-{i}.bin.safetensors" for i, old in enumerate(sorted(set(index["weight_map"].values())))}
    for old, new in renames.items():
        (d / old).rename(d / new)
    index["weight_map"] = {k: renames[v] for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    a, b = Checkpoint(tiny_ckpt).layer(1, torch.float32), Checkpoint(d).layer(1, torch.float32)
    assert torch.equal(a.w13, b.w13) and torch.equal(a.q_proj, b.q_proj)


# ---- a published-layout checkpoint end to end, with an eos that the model actually writes --------

N_NEW = 16
PROMPT = [1, 5, 9]


def _first_repeatless_token(tokens: list[int], at_least: int) -> int:
    """A token whose first occurrence is at position >= at_least: the greedy run must stop there."""
    for i, t in enumerate(tokens):
        if i >= at_least and t not in tokens[:i]:
            return t
    raise AssertionError(f"no usable eos in {tokens}")


@pytest.fixture(scope="module")
def eos_checkpoint(checkpoints, hf_model, tmp_path_factory):
    """The alt checkpoint (dimensions unlike the embedded toy) with generation_config.json's eos set
    to a token that the BF16-weight greedy run writes at step 4 or later (first time). Returns
    (folder, eos, transformers' greedy tokens for chat.py, and for export.generate in float32)."""
    from tests.reference import load_transformers

    free = bf16_weight_reference(hf_model("alt"))
    run = free.generate(torch.tensor([PROMPT]), max_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                        pad_token_id=0, use_mtp=False)[0, len(PROMPT):].tolist()
    eos = _first_repeatless_token(run, 4)
    d = tmp_path_factory.mktemp("published") / "alt-eos"
    shutil.copytree(checkpoints["alt"], d)
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps(gen | {"eos_token_id": eos}))
    assert "eos_token_id" not in json.loads((d / "config.json").read_text())
    # transformers on this folder takes its eos from generation_config.json (do_sample off: greedy).
    model = load_transformers(d, torch.float32, tmp_path_factory.mktemp("hf"))
    assert model.generation_config.eos_token_id == eos

    def stop_at_eos(m):
        out = m.generate(torch.tensor([PROMPT]), max_new_tokens=N_NEW, do_sample=False, use_mtp=False,
                         top_k=None, top_p=None, temperature=None)
        return out[0, len(PROMPT):].tolist()

    ref_bf16 = stop_at_eos(bf16_weight_reference(model))
    assert ref_bf16[-1] == eos and len(ref_bf16) < N_NEW  # it really stopped there
    return d, eos, ref_bf16, stop_at_eos(model)


def test_generate_cli_stops_at_generation_config_eos(eos_checkpoint):
    d, eos, _, ref_f32 = eos_checkpoint
    r = run_module("export.generate", d, "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens", N_NEW)
    assert r.returncode == 0, r.stderr
    assert last_json(r)["tokens"] == ref_f32


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.long)])  # TP=2: in make test-slow
def test_chat_cli_stops_at_generation_config_eos(eos_checkpoint, tmp_path_factory, tp):
    from export.to_onnx import export

    d, eos, ref_bf16, _ = eos_checkpoint
    man = export(d, tmp_path_factory.mktemp(f"onnx-tp{tp}"), tp=tp, progress=False)
    assert json.loads(man.read_text())["model"]["eos_token_ids"] == [eos]
    for name in ("generation_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        assert (man.parent / name).read_bytes() == (d / name).read_bytes(), name
    assert chat_outputs(man.parent, [PROMPT], n=N_NEW) == [ref_bf16]
