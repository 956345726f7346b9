"""What the published MiniMax-M2.5 files hold, written down independently of the code under test:
config.json's keys and values, generation_config.json, tokenizer_config.json, the shard naming and
the tensor names. Tests compare the toy checkpoints and the loaders against these."""
from __future__ import annotations

PUBLISHED_CONFIG = {
    "architectures": ["MiniMaxM2ForCausalLM"],
    "attn_type_list": [1] * 62,
    "auto_map": {"AutoConfig": "configuration_minimax_m2.MiniMaxM2Config",
                 "AutoModelForCausalLM": "modeling_minimax_m2.MiniMaxM2ForCausalLM"},
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "intermediate_size": 1536,
    "max_position_embeddings": 196608,
    "model_type": "minimax_m2",
    "mtp_transformer_layers": 1,
    "num_attention_heads": 48,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 62,
    "num_key_value_heads": 8,
    "num_local_experts": 256,
    "num_mtp_modules": 3,
    "qk_norm_type": "per_layer",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
                            "weight_block_size": [128, 128],
                            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]},
    "rms_norm_eps": 1e-06,
    "rope_theta": 5000000,
    "rotary_dim": 64,
    "scoring_func": "sigmoid",
    "shared_intermediate_size": 0,
    "tie_word_embeddings": False,
    "transformers_version": "4.46.1",
    "use_cache": True,
    "use_mtp": True,
    "use_qk_norm": True,
    "use_routing_bias": True,
    "vocab_size": 200064,
}
PUBLISHED_GENERATION_CONFIG = {"bos_token_id": 200019, "eos_token_id": 200020, "do_sample": True,
                               "temperature": 1.0, "top_p": 0.95, "top_k": 40}
PUBLISHED_TOKENIZER_CONFIG = {"bos_token": "]~!b[", "eos_token": "[e~[", "unk_token": "]!d~["}
PUBLISHED_SPECIALS = {"]!p~[": 200000, "]~b]": 200019, "[e~[": 200020, "]!d~[": 200021, "]~!b[": 200034,
                      "<think>": 200050, "</think>": 200051, "<minimax:tool_call>": 200052,
                      "</minimax:tool_call>": 200053}
NUM_SHARDS, SHARD_COUNT_IN_NAME = 125, 126
NUM_TENSORS = 96103


def shard_name(i: int, count_in_name: int = SHARD_COUNT_IN_NAME) -> str:
    return f"model-{i:05d}-of-{count_in_name:05d}.safetensors"


def published_tensor_names(layers: int, experts: int) -> list[str]:
    """Every tensor name of the published checkpoint (from the model card's layout, not from the
    project's code)."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for n in range(layers):
        p = f"model.layers.{n}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                  p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight",
                  p + "block_sparse_moe.gate.weight", p + "block_sparse_moe.e_score_correction_bias"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names += [p + f"self_attn.{proj}.weight", p + f"self_attn.{proj}.weight_scale_inv"]
        for e in range(experts):
            for w in ("w1", "w2", "w3"):
                names += [p + f"block_sparse_moe.experts.{e}.{w}.weight",
                          p + f"block_sparse_moe.experts.{e}.{w}.weight_scale_inv"]
    return names


def published_weight_map(layers: int = 62, experts: int = 256) -> dict[str, str]:
    """The names spread over 125 shards named -of-00126, layer by layer as published."""
    names = published_tensor_names(layers, experts)
    per_shard = -(-len(names) // NUM_SHARDS)
    return {name: shard_name(i // per_shard) for i, name in enumerate(names)}
