"""The torch backend holds each layer-rank's weights once, through the real load path (checkpoint ->
manifest -> TorchBackend): its unique storages against the memory plan's weight bytes, no weight
held in two storages, only the MoE forms the export scheduled; on a GPU, the allocator's count after
the load against the plan."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engines import memory_plan
from export.manifest import Manifest
from export.model import Moe
from runtime.backends.pytorch import TorchBackend

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def storages(backend: TorchBackend) -> tuple[dict[tuple, torch.Tensor], dict[tuple, torch.Tensor]]:
    """The distinct storages under every module's parameters and under its buffers, keyed by
    (device, address), each with one tensor that uses it."""
    params, buffers = {}, {}
    for m in backend.modules.values():
        for table, tensors in ((params, m.parameters()), (buffers, m.buffers())):
            for t in tensors:
                s = t.untyped_storage()
                table.setdefault((str(t.device), s.data_ptr()), t)
    return params, buffers


def storage_bytes(found: dict) -> int:
    return sum(t.untyped_storage().nbytes() for t in found.values())


def rope_buffer_bytes(cfg) -> int:
    """The backend's only tensors that are not weights: each layer's RoPE frequencies (float32,
    rotary_dim / 2 of them)."""
    return cfg.num_hidden_layers * cfg.rotary_dim // 2 * 4


def assert_no_weight_twice(params: dict) -> None:
    """Distinct storages never hold the same bytes (a second copy of one checkpoint tensor would)."""
    seen = {}
    for key, t in params.items():
        s = t.untyped_storage()
        raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(s).cpu().numpy().tobytes()
        digest = hashlib.sha256(raw).hexdigest()
        assert digest not in seen, f"{tuple(t.shape)} {t.dtype}: the same bytes in two storages ({seen.get(digest)})"
        seen[digest] = tuple(t.shape)


def check_held_once(man, device: str = "cpu") -> TorchBackend:
    cfg = man.config
    for rank in range(man.tp):
        backend = TorchBackend(man, rank, device, torch.bfloat16)
        params, buffers = storages(backend)
        plan = memory_plan.plan(cfg, man.tp, 80e9, moe=man.moe, expert_split=man.expert_split)[rank]
        # Exact: the plan counts every weight's BF16 bytes (router float32) once, as the export writes them.
        assert storage_bytes(params) == plan.weights, (rank, storage_bytes(params), plan.weights)
        assert storage_bytes(buffers) == rope_buffer_bytes(cfg)
        assert_no_weight_twice(params)
        # Only the scheduled forms, and every form's module on the layer's one copy of the experts.
        assert set(backend.modules) == set(man.on_rank(rank))
        for n in range(cfg.num_hidden_layers):
            moes = [sub for name, m in backend.modules.items() if name.startswith(f"layers.{n}.")
                    for sub in m.modules() if isinstance(sub, Moe)]
            assert sorted(m.form for m in moes) == sorted(man.moe.forms)
            assert len({m.w13.data_ptr() for m in moes}) == len({m.w2.data_ptr() for m in moes}) == 1
    return backend


@pytest.mark.parametrize("tp", [1, 2])
def test_export_weights_held_once_as_planned(exported, tp):
    check_held_once(exported("tiny", tp))


def test_expert_split_and_a_schedule_without_dense(checkpoints, tmp_path):
    """The other expert split, and a schedule that leaves a form out: that form is not built (the
    manifest has the layout of the export; bench/real_scale.py writes it without the graphs)."""
    from bench.real_scale import write_load_manifest

    man = write_load_manifest(checkpoints["tiny"], tmp_path, tp=2, expert_split="expert", moe_forms="gather:4,block")
    assert man.moe.forms == ("gather", "block")
    backend = check_held_once(man)
    assert not any("dense" in name for name in backend.modules)


def measure_gpu_load(root: str) -> None:
    """Print the allocator's count over a load of the export at `root`, its buffers' bytes and the
    plan's weights, as JSON (run in a fresh process: what earlier tests left cached on the device,
    workspaces and pools, must not count)."""
    man = Manifest.load(root)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    backend = check_held_once(man, "cuda")
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    buffers = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes()
               for m in backend.modules.values() for b in m.buffers()}
    assert all(t.device.type == "cuda" for t in storages(backend)[0].values())
    plan = memory_plan.plan(man.config, 1, 80e9, moe=man.moe)[0].weights
    print(json.dumps({"held": held, "buffers": sum(buffers.values()), "plan": plan}))


@pytest.mark.gpu
@needs_gpu
def test_gpu_memory_after_load_within_5_percent_of_the_plan(exported):
    """What the CUDA allocator holds after the load against the plan's weights: within 5% (its blocks
    round every tensor up to 512 bytes; the toy has ~40 small tensors per layer), and the same storage
    counts as on the CPU. Buffers are no weights: the RoPE frequencies (the plan's reserve holds them)."""
    root = exported("tiny", 1).root
    r = subprocess.run([sys.executable, "-c", f"from tests.test_weights_once import measure_gpu_load as f; f({str(root)!r})"],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert abs(m["held"] - m["buffers"] - m["plan"]) <= 0.05 * m["plan"], m
