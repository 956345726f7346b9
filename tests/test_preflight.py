"""The preflight: its byte counts against what the export writes, the published model's totals
against its parameter count, and the shortfalls it names before anything is written."""
import json
import math
import re
import struct
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


# kv8 at TP=8 (its export, ~30 s of the suite): in make test-slow
@pytest.mark.parametrize("name,tp", [("tiny", 1), ("tiny", 2), pytest.param("kv8", 8, marks=pytest.mark.long)])
def test_estimate_matches_what_the_export_writes(exported, name, tp):
    man = exported(name, tp)
    est = preflight.estimate(make_layout(man.config, tp))
    assert man.fp32_twins and est.auto_twins()  # toy models: a CPU run fits, so twins by default
    bf16, twins = _written_by_rank(man)
    for rank in range(tp):
        predicted = {(u, r): b for (u, r), b in est.units.items() if r == rank}
        one = sum(b.written(False) for b in predicted.values())
        both = sum(b.written(True) for b in predicted.values())
        # within 10% per rank: the graphs' own bytes are an allowance (toy graphs are 0.4-9 KB) and
        # every external tensor is counted with a whole page of padding (an upper bound), which at
        # toy sizes is a few percent (kv8 at TP=8: 12 tensors in a 0.8 MB layer-rank, 5%)
        assert abs(one - bf16[rank]) <= 0.10 * bf16[rank], (rank, one, bf16[rank])
        assert abs(both - bf16[rank] - twins[rank]) <= 0.10 * (bf16[rank] + twins[rank]), (rank, both, twins[rank])
    # Every file the export wrote (the stamps, the manifest, the text files, the lock too) is
    # covered: the estimate is at least what is on disk, and within 15% (toy graphs, stamps and
    # manifest entries are far below their allowances, kv8 at TP=8 11% over; at real width those
    # allowances are a few MB of 460 GB).
    on_disk = sum(f.stat().st_size for f in man.root.rglob("*") if f.is_file())
    assert on_disk <= est_all(man) <= 1.15 * on_disk, (on_disk, est_all(man))


def est_all(man) -> int:
    """What the export's preflight counted for this export, all files included."""
    from export.to_onnx import plan_export
    return plan_export(man.checkpoint_dir(), man.root.parent, man.tp, twins=man.fp32_twins, moe_forms=man.moe.spec(),
                       max_tokens=man.max_tokens).estimate.to_write(man.fp32_twins)


SAFETENSORS_DTYPE = {"fp8": ("F8_E4M3", 1), "scale": ("F32", 4), "float": ("BF16", 2)}


def _published(tmp_path: Path) -> Path:
    """config.json, generation_config.json and the index of the published model, and shards whose
    headers are the published tensors' and whose data is a hole (sparse files: no disk used, and
    reading any weight would give zeros): all the preflight reads."""
    from export.checkpoint import expected_tensors
    from export.config import parse_hf_config

    d = tmp_path / "MiniMax-M2.5"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    (d / "generation_config.json").write_text(json.dumps(PUBLISHED_GENERATION_CONFIG))
    wm = published_weight_map()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    specs = expected_tensors(parse_hf_config(PUBLISHED_CONFIG))
    by_shard: dict[str, dict] = {}
    for name, shard in wm.items():
        if name in specs:  # (the MTP heads are in the index only: never read)
            by_shard.setdefault(shard, {})[name] = specs[name]
    for shard in set(wm.values()):
        header, at = {}, 0
        for name, spec in sorted(by_shard.get(shard, {}).items()):
            dtype, size = SAFETENSORS_DTYPE[spec.kind]
            n = size * math.prod(spec.shape)
            header[name] = {"dtype": dtype, "shape": list(spec.shape), "data_offsets": [at, at + n]}
            at += n
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(d / shard, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.truncate(8 + len(blob) + at)
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
    ckpt = _published(tmp_path)  # the shards' data is a hole: reading any weight gives zeros
    r = run_module("export.to_onnx", ckpt, "--tp", 8, "--out", tmp_path / "out", "--dry-run")
    assert r.returncode in (0, 1), r.stderr
    total = re.search(r"BF16 graphs: (\d+\.\d+) GB \(rank 0 (\d+\.\d+) GB, ranks 1..7 (\d+\.\d+) GB each\)", r.stdout)
    assert total and 455 < float(total.group(1)) < 462  # 229B parameters in BF16
    assert float(total.group(2)) - float(total.group(3)) == pytest.approx(1.23, abs=0.02)  # the embedding
    assert "FP32 twins: no (auto" in r.stdout and "505 to export" in r.stdout
    assert not (tmp_path / "out").exists()


def test_dry_run_and_engines_preflight_refuse_a_truncated_shard(tiny_ckpt, tmp_path):
    """Both read every shard's header (the checkpoint's own validation): a shard cut short, as an
    interrupted copy leaves it, is refused before anything is planned or written."""
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.1.self_attn.q_proj.weight"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for module, args in (("export.to_onnx", ("--dry-run",)), ("engines.preflight", ("--tensorrt", "tensorrt-rtx"))):
        r = run_module(module, ckpt, "--out", tmp_path / "out", *args)
        assert r.returncode == 2, (module, r.stdout, r.stderr)
        assert f"{shard.name}: cannot be read as safetensors" in r.stderr and "truncated" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
