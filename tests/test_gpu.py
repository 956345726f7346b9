"""The runtime's GPU path (torch backend): CUDA-graph replay against the same steps run eagerly, the
GPU against the CPU, and tensor parallelism over NCCL. Run with `make test-gpu` on a GPU machine."""
import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
N_NEW = 48
PROMPTS = [[1, 5, 9], [7], list(range(40, 57)), [3, 1, 4, 1, 5, 9, 2, 6]]

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def chat(model, *args):
    ids = [x for p in PROMPTS for x in ("--prompt-ids", ",".join(map(str, p)))]
    r = subprocess.run([sys.executable, "runtime/chat.py", "--model", str(model), *ids, "--max-tokens", str(N_NEW),
                        "--temperature", "0", "--ignore-eos", "--json", *map(str, args)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    print(r.stderr.strip().splitlines()[-1])  # the speed line
    return json.loads(r.stdout.strip().splitlines()[-1])["outputs"]


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_replay_equals_eager(dtype, exported):
    root = exported("tiny", 1).root
    graphs = chat(root, "--backend", "torch", "--device", "cuda", "--dtype", dtype)
    eager = chat(root, "--backend", "torch", "--device", "cuda", "--dtype", dtype, "--no-cuda-graphs")
    assert graphs == eager


@needs_gpu
def test_gpu_float32_equals_cpu(exported):
    root = exported("tiny", 1).root
    assert chat(root, "--backend", "torch", "--device", "cuda", "--dtype", "float32") == \
        chat(root, "--backend", "torch", "--device", "cpu", "--dtype", "float32")


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_nccl_with_graphs_equals_tp1(exported):
    one = chat(exported("tiny", 1).root, "--backend", "torch", "--device", "cuda", "--dtype", "float32")
    two = chat(exported("tiny", 2).root, "--backend", "torch", "--device", "cuda", "--dtype", "float32")
    assert one == two
