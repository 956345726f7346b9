"""The checkpoint reader: layout checks, clear errors for every kind of bad input, per-rank slices."""
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.checkpoint import Checkpoint, CheckpointError
from export.config import ConfigError
from export.sharding import Shard, ShardingError

Q = "model.layers.1.self_attn.q_proj"


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    return d


def _shard_of(d, name):
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]


def _rewrite(d, name, fn):
    """Replace (fn returns a tensor) or drop (fn returns None) one tensor, keeping the index in step."""
    shard = _shard_of(d, name)
    tensors = load_file(str(d / shard))
    new = fn(tensors[name])
    if new is None:
        del tensors[name]
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        del idx["weight_map"][name]
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    else:
        tensors[name] = new
    save_file(tensors, str(d / shard))


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_valid_checkpoint_and_mtp_skipped(ckpt_copy):
    """use_mtp is declared with no MTP tensors (as published): fine. MTP tensors, when a checkpoint
    has them, are layers past the last decoder layer and are skipped."""
    ck = Checkpoint(ckpt_copy)
    assert ck.config.num_mtp_modules == 3 and not [n for n in ck.weight_map if n not in ck.specs]
    extra = f"model.layers.{ck.config.num_hidden_layers}.enorm.weight"
    shard = _shard_of(ckpt_copy, Q + ".weight")
    tensors = load_file(str(ckpt_copy / shard))
    tensors[extra] = torch.ones(ck.config.hidden_size, dtype=torch.bfloat16)
    save_file(tensors, str(ckpt_copy / shard))
    idx = json.loads((ckpt_copy / "model.safetensors.index.json").read_text())
    idx["weight_map"][extra] = shard
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps(idx))
    ck = Checkpoint(ckpt_copy)
    assert extra in ck.weight_map and extra not in ck.specs


def test_missing_shard(ckpt_copy):
    shard = _shard_of(ckpt_copy, Q + ".weight")
    (ckpt_copy / shard).unlink()
    with pytest.raises(CheckpointError, match=f"{shard}: missing shard"):
        Checkpoint(ckpt_copy)


def test_truncated_shard(ckpt_copy):
    shard = ckpt_copy / _shard_of(ckpt_copy, Q + ".weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated or corrupt"):
        Checkpoint(ckpt_copy)


def test_corrupt_shard_header(ckpt_copy):
    shard = ckpt_copy / _shard_of(ckpt_copy, Q + ".weight")
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated or corrupt"):
        Checkpoint(ckpt_copy)


def test_missing_scale(ckpt_copy):
    _rewrite(ckpt_copy, Q + ".weight_scale_inv", lambda t: None)
    with pytest.raises(CheckpointError, match=f"{Q}.weight_scale_inv: missing.*block scale.*{Q}"):
        Checkpoint(ckpt_copy)


def test_wrong_shape(ckpt_copy):
    _rewrite(ckpt_copy, Q + ".weight", lambda t: t[:-1].contiguous())
    with pytest.raises(CheckpointError, match=rf"{Q}.weight \(in .*\): shape \[255, 256\].*\[256, 256\]"):
        Checkpoint(ckpt_copy)


def test_wrong_dtype(ckpt_copy):
    _rewrite(ckpt_copy, Q + ".weight", lambda t: t.to(torch.bfloat16))
    with pytest.raises(CheckpointError, match=rf"{Q}.weight .*dtype torch.bfloat16, expected torch.float8_e4m3fn"):
        Checkpoint(ckpt_copy)


def test_wrong_scale_dtype(ckpt_copy):
    _rewrite(ckpt_copy, Q + ".weight_scale_inv", lambda t: t.to(torch.bfloat16))
    with pytest.raises(CheckpointError, match=rf"{Q}.weight_scale_inv .*dtype torch.bfloat16, expected torch.float32"):
        Checkpoint(ckpt_copy)


def test_unexpected_tensor(ckpt_copy):
    _rewrite(ckpt_copy, Q + ".weight", lambda t: t)  # keep; add a shared expert the config does not have
    shard = _shard_of(ckpt_copy, Q + ".weight")
    tensors = load_file(str(ckpt_copy / shard))
    tensors["model.layers.1.block_sparse_moe.shared_experts.w1.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(ckpt_copy / shard))
    idx = json.loads((ckpt_copy / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.1.block_sparse_moe.shared_experts.w1.weight"] = shard
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="shared_experts.w1.weight .*unexpected tensor"):
        Checkpoint(ckpt_copy)


def test_missing_config(ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json: not found"):
        Checkpoint(ckpt_copy)


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "llama"}, "model_type is 'llama'.*only 'minimax_m2'"),
    ({"quantization_config": {"quant_method": "awq"}}, "quant_method is 'awq'.*only 'fp8'"),
    ({"quantization_config": None}, "no quantization_config"),
    ({"num_key_value_heads": 3}, r"num_attention_heads \(8\) is not a multiple of num_key_value_heads \(3\)"),
    ({"num_experts_per_tok": 17}, r"num_experts_per_tok \(17\) exceeds num_local_experts \(16\)"),
    ({"hidden_size": -256}, "'hidden_size' must be a positive integer"),
    ({"rotary_dim": 48}, r"rotary_dim \(48\) must be even and in 1..head_dim \(32\)"),
    ({"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported"),
    ({"eos_token_id": 5000}, None),  # config.json's eos is never read while generation_config.json has one
    ({"attn_type_list": [0, 1, 1]}, "attn_type_list must be all 1"),
])
def test_bad_config(ckpt_copy, changes, message):
    _edit_config(ckpt_copy, **changes)
    if message is None:
        Checkpoint(ckpt_copy)
        return
    with pytest.raises(ConfigError, match=message):
        Checkpoint(ckpt_copy)


