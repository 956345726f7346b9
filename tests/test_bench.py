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
