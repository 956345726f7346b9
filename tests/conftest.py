"""Shared fixtures: toy checkpoints written once per session, transformers references cached."""
from __future__ import annotations

import functools
import os
from pathlib import Path

# One OpenMP thread for torch, here and in every process the tests start (chat.py, servers, ranks,
# exports inherit the environment; ONNX Runtime keeps its own pool). The CPU path's ops are tiny, and
# with two threads on the suite's two shared cores each parallel region waits for a descheduled
# thread: SDPA on a 60-token context took 14 ms instead of 0.1 ms, a toy decode step 90-240 ms
# instead of 20-40 ms. Set before torch is imported, which reads it once.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from export.manifest import Manifest
from export.tiny import PRESETS, write_checkpoint

# The embedded default, and a second shape that differs in every way the issue names (layers,
# experts, top-k, heads-to-KV ratio, rotary dim, vocabulary).
CONFIGS = ["tiny", "alt", "kv8"]  # kv8: 8 KV heads, for TP=8 (one KV head per rank)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: write_checkpoint(root / name, PRESETS[name], seed=0) for name in CONFIGS}


@pytest.fixture(scope="session")
def tiny_ckpt(checkpoints) -> Path:
    return checkpoints["tiny"]


@pytest.fixture(scope="session")
def hf_model(checkpoints, tmp_path_factory):
    """hf_model(name, dtype) -> transformers' MiniMaxM2ForCausalLM on that checkpoint (cached)."""
    scratch = tmp_path_factory.mktemp("hf")

    @functools.cache
    def get(name: str, dtype: torch.dtype = torch.float32):
        from tests.reference import load_transformers
        return load_transformers(checkpoints[name], dtype, scratch)

    return get


# Every MoE form runs in the tests' short prompts and small batches (the modeled default gives the
# toy models' gather form one token only).
TEST_MOE_FORMS = "gather:4,dense:16,block"


@pytest.fixture(scope="session")
def exported(checkpoints, tmp_path_factory):
    """exported(name, tp) -> Manifest of that checkpoint's export, made once per session."""
    root = tmp_path_factory.mktemp("onnx")

    @functools.cache
    def get(name: str, tp: int = 1) -> Manifest:
        from export.to_onnx import export
        return Manifest.load(export(checkpoints[name], root / name, tp=tp, progress=False, moe_forms=TEST_MOE_FORMS))

    return get
