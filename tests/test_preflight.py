"""The preflight: its byte counts against what the export writes, the published model's totals
against its parameter count, and the shortfalls it names before anything is written."""
import json
import re
from pathlib import Path

import pytest

from engines.preflight import engine_bytes
from export import preflight
from export.layout import make_layout
from tests.cli import run_module
from tests.published import PUBLISHED_CONFIG, PUBLISHED_GENERATION_CONFIG, published_weight_map


def _written_by_rank(man) -> tuple[dict[int, int], dict[int, int]]:
    bf16, twins = {}, {}
    for rel, f in man.files.items():
        rank = int(rel.split("/")[0].removeprefix("rank"))
        into = twins if ".fp32." in rel else bf16
        into[rank] = into.get(rank, 0) + f.bytes
    return bf16, twins


@pytest.mark.parametrize("name,tp", [("tiny", 1), ("tiny", 2), ("kv8", 8)])
def test_estimate_matches_what_the_export_writes(exported, name, tp):
    man = exported(name, tp)
    est = preflight.estimate(make_layout(man.config, tp))
    assert man.fp32_twins and est.auto_twins()  # toy models: a CPU run fits, so twins by default
    bf16, twins = _written_by_rank(man)
    for rank in range(tp):
        predicted = {(u, r): b for (u, r), b in est.units.items() if r == rank}
        one = sum(b.written(False) for b in predicted.values())
        both = sum(b.written(True) for b in predicted.values())
        # within 5% per rank: the graphs' own bytes are an allowance (toy graphs are 0.4-9 KB) and
        # every external tensor may be padded to a page, which at toy sizes is a few percent
        assert abs(one - bf16[rank]) <= 0.05 * bf16[rank], (rank, one, bf16[rank])
        assert abs(both - bf16[rank] - twins[rank]) <= 0.05 * (bf16[rank] + twins[rank]), (rank, both, twins[rank])


def _published(tmp_path: Path) -> Path:
    """config.json, generation_config.json and the index of the published model, with empty shard
    files: all the preflight reads."""
    d = tmp_path / "MiniMax-M2.5"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    (d / "generation_config.json").write_text(json.dumps(PUBLISHED_GENERATION_CONFIG))
    wm = published_weight_map()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    for shard in set(wm.values()):
        (d / shard).touch()
    return d


def test_published_model_totals(tmp_path):
    from export.to_onnx import plan_export
    plan = plan_export(_published(tmp_path), tmp_path / "out", tp=8, validate=False)
    est = plan.estimate
    # The model card's 229B parameters, in BF16 (the router in float32, the MTP heads not exported)
    assert 455e9 < est.total(False) < 462e9
    assert not plan.twins and not est.auto_twins()
    per = est.per_rank(False)
    assert per[0] - per[1] == pytest.approx(200064 * 3072 * 2, rel=0.01)  # the embedding (the LM head is split)
    # engines hold all but the experts (inputs): 62 layers x ~25 MB per rank (the float32 router in
    # each MoE form's engine), each rank's 0.15 GB slice of the LM head, and rank 0's 1.2 GB embedding
    eng = engine_bytes(plan.layout)
    assert 1.2e9 < eng[1] < 2.0e9 and eng[0] - eng[1] == pytest.approx(1.23e9, rel=0.01)


def test_preflight_names_each_shortfall_and_writes_nothing(tmp_path):
    ckpt = _published(tmp_path)
    out = Path("/dev/shm") / f"preflight-{tmp_path.name}"  # a RAM disk: never 470 GB free
    r = run_module("engines.preflight", ckpt, "--tp", 8, "--out", out, "--tensorrt", "tensorrt-rtx",
                   "--max-tokens", 32768, "--jobs", 100000, "--gpu-gb", 80)
    assert r.returncode == 1
    need = re.search(r"error: needs (\d+\.\d) GB free at (\S+), has (\d+\.\d) GB", r.stderr)
    assert need and 460 < float(need.group(1)) < 480 and float(need.group(3)) < float(need.group(1))
    assert "export jobs need" in r.stderr and "use --jobs" in r.stderr
    assert re.search(r"rank 0 needs \d+\.\d GB before any KV cache .* --max-tokens", r.stderr)
    assert "| " not in r.stdout and "NO " in r.stdout and "tensorrt-rtx 1.7" in r.stdout
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["MiniMax-M2.5"]
    # with steps of 1024 tokens the GPU plan fits (the memory plan's test has the numbers)
    r = run_module("engines.preflight", ckpt, "--tp", 8, "--out", out, "--tensorrt", "tensorrt-rtx",
                   "--max-tokens", 1024, "--gpu-gb", 80)
    assert "rank 0 needs" not in r.stderr and re.search(r"ok\s+GPU memory at serving", r.stdout)


def test_export_dry_run_reads_no_weights_and_writes_nothing(tmp_path):
    ckpt = _published(tmp_path)  # the shards are empty: reading any would fail
    r = run_module("export.to_onnx", ckpt, "--tp", 8, "--out", tmp_path / "out", "--dry-run")
    assert r.returncode in (0, 1), r.stderr
    total = re.search(r"BF16 graphs: (\d+\.\d+) GB \(rank 0 (\d+\.\d+) GB, ranks 1..7 (\d+\.\d+) GB each\)", r.stdout)
    assert total and 455 < float(total.group(1)) < 462  # 229B parameters in BF16
    assert float(total.group(2)) - float(total.group(3)) == pytest.approx(1.23, abs=0.02)  # the embedding
    assert "FP32 twins: no (auto" in r.stdout and "505 to export" in r.stdout
    assert not (tmp_path / "out").exists()
    r = run_module("export.to_onnx", ckpt, "--tp", 8, "--out", tmp_path / "out")  # without --dry-run: validated
    assert r.returncode == 2 and "error:" in r.stderr and not (tmp_path / "out").exists()
