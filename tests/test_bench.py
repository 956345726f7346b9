"""Every benchmark part that runs on a CPU, once, on the toy model at small sizes (`python -m bench
--cpu --toy`): a part that crashes fails here. No timings are asserted (two shared cores say nothing)."""
import json

import pytest

from bench.__main__ import CPU_PARTS, GPU_PARTS
from tests.cli import run_module

# the part name each CPU part writes its rows under (bench/*.py: Results.add)
ROW_PART = {"export": "export", "moe-cpu": "moe", "engine-memory": "engine-memory", "host": "host"}


@pytest.mark.long  # ~1.5 min of the benchmarks' own work (it exports the toy twice): `make test-slow`
def test_cpu_parts_run_on_the_toy(tmp_path):
    r = run_module("bench", "--cpu", "--toy", "--out", tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"export_time_vs_floor", "moe_forms", "layer_rank_gpu_gb", "host_vs_shortest"} <= summary.keys()
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert set(CPU_PARTS) == set(ROW_PART)
    assert {ROW_PART[p] for p in CPU_PARTS} <= {row["part"] for row in rows}
    assert not (tmp_path / "moe_forms.json").exists()  # a smoke run saves no schedule


def test_gpu_parts_refused_cleanly_without_a_gpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    r = run_module("bench", "--parts", GPU_PARTS[0])
    assert r.returncode == 2 and "need an NVIDIA GPU" in r.stderr


def test_prefill_widths_must_be_presets():
    r = run_module("bench", "--parts", "prefill", "--prefill-widths", "rank8,rank9")
    assert r.returncode == 2 and "not presets of export/tiny.py: ['rank9']" in r.stderr


def test_prefill_forms_must_be_known():
    r = run_module("bench", "--parts", "prefill", "--prefill-forms", "grouped,gather")
    assert r.returncode == 2 and "not among grouped, grouped-eager, block, block-eager, dense: ['gather']" in r.stderr


@pytest.mark.slow
def test_constrained_part_runs_on_the_toy(tmp_path):
    """The GPU part `constrained` in its --toy form (CPU): its rows are written, a free step sends no
    extras and a constrained one masks every step (the part checks both and fails otherwise)."""
    r = run_module("bench", "--parts", "constrained", "--toy", "--out", tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    decode = [row for row in rows if row["part"] == "constrained" and row["what"] == "decode"]
    assert {(row["batch"], row["constrained"]) for row in decode} == {(1, False), (1, True), (2, False), (2, True)}
    assert all((row["extras_steps"] > 0) == row["constrained"] for row in decode)
    assert any(row["what"] == "compile" for row in rows)


def test_prefill_shares_on_a_cpu_model(tmp_path):
    """The prefill part's profile (bench/prefill_parts.py) on the toy model (CPU, torch backend, the
    MoE's module form): every op of the whole prefill is given to a part of the model, each part the
    toy computes gets time, and the parts sum to the profile's own total of op time."""
    import torch
    from dataclasses import replace
    from torch.autograd import DeviceType

    from bench import prefill_parts
    from bench.step import RandomWeights, write_export
    from export.config import parse_hf_config
    from export.tiny import PRESETS, hf_config
    from runtime.backends.pytorch import TorchBackend
    from runtime.config import EngineConfig
    from runtime.llm_engine import LLMEngine

    spec = replace(PRESETS["tiny"], num_hidden_layers=2)
    cfg = parse_hf_config(hf_config(spec))
    chunk = 64
    manifest = write_export(cfg, tmp_path, max_tokens=chunk, text_spec=spec)
    backend = TorchBackend(manifest, 0, "cpu", torch.bfloat16, checkpoint=RandomWeights(cfg, device="cpu"))
    engine = LLMEngine(str(tmp_path), EngineConfig(backend="torch", device="cpu", dtype="bfloat16", kv_cache_gb=0.02,
                                                   max_num_seqs=1, cuda_graphs=False, max_num_batched_tokens=chunk),
                       backend=backend)
    prompt = torch.randint(0, spec.n_regular_tokens, (3 * chunk,), generator=torch.Generator().manual_seed(0)).tolist()
    try:
        prof, wall = prefill_parts.profiled_prefill(engine, prompt)
    finally:
        engine.close()
    events = prof.events()
    parts, info = prefill_parts.part_seconds(prof, "cpu")
    p = dict(parts=parts, total=sum(parts.values()), wall=wall, **info)
    assert set(p["parts"]) == set(prefill_parts.PARTS)
    # independent total: every aten op's own time, straight from the profiler's events
    total = sum(fe.self_cpu_time_total for fe in events if fe.device_type == DeviceType.CPU
                and fe.activity_type == "cpu_op") / 1e6
    assert abs(p["total"] - total) <= 1e-9 * max(total, 1)  # float sums of the same numbers, in another order
    row = prefill_parts.shares_row(p, ttft=p["wall"])
    assert abs(sum(row["share"].values()) - 1) < 1e-3  # each share rounded to 4 places: 7 * 5e-5
    # the toy computes every part: each has time (the embedding, sampling and step inputs are "other")
    assert all(v > 0 for v in p["parts"].values()), p["parts"]
    assert 0 < row["kernel_vs_ttft"] <= 1


def test_enclosing_ranges_of_a_launch():
    """The host ranges open at each launch time (bench/prefill_parts.py: kernels with no linked op),
    on hand-made nested intervals: the innermost first, none after the last has closed."""
    from bench.prefill_parts import enclosing
    intervals = [(0, 10, "a"), (1, 4, "b"), (2, 3, "c"), (5, 9, "d"), (12, 13, "e")]
    assert enclosing(intervals, [6, 2.5, 4.5, 11, 0, 12.5]) == [["d", "a"], ["c", "b", "a"], ["a"], [], ["a"], ["e"]]
