"""The memory plan: its weight bytes against what the export actually writes, the published model's
numbers at TP=8 on 80 GB GPUs, the command line, and the runtime sizing its KV cache from it."""
import json

import pytest

from engines import memory_plan
from export.config import parse_hf_config
from runtime.config import EngineConfig
from runtime.kv_cache import bytes_per_block
from runtime.llm_engine import LLMEngine
from tests.cli import run_module
from tests.published import PUBLISHED_CONFIG, PUBLISHED_GENERATION_CONFIG


def _written(man, rank: int, prefix: str) -> int:
    """Bytes the export wrote for one rank's units starting with `prefix` (weights files and graphs,
    where the small tensors sit inline)."""
    return sum(f.bytes for rel, f in man.files.items()
               if rel.startswith(f"rank{rank}/{prefix}") and not rel.endswith(".fp32.weights")
               and not rel.endswith(".fp32.onnx"))


# kv8 at TP=8 (its export, ~30 s of the suite): in make test-slow
@pytest.mark.parametrize("name,tp", [("tiny", 1), ("tiny", 2), pytest.param("kv8", 8, marks=pytest.mark.long)])
def test_weight_bytes_match_what_the_export_writes(exported, name, tp):
    man = exported(name, tp)
    per_layer = memory_plan.layer_rank_bytes(man.config, tp)
    for rank in range(tp):
        for n in range(man.config.num_hidden_layers):
            written = _written(man, rank, f"layers.{n}.")
            # graphs' own bytes (nodes, names) come on top: a few percent at toy sizes
            assert per_layer <= written <= per_layer * 1.05 + 64 * 1024, (rank, n, per_layer, written)
    ranks = memory_plan.plan(man.config, tp, 80e9)
    for r in ranks:  # the embedding on rank 0; every rank its vocabulary slice of the LM head
        glob = _written(man, r.rank, "embed") + _written(man, r.rank, "head")
        assert r.global_weights <= glob <= r.global_weights * 1.05 + 64 * 1024, r


def test_published_model_at_tp8_on_80gb():
    cfg = parse_hf_config(PUBLISHED_CONFIG)
    ranks = memory_plan.plan(cfg, 8, 80e9, 0.9, max_tokens=1024, batch=8)
    assert all(r.weights <= 60e9 for r in ranks)  # the embedding (rank 0) and LM-head slices included
    # 62 x (11 MB attention + 3 MB router + 906 MB experts), measured engines 928 MB per layer-rank
    assert 0.9e9 < memory_plan.layer_rank_bytes(cfg, 8) < 0.93e9
    assert ranks[0].kv_per_token == 62 * 2 * 1 * 128 * 2
    assert min(r.kv_tokens for r in ranks) == ranks[0].kv_tokens > 100_000


def test_cli_names_the_shortfall(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    (tmp_path / "generation_config.json").write_text(json.dumps(PUBLISHED_GENERATION_CONFIG))
    r = run_module("engines.memory_plan", "--model", tmp_path, "--tp", 8, "--max-tokens", 32768)
    assert r.returncode == 1 and "| 0 | 58.4 |" in r.stdout
    assert "rank 0 needs" in r.stderr and "lower --max-tokens" in r.stderr
    r = run_module("engines.memory_plan", "--model", tmp_path, "--tp", 8, "--max-tokens", 1024)
    assert r.returncode == 0 and "| 1..7 | 57.2 |" in r.stdout


def test_runtime_sizes_its_kv_cache_from_the_plan(exported):
    man = exported("tiny", 1)
    c = EngineConfig(gpu_memory_utilization=0.5, gpu_memory_gb=4.0, max_num_seqs=8)
    engine = LLMEngine(man.root, c)
    ranks = memory_plan.plan(man.config, 1, 4e9, 0.5, man.max_tokens, 8, man.moe)
    cfg = man.config
    per_block = bytes_per_block(cfg.num_hidden_layers, c.block_size, cfg.num_key_value_heads, cfg.head_dim,
                                engine.backend.dtype)
    assert engine.kv.num_blocks == min(r.kv_cache for r in ranks) // per_block > 0
    with pytest.raises(ValueError, match="leaves no KV cache"):
        LLMEngine(man.root, EngineConfig(gpu_memory_utilization=0.5, gpu_memory_gb=0.5))


def test_an_export_without_a_block_form_version_is_planned_as_the_one_pass_form(exported, tmp_path):
    """Exports made before the two-pass block form record no version: their graphs gather every
    expert's padded blocks, ceil(T*k/128) + E of them, and the plan must size that, not the new form."""
    import shutil

    from export.manifest import Manifest
    from export.moe_forms import ShardShape, blocks

    man = exported("tiny", 1)
    old = tmp_path / "tp1"
    shutil.copytree(man.root, old)
    d = json.loads((old / "manifest.json").read_text())
    assert d.pop("moe_block_form") == 2
    (old / "manifest.json").write_text(json.dumps(d))
    was = Manifest.load(old)
    assert was.moe.block_form == 1 and man.moe.block_form == 2
    s = ShardShape.of(man.config, 1, man.expert_split)
    T = man.max_tokens
    assert blocks(s, T, version=1) == -(-T * s.top_k // 128) + s.experts
    ranks = lambda m: memory_plan.plan(m.config, 1, 80e9, 0.9, T, 8, m.moe, m.expert_split)
    assert "block" in man.moe.forms and ranks(was)[0].scratch != ranks(man)[0].scratch
    # At the published shape, TP=8, 2048-token steps, the one-pass form's activations were planned at
    # 2.5 GB before the two-pass form existed (the figure the runbook gave then).
    from export.moe_forms import MoeSchedule, modeled_schedule

    cfg = parse_hf_config(PUBLISHED_CONFIG)
    sched = modeled_schedule(cfg, 8, "intermediate", 2048)
    one_pass = MoeSchedule(sched.ranges, sched.source, block_form=1)
    assert round(memory_plan.plan(cfg, 8, 80e9, 0.9, 2048, 8, one_pass)[0].scratch / 1e9, 1) == 2.5