def test_config_shape_mismatch_is_named(ckpt_copy):
    """A config that disagrees with the weights is caught at the first tensor that does not fit."""
    _edit_config(ckpt_copy, intermediate_size=256)
    with pytest.raises(CheckpointError, match=r"experts\.0\.w1\.weight .*shape \[192, 256\].*\[256, 256\]"):
        Checkpoint(ckpt_copy)


def test_tp_that_does_not_divide(tiny_ckpt):
    ck = Checkpoint(tiny_ckpt)
    with pytest.raises(ShardingError, match=r"TP=3 does not divide num_attention_heads=8, num_key_value_heads=4; "
                                            r"valid TP sizes for this model: \[1, 2, 4\]"):
        ck.layer(0, shard=Shard(tp=3, rank=0))
    with pytest.raises(ShardingError, match="TP=8 does not divide num_key_value_heads=4;"):
        ck.layer(0, shard=Shard(tp=8, rank=0))
    odd = dataclasses.replace(ck.config, intermediate_size=190, num_experts=6)
    with pytest.raises(ShardingError, match="TP=4 does not divide intermediate_size=190;"):
        Shard(tp=4).check(odd)
    with pytest.raises(ShardingError, match="TP=4 does not divide num_local_experts=6;"):
        Shard(tp=4, expert_split="expert").check(odd)


def test_reading_a_layer_touches_only_its_shard(ckpt_copy):
    """Layer 0 reads with every other shard truncated; layer 2 then fails, naming its shard."""
    ck = Checkpoint(ckpt_copy, validate=False)
    own = {_shard_of(ckpt_copy, n) for n in ck.specs if n.startswith("model.layers.0.")}
    assert len(own) == 1
    for f in ckpt_copy.glob("*.safetensors"):
        if f.name not in own:
            f.write_bytes(f.read_bytes()[:100])
    lw = ck.layer(0, torch.bfloat16)
    assert lw.w13.shape == (16, 384, 256)
    with pytest.raises(CheckpointError, match=_shard_of(ckpt_copy, "model.layers.2.self_attn.q_proj.weight")):
        ck.layer(2, torch.bfloat16)


@pytest.mark.parametrize("tp,split", [(2, "intermediate"), (4, "intermediate"), (2, "expert"), (4, "expert")])
def test_rank_slices_reassemble_the_layer(tiny_ckpt, tp, split):
    """Each rank reads only its slice; the slices put back together are the whole layer, bit for bit."""
    ck = Checkpoint(tiny_ckpt)
    full = ck.layer(1, torch.bfloat16)
    parts = [ck.layer(1, torch.bfloat16, Shard(tp, r, split)) for r in range(tp)]
    cat = lambda f, dim: torch.cat([f(p) for p in parts], dim)
    assert torch.equal(cat(lambda p: p.q_proj, 0), full.q_proj)
    assert torch.equal(cat(lambda p: p.k_proj, 0), full.k_proj)
    assert torch.equal(cat(lambda p: p.v_proj, 0), full.v_proj)
    assert torch.equal(cat(lambda p: p.o_proj, 1), full.o_proj)
    assert torch.equal(cat(lambda p: p.q_norm, 0), full.q_norm)
    assert torch.equal(cat(lambda p: p.k_norm, 0), full.k_norm)
    for p in parts:
        assert torch.equal(p.gate, full.gate) and torch.equal(p.bias, full.bias)
    I = ck.config.intermediate_size
    if split == "intermediate":
        assert torch.equal(cat(lambda p: p.w13[:, : I // tp], 1), full.w13[:, :I])
        assert torch.equal(cat(lambda p: p.w13[:, I // tp:], 1), full.w13[:, I:])
        assert torch.equal(cat(lambda p: p.w2, 2), full.w2)
    else:
        assert [p.expert_offset for p in parts] == [r * 16 // tp for r in range(tp)]
        assert torch.equal(cat(lambda p: p.w13, 0), full.w13)
        assert torch.equal(cat(lambda p: p.w2, 0), full.w2)
