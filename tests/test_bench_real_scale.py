"""The real-scale benchmark part's whole code path on the CPU, on a tiny preset: checkpoint written,
manifest written, LLMEngine loaded through it, memory against the plan, decode at two batch sizes,
a chunked long prompt and the decode after it, the command lines. No timing asserts."""
import json

import pytest
import torch

from bench import real_scale


def rows(results_dir) -> list[dict]:
    return [json.loads(line) for line in (results_dir / "results.jsonl").read_text().splitlines()]


def test_real_scale_part_on_the_cpu(tmp_path):
    real_scale.main(["--preset", "tiny", "--layers", "2", "--device", "cpu",
                     "--batches", "1,2", "--steps", "2", "--prompt", "16", "--long-prompt", "200,90", "--chunk", "64",
                     "--work", str(tmp_path / "work"), "--results", str(tmp_path)])
    got = rows(tmp_path)
    by_what = {}
    for r in got:
        assert r["part"] == real_scale.PART
        by_what.setdefault(r.get("what"), []).append(r)
    assert by_what["checkpoint_written"][0]["layers"] == 2
    assert by_what["load"][0]["layers"] == 2
    mem = by_what["memory_after_load"][0]
    assert mem["held_vs_plan"] == 1.0  # bf16 weights held once: exactly the plan's bytes
    assert [r["batch"] for r in by_what["decode"]] == [1, 2]
    assert all(r["tokens_per_s"] > 0 and r["context"] > 16 for r in by_what["decode"])
    assert [r["prompt"] for r in by_what["long_prompt"]] == [90, 200]  # shortest first
    long = by_what["long_prompt"][1]
    assert long["output_tokens"] == 1 and long["chunk"] == 64
    assert len(by_what["decode_after"]) == 1 and by_what["decode_after"][0]["context"] > 200  # after the longest
    cmds = by_what["commands"][0]
    manifest = tmp_path / "work" / "tiny-2l" / "tp1"
    assert f"--model {manifest}" in cmds["chat"] and (manifest / "manifest.json").is_file()
    # A second run reuses the checkpoint it wrote.
    real_scale.main(["--preset", "tiny", "--layers", "2", "--device", "cpu", "--batches", "1", "--steps", "1",
                     "--prompt", "8", "--long-prompt", "40", "--chunk", "64", "--work", str(tmp_path / "work"),
                     "--results", str(tmp_path / "again")])
    assert not any(r.get("what") == "checkpoint_written" for r in rows(tmp_path / "again"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without a GPU")
def test_real_scale_part_skips_without_a_gpu(tmp_path):
    real_scale.main(["--preset", "tiny", "--work", str(tmp_path / "work"), "--results", str(tmp_path)])
    assert [r.get("skipped") for r in rows(tmp_path)] == ["no GPU here (--device cpu runs it on the CPU)"]
    assert not (tmp_path / "work").exists()
