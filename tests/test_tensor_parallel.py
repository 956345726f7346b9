"""Tensor parallelism across processes on the CPU (gloo): same tokens as TP=1 and as transformers,
and a run that loses a process ends with an error in bounded time, leaving no process behind."""
import json
import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from runtime.config import EngineConfig
from runtime.llm_engine import LLMEngine
from runtime.sampling import SamplingParams
from export.manifest import ManifestError
from tests.cli import chat_cmd
from tests.cli import run_chat as chat
from tests.reference import bf16_weight_reference, greedy

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
N_NEW = 24


def ids_args(prompts):
    return [x for p in prompts for x in ("--prompt-ids", ",".join(map(str, p)))]


def workers_of(manifest_root) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and "runtime.distributed" in p.info["cmdline"]
            and any(str(manifest_root) in c for c in p.info["cmdline"])]


@pytest.mark.parametrize("name,backend", [("tiny", "ort"), pytest.param("alt", "ort", marks=pytest.mark.long),
                                          ("tiny", "torch")])
def test_tp2_equals_tp1_and_transformers(name, backend, exported, hf_model):
    """ort runs the FP32 twins, which hold the export's BF16-rounded weights; the torch backend in
    float32 holds the checkpoint's exact weights: each is compared with transformers holding the same."""
    ref_model = bf16_weight_reference(hf_model(name)) if backend == "ort" else hf_model(name)
    prompts = [[1, 5, 9], [7], list(range(40, 57))]
    want = [greedy(ref_model, p, N_NEW) for p in prompts]
    # TP=1 in this process (chat.py's TP=1 run against transformers: test_runtime.py), TP=2 through
    # chat.py, which starts and stops its rank
    one = LLMEngine(exported(name, 1).root, EngineConfig(backend=backend))
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)
    assert [s.output for s in one.generate(prompts, params)] == want, (1, backend)
    man = exported(name, 2)
    # the torch run with async scheduling: each step's greedy ids reach rank 1 by broadcast from rank 0's
    # device tokens (runtime/executor.py Carried), not with the step's metadata
    extra = ["--async-scheduling"] if backend == "torch" else []
    r = chat("--model", man.root, "--backend", backend, *ids_args(prompts), "--max-tokens", N_NEW,
             "--temperature", 0, "--ignore-eos", "--json", *extra)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["outputs"] == want, (2, backend)
    overlapped = int(re.search(r"steps \((\d+) overlapped\)", r.stderr).group(1))
    assert (overlapped > 0) == bool(extra), r.stderr
    assert not workers_of(man.root)  # clean shutdown: no rank left running


def test_seeded_sampling_is_the_same_at_tp1_and_tp2(exported):
    """The LM head is vocabulary-parallel: with top-k each rank sends its top k candidates, without it
    the full logits; either way a seed gives the tokens of TP=1 (float32 twins on both)."""
    prompts = [[1, 5, 9], list(range(40, 57))]
    outs = {}
    for tp in (1, 2):
        e = LLMEngine.start(exported("tiny", tp).root, EngineConfig(backend="ort"))
        try:
            for top_k in (5, 0):
                p = SamplingParams(temperature=1.0, top_k=top_k, top_p=1.0, seed=11, max_tokens=12, ignore_eos=True)
                outs[tp, top_k] = [s.output for s in e.generate(prompts, p)]
        finally:
            e.close()
    assert outs[1, 5] == outs[2, 5] and outs[1, 0] == outs[2, 0]
    assert outs[1, 5] != outs[1, 0]  # the two paths sampled differently: both were exercised


@pytest.mark.long  # eight rank processes on two cores, two more exports: minutes, `make test-slow`
def test_tp8_eight_gloo_ranks_equal_tp1_and_transformers(exported, hf_model):
    """The user's configuration on the CPU: 8 KV heads, TP=8 -- one KV head per rank, QK-norm sums of
    squares all-reduced over eight ranks, intermediate slices of 32 rows (inside FP8 blocks)."""
    ref_model = bf16_weight_reference(hf_model("kv8"))
    prompts = [[1, 5, 9], list(range(40, 57))]
    want = [greedy(ref_model, p, 16) for p in prompts]
    for tp in (1, 8):
        man = exported("kv8", tp)
        assert man.config.num_key_value_heads // man.tp == (8 // tp)
        r = chat("--model", man.root, *ids_args(prompts), "--max-tokens", 16, "--temperature", 0, "--ignore-eos",
                 "--json", timeout=600)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1])["outputs"] == want, tp
    assert not workers_of(exported("kv8", 8).root)


def test_tp_export_needs_its_ranks(exported):
    with pytest.raises(ManifestError, match="this export is for TP=2"):
        LLMEngine(exported("tiny", 2).root, EngineConfig())


def test_one_named_gpu_for_a_tp_group_is_refused_before_any_rank_starts(exported):
    """--device cuda:1 at TP=2 would put both ranks on one GPU; refused up front (no CUDA needed)."""
    man = exported("tiny", 2)
    with pytest.raises(ValueError, match="names one GPU.*CUDA_VISIBLE_DEVICES"):
        LLMEngine.start(man.root, EngineConfig(backend="torch", device="cuda:1"))
    assert not workers_of(man.root)


def test_rank0_failing_at_start_leaves_no_rank_and_no_group(exported, tmp_path):
    """Rank 0 raises while the other rank loads (an unreadable tokenizer.json, read by rank 0 only):
    the error names the file, no worker outlives it, and the same process can start an engine again."""
    import shutil

    src = exported("tiny", 2).root
    broken = tmp_path / "tp2"
    shutil.copytree(src, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a tokenizer"):
        LLMEngine.start(broken, EngineConfig(backend="ort"))
    assert not workers_of(broken)
    e = LLMEngine.start(src, EngineConfig(backend="ort"))
    try:
        out = e.generate([[1, 5, 9]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert len(out[0].output) == 3
    finally:
        e.close()
    assert not workers_of(src)


def _start_long_run(man, settle_s=3.0):
    proc = subprocess.Popen(chat_cmd("--model", man.root, "--prompt-ids", "1,5,9", "--max-tokens", 3000,
                                     "--temperature", 0, "--ignore-eos", "--json"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not workers_of(man.root):
        time.sleep(0.05)
    workers = workers_of(man.root)
    assert workers, "the worker rank did not start"
    time.sleep(settle_s)  # 3 s: let generation get going; 0: kill it before the rendezvous
    assert proc.poll() is None
    return proc, workers


@pytest.mark.parametrize("settle_s", [3.0, 0.0], ids=["mid-run", "before-rendezvous"])
def test_killed_worker_ends_the_run(exported, settle_s):
    """A rank lost before the group's rendezvous once left rank 0 waiting out the collective timeout."""
    man = exported("tiny", 2)
    proc, workers = _start_long_run(man, settle_s)
    t0 = time.time()
    workers[0].send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    assert "tensor-parallel rank 1" in err and "exited" in err
    assert elapsed < 10, elapsed
    assert not workers_of(man.root)


def test_killed_rank0_takes_workers_down(exported):
    man = exported("tiny", 2)
    proc, workers = _start_long_run(man)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "a worker outlived rank 0"
