"""Independent references for the tests: transformers' MiniMaxM2ForCausalLM, and a block-by-block
numpy dequantizer that shares no code with export/fp8.py (ml_dtypes decodes the FP8 bytes)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file


def dequant_reference(fp8_bytes: np.ndarray, scale_inv: np.ndarray, block=(128, 128)) -> np.ndarray:
    """fp8_bytes: uint8 [R, C] holding float8_e4m3fn; loops over scale blocks, partial ones included."""
    values = fp8_bytes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    out = np.empty_like(values)
    rows, cols = values.shape
    for bi, r in enumerate(range(0, rows, block[0])):
        for bj, c in enumerate(range(0, cols, block[1])):
            out[r:r + block[0], c:c + block[1]] = values[r:r + block[0], c:c + block[1]] * scale_inv[bi, bj]
    return out


def read_fp8_numpy(ckpt: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 bytes, float32 scale_inv) of a quantized weight, read with safetensors' numpy API."""
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = []
    for n in (name + ".weight", name + ".weight_scale_inv"):
        with safe_open(str(ckpt / weight_map[n]), framework="pt") as f:
            t = f.get_tensor(n)
        tensors.append(t.view(torch.uint8).numpy() if t.dtype == torch.float8_e4m3fn else t.numpy())
    return tensors[0], tensors[1]


def transformers_loads_fp8(ckpt: Path) -> bool:
    """transformers infers the FP8 block size as (rows / scale_rows, cols / scale_cols). That equals
    the real 128 only where each dimension is a multiple of 128 or fits in one block; elsewhere (partial
    edge blocks) it dequantizes with the wrong block size, so the reference must be given weights we
    dequantized independently."""
    cfg = json.loads((ckpt / "config.json").read_text())
    dims = [cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"] * cfg["head_dim"],
            cfg["num_key_value_heads"] * cfg["head_dim"]]
    return all(d <= 128 or d % 128 == 0 for d in dims)


def dequantized_copy(ckpt: Path, out: Path) -> Path:
    """An unquantized float32 copy of the checkpoint, dequantized by `dequant_reference`."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    new_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {}
        with safe_open(str(ckpt / shard), framework="pt") as f:
            for name in f.keys():
                if name.endswith(".weight_scale_inv"):
                    continue
                t = f.get_tensor(name)
                if t.dtype == torch.float8_e4m3fn:
                    scale = f.get_tensor(name + "_scale_inv").numpy()
                    tensors[name] = dequant_reference(t.view(torch.uint8).numpy(), scale)
                else:
                    tensors[name] = t.float().numpy()
                new_map[name] = shard
        save_file(tensors, str(out / shard))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": new_map}))
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def load_transformers(ckpt: Path, dtype: torch.dtype, scratch: Path):
    """MiniMaxM2ForCausalLM on the checkpoint: from the FP8 files directly where transformers
    dequantizes them correctly, else from an independently dequantized copy."""
    import transformers

    source = ckpt if transformers_loads_fp8(ckpt) else dequantized_copy(ckpt, scratch / (ckpt.name + "-f32"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    assert type(model).__name__ == "MiniMaxM2ForCausalLM"
    return model.eval()


_bf16_refs: dict[int, object] = {}


def bf16_weight_reference(model):
    """A copy of a float32 transformers model holding the weights the BF16 graphs hold: BF16-rounded,
    the router gate kept float32 (its bias is a float32 buffer). Computes in float32."""
    import copy

    if id(model) not in _bf16_refs:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if not name.endswith("mlp.gate.weight"):
                    p.copy_(p.bfloat16().float())
        _bf16_refs[id(model)] = m
    return _bf16_refs[id(model)]


def greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy generate of exactly n tokens (no early stop; no MTP speculation)."""
    # An explicit mask: without one, generate masks every prompt token equal to pad_token_id (here 0),
    # which made the reference wrong for prompts holding token 0.
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0, use_mtp=False)
    return out[0, len(ids):].tolist()


def run_interpreted(module: str, function: str = "check_interpreted") -> str:
    """Run tests.<module>.<function>() in a fresh process under Triton's CPU interpreter (which must
    be chosen before triton is first imported); returns its stdout, failing with its output."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", f"from tests.{module} import {function} as f; f()"], cwd=root,
                       env=os.environ | {"TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout
