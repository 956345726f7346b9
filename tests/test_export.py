"""ONNX export: every subgraph against its PyTorch piece, the chained subgraphs against transformers,
the BF16 graphs themselves, the manifest, and resumable, trustworthy output.

Tolerances:
- FP32 twins vs the PyTorch pieces in float32 with the same (BF16-valued) weights, and the chained
  twins vs transformers in float32 with those weights: atol 1e-4, as in test_model_vs_transformers
  (same numbers, only the order of float32 sums differs).
- BF16 graphs on onnx.reference vs the PyTorch pieces in BF16: both round every op to BF16 but may
  accumulate matmuls in different orders, so a few BF16 ulps: rtol 2^-6 with an atol of 2^-6 of the
  output's largest magnitude.
"""
import json
import re
import os
import signal
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from export.checkpoint import Checkpoint
from export.layout import make_layout, random_inputs
from export.manifest import (FORMAT_VERSION, AllReduceStep, AttentionStep, BroadcastStep, Manifest, ManifestError,
                             SubgraphStep)
from export.pieces import build_modules
from export.sharding import ShardingError
from export.to_onnx import export
from export.trt_support import check_model
from tests.conftest import TEST_MOE_FORMS
from tests.reference import bf16_weight_reference

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
F32_ATOL = 1e-4
# alt at TP=2 (its export, ~30 s of the suite) runs in make test-slow; tiny covers TP=2 in make test
EXPORTS = [("tiny", 1), ("tiny", 2), ("alt", 1), pytest.param("alt", 2, marks=pytest.mark.long)]


# The kill and disk-full tests' CLI exports: one MoE form and no twins. A fresh process traces the
# graphs of the first layer before stamping it (attention and each MoE form: 4, here 2), which is the
# wait before the kill; their files are a subset of the fixture's export, byte for byte.
KILLED_ARGS = ("--moe-forms", "gather", "--fp32-twins", "off")
KILLED = {"moe_forms": "gather", "twins": False}


def same_bytes_as(man: Manifest, ref: Manifest) -> None:
    """Every file of `man` (an export with fewer forms or no twins) is the file of that name in `ref`."""
    assert man.files == {f: ref.files.get(f) for f in man.files}


def torch_piece(ckpt: Checkpoint, sg, rank: int, tp: int, dtype: torch.dtype):
    """The PyTorch module the subgraph was traced from, with BF16 weights (float32 pieces hold the
    same BF16-valued weights as the graphs; the router stays float32 in both)."""
    layout = make_layout(ckpt.config, tp)
    spec = next(s for s in layout.subgraphs if s.name == sg.name)
    m = build_modules(ckpt, layout, spec.unit, rank, [spec], torch.bfloat16)[0][spec.name]
    return m.float() if dtype == torch.float32 else m


def to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


# alt's twins against their pieces (~25 s) run in make test-slow; tiny's here, and alt's chained twins
# against transformers
@pytest.mark.parametrize("name,tp", [("tiny", 1), ("tiny", 2), pytest.param("alt", 1, marks=pytest.mark.long),
                                     pytest.param("alt", 2, marks=pytest.mark.long)])
def test_fp32_twins_match_pytorch_pieces(name, tp, exported, checkpoints):
    man = exported(name, tp)
    ckpt = Checkpoint(checkpoints[name])
    for sg_name, sg in man.subgraphs.items():
        for rank in sg.ranks:
            piece = torch_piece(ckpt, sg, rank, tp, torch.float32)
            inputs = random_inputs(sg.inputs, 5, ckpt.config.vocab_size, seed=rank)
            with torch.no_grad():
                want = piece(*inputs.values())
            want = want if isinstance(want, tuple) else (want,)
            sess = ort.InferenceSession(str(man.path(sg_name, rank, "fp32")), providers=["CPUExecutionProvider"])
            got = sess.run(None, {k: v.numpy() for k, v in inputs.items()} |
                           man.weight_input_arrays(sg_name, rank, "float32"))
            assert [o.name for o in sess.get_outputs()] == [t.name for t in sg.outputs]
            for g, w, spec in zip(got, want, sg.outputs):
                assert tuple(g.shape) == spec.concrete(5), (sg_name, spec)
                np.testing.assert_allclose(g, w.float().numpy(), atol=F32_ATOL, rtol=1e-5,
                                           err_msg=f"{sg_name} rank {rank} {spec.name}")


def test_block_twin_with_overflowing_experts_matches_the_gather_piece(exported, checkpoints):
    """The block form's second pass (an expert's pairs past its first 128) runs only when a step has
    more pairs than that for some expert, which no chat-sized test reaches on the toy: 700 tokens,
    top-4 of 16 experts, 175 pairs an expert on average. The ONNX twin against the gather form's
    PyTorch piece (another algorithm, exact up to float32 summation order: F32_ATOL)."""
    man = exported("tiny", 1)
    ckpt = Checkpoint(checkpoints["tiny"])
    T = 700
    block = man.subgraphs["layers.0.post_block"]
    inputs = random_inputs(block.inputs, T, ckpt.config.vocab_size, seed=7)
    gather = torch_piece(ckpt, man.subgraphs["layers.0.post_gather"], 0, 1, torch.float32)
    with torch.no_grad():
        want = gather(*inputs.values())
        moe = next(m for m in gather.modules() if type(m).__name__ == "Moe")
        h = inputs[block.inputs[0].name] + inputs[block.inputs[1].name]
        from export.model import rms_norm
        idx, _ = moe.route(rms_norm(h, moe.norm, moe.eps))
    counts = torch.bincount(idx.reshape(-1), minlength=moe.num_experts)
    assert int(counts.max()) > 2 * 128 and int((counts > 128).sum()) >= 4, counts  # pass 2 has blocks
    sess = ort.InferenceSession(str(man.path(block.name, 0, "fp32")), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in inputs.items()} | man.weight_input_arrays(block.name, 0, "float32"))
    want = want if isinstance(want, tuple) else (want,)
    for g_, w in zip(got, want):
        np.testing.assert_allclose(g_, w.float().numpy(), atol=F32_ATOL, rtol=1e-5)


def attention_np(q, k, v, scale):
    """Causal GQA attention for one sequence, written for the test: q [T, Hq, d], k/v [T, Hkv, d]."""
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("qhd,khd->hqk", q.astype(np.float64), k.astype(np.float64)) * scale
    s = np.where(np.tril(np.ones(s.shape[1:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, v.astype(np.float64)).reshape(q.shape[0], -1).astype(np.float32)


def run_chain(man: Manifest, ids: list[int], form: str) -> np.ndarray:
    """Execute the manifest's steps with the FP32 twins: ranks' all-reduces as sums, attention as above."""
    tp = man.tp
    envs = [{"ids": np.array(ids, np.int64), "positions": np.arange(len(ids), dtype=np.int64)} for _ in range(tp)]
    for step in man.steps:
        if isinstance(step, SubgraphStep):
            name = step.pick(form)
            sg = man.subgraphs[name]
            for r in sg.ranks:
                sess = ort.InferenceSession(str(man.path(name, r, "fp32")), providers=["CPUExecutionProvider"])
                outs = sess.run(None, {t.name: envs[r][t.name] for t in sg.inputs} |
                                man.weight_input_arrays(name, r, "float32"))
                envs[r].update(zip([t.name for t in sg.outputs], outs))
        elif isinstance(step, BroadcastStep):
            for env in envs:
                env.update({t: envs[step.src][t] for t in step.tensors})
        elif isinstance(step, AllReduceStep):
            for t in step.tensors:
                total = sum(env[t] for env in envs)
                for env in envs:
                    env[t] = total
        elif isinstance(step, AttentionStep):
            for env in envs:
                env[step.out] = attention_np(env[step.q], env[step.k], env[step.v], step.scale)
        else:
            raise AssertionError(f"unknown step {step}")
    # the vocabulary-parallel head: each rank's slice, in rank order, padding cut
    return np.concatenate([env["logits"] for env in envs], axis=-1)[:, :man.config.vocab_size]


@pytest.mark.parametrize("name,tp", EXPORTS)
@pytest.mark.parametrize("form", ["gather", "dense", "block"])
def test_chained_twins_match_transformers(name, tp, form, exported, hf_model):
    man = exported(name, tp)
    ref = bf16_weight_reference(hf_model(name))
    g = torch.Generator().manual_seed(tp)
    for n in (1, 9):
        ids = torch.randint(0, man.config.vocab_size, (n,), generator=g).tolist()
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(run_chain(man, ids, form), want, atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("name,tp,rank,names", [
    ("tiny", 1, 0, ["embed", "layers.0.attn", "layers.0.post_gather", "layers.0.post_dense", "layers.0.post_block",
                    "head"]),
    ("tiny", 2, 1, ["layers.1.attn_in", "layers.1.qk_rope", "layers.1.o_proj", "layers.1.moe_gather",
                    "layers.1.moe_dense", "layers.1.moe_block"]),
])
def test_bf16_graphs_on_reference_evaluator(name, tp, rank, names, exported, checkpoints):
    """The BF16 graphs themselves (what TensorRT parses), run by onnx's reference evaluator."""
    man = exported(name, tp)
    ckpt = Checkpoint(checkpoints[name])
    for sg_name in names:
        sg = man.subgraphs[sg_name]
        piece = torch_piece(ckpt, sg, rank, tp, torch.bfloat16)
        inputs = random_inputs(sg.inputs, 3, ckpt.config.vocab_size, seed=1)
        typed = {k: (v.bfloat16() if spec.dtype == "bfloat16" else v)
                 for (k, v), spec in zip(inputs.items(), sg.inputs)}
        with torch.no_grad():
            want = piece(*typed.values())
        want = want if isinstance(want, tuple) else (want,)
        model = onnx.load(str(man.path(sg_name, rank, "bf16")))  # external data loaded from beside it
        got = ReferenceEvaluator(model).run(None, {k: to_numpy(v, s.dtype)
                                                   for (k, v), s in zip(typed.items(), sg.inputs)} |
                                            man.weight_input_arrays(sg_name, rank, "bfloat16"))
        for g_, w, spec in zip(got, want, sg.outputs):
            assert (g_.dtype == ml_dtypes.bfloat16) == (spec.dtype == "bfloat16"), (sg_name, spec)
            w = w.float().numpy()
            np.testing.assert_allclose(g_.astype(np.float32), w, rtol=2 ** -6, atol=2 ** -6 * np.abs(w).max(),
                                       err_msg=f"{sg_name} {spec.name}")


@pytest.mark.parametrize("name,tp", EXPORTS)
def test_twins_have_the_bf16_structure(name, tp, exported):
    man = exported(name, tp)
    for sg_name, sg in man.subgraphs.items():
        for rank in sg.ranks:
            a = onnx.load(str(man.path(sg_name, rank, "bf16")), load_external_data=False)
            b = onnx.load(str(man.path(sg_name, rank, "fp32")), load_external_data=False)
            assert [(n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == \
                   [(n.op_type, list(n.input), list(n.output)) for n in b.graph.node]
            for x, y in zip(list(a.graph.input) + list(a.graph.output), list(b.graph.input) + list(b.graph.output)):
                assert x.name == y.name
                ex, ey = x.type.tensor_type.elem_type, y.type.tensor_type.elem_type
                assert ey == (onnx.TensorProto.FLOAT if ex == onnx.TensorProto.BFLOAT16 else ex)
            assert not check_model(a), sg_name
            dims = [d.dim_param or d.dim_value for d in a.graph.input[0].type.tensor_type.shape.dim]
            assert dims[0] == "T"  # the token dimension stays symbolic
            assert a.opset_import[0].version <= 24
            assert not {n.op_type for n in a.graph.node} & {"NonZero", "Loop", "If", "Einsum"}


def test_manifest_contents(exported):
    man = exported("tiny", 2)
    d = json.loads((man.root / "manifest.json").read_text())  # the file as written, read here
    assert d["format_version"] == FORMAT_VERSION
    assert d["tp"] == 2 and d["model"]["hidden_size"] == 256 and d["fp32_twins"]
    assert d["moe_forms"] == [["gather", 4], ["dense", 16], ["block", d["max_tokens"]]]
    assert d["moe_forms_source"] == "given (--moe-forms)"
    ops = [s["op"] for s in d["steps"]]
    assert ops.count("attention") == 3 and ops.count("all_reduce") == 3 * 3 and ops.count("broadcast") == 1
    for s in d["steps"]:
        for n in ([s["name"]] if s["op"] == "subgraph" and "variants" not in s else s.get("variants", {}).values()):
            assert n in d["subgraphs"]
    assert d["subgraphs"]["head"]["ranks"] == [0, 1] and d["subgraphs"]["embed"]["ranks"] == [0]
    assert d["subgraphs"]["head"]["outputs"][0]["shape"] == ["T", d["model"]["vocab_size"] // 2]  # vocab-parallel
    # Both MoE forms of a layer-rank read one weights file, and take the experts as inputs at the
    # same bytes of it: stored once on disk, loaded once per GPU.
    g = d["subgraphs"]["layers.0.moe_gather"]["files"]["1"]["bf16"]
    dense = d["subgraphs"]["layers.0.moe_dense"]["files"]["1"]["bf16"]
    assert g["weights"] == dense["weights"] and g["inputs_at"] == dense["inputs_at"]
    assert set(g["inputs_at"]) == {"w13", "w2"} and [t["name"] for t in d["subgraphs"]["layers.0.moe_gather"]
                                                      ["weight_inputs"]] == ["w13", "w2"]
    graph = onnx.load(str(man.path("layers.0.moe_gather", 1)), load_external_data=False)
    assert [i.name for i in graph.graph.input][-2:] == ["w13", "w2"]
    assert not {"w13", "w2"} & {t.name for t in graph.graph.initializer}
    shared = man.weight_inputs(1)  # what the runtime binds: one array for both forms
    assert shared["layers.0.moe_gather"]["w13"] is shared["layers.0.moe_dense"]["w13"]
    # The typed contract reads back what was written, and writes it again the same.
    assert man.to_json() == d
    assert isinstance(man.steps[0], SubgraphStep) and man.subgraphs["head"].ranks == (0, 1)
    man.verify()


def test_old_or_broken_manifests_are_refused(exported, tmp_path):
    import shutil
    shutil.copytree(exported("tiny", 1).root, tmp_path / "tp1")
    path = tmp_path / "tp1" / "manifest.json"
    d = json.loads(path.read_text())
    path.write_text(json.dumps(d | {"format_version": 1}))
    with pytest.raises(ManifestError, match="format version 1, this code reads .*export again"):
        Manifest.load(path)
    path.write_text(json.dumps({k: v for k, v in d.items() if k != "steps"}))
    with pytest.raises(ManifestError, match="not a valid manifest.*steps"):
        Manifest.load(path)
    path.write_text(json.dumps(d | {"steps": [{"op": "teleport"}]}))
    with pytest.raises(ManifestError, match="unknown step op 'teleport'"):
        Manifest.load(path)


def test_manifest_detects_changed_files(exported, tmp_path):
    import shutil
    src = exported("tiny", 1).root
    shutil.copytree(src, tmp_path / "tp1")
    man = Manifest.load(tmp_path / "tp1")
    f = tmp_path / "tp1" / "rank0" / "layers.1.post.weights"
    data = bytearray(f.read_bytes())
    data[5000] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="layers.1.post.weights: content does not match"):
        man.verify()
    f.write_bytes(bytes(data[:-10]))
    with pytest.raises(ManifestError, match="layers.1.post.weights: .*bytes, the manifest says"):
        man.verify(hashes=False)
    (tmp_path / "tp1" / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest"):
        Manifest.load(tmp_path / "tp1")


def test_rerun_skips_and_is_deterministic(exported, checkpoints, tmp_path):
    first = exported("alt", 1)
    # the fixture's own settings: the export is shared with later tests
    again = Manifest.load(export(checkpoints["alt"], first.root.parent, tp=1, progress=False, moe_forms=TEST_MOE_FORMS))
    assert again.exported == [] and again.moe == first.moe  # everything was up to date
    fresh = Manifest.load(export(checkpoints["alt"], tmp_path, tp=1, progress=False, moe_forms=TEST_MOE_FORMS))
    assert fresh.files == first.files  # same bytes from a clean export


def test_parallel_jobs_write_the_same_bytes(exported, checkpoints, tmp_path):
    """Two worker processes (each graph traced once, by one of them, and sent to the others) against the
    one-process export. One MoE form: the workers trace every graph again (6 here, not 8)."""
    one = exported("tiny", 2)
    two = Manifest.load(export(checkpoints["tiny"], tmp_path, tp=2, progress=False, jobs=2, moe_forms="gather"))
    same_bytes_as(two, one)
    assert len(two.exported) == 3 * 2 + 1 + 2  # layers x ranks, embed, head x ranks
    assert {(e["unit"], e["rank"]) for e in two.exported} == {(e["unit"], e["rank"]) for e in one.exported}


def test_twins_only_when_asked_and_added_later(checkpoints, tmp_path):
    """twins=False writes none; asking later adds them (re-exporting each unit), and turning them
    off again rewrites nothing."""
    man = Manifest.load(export(checkpoints["alt"], tmp_path, tp=1, twins=False, progress=False))
    assert not man.fp32_twins and not [f for f in man.files if ".fp32." in f]
    assert not list((tmp_path / "tp1").rglob("*.fp32.*"))
    with pytest.raises(ManifestError, match="no fp32 graph"):
        man.graph_files("layers.0.attn", 0, "fp32")
    man = Manifest.load(export(checkpoints["alt"], tmp_path, tp=1, twins=True, progress=False))
    assert man.fp32_twins and len(man.exported) == 4
    again = Manifest.load(export(checkpoints["alt"], tmp_path, tp=1, twins=False, progress=False))
    assert again.exported == [] and again.files == man.files


def _export_imports(folder, name: str) -> set[str]:
    """The export modules `name` imports (relative imports, read from the source)."""
    import ast
    out = set()
    for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module} if node.module else {a.name for a in node.names}
    return out


def test_stamps_cover_the_byte_deciding_modules_only(tmp_path):
    """A comment in the toy writer or the orchestration keeps every stamp; a change in a module that
    decides the bytes (here the FP8 range) changes them all. Computed over a copy of export/."""
    import shutil

    from export import unit
    pkg = ROOT / "export"
    tree = tmp_path / "export"
    shutil.copytree(pkg, tree, ignore=shutil.ignore_patterns("__pycache__"))
    before = unit.code_hash(tree)
    assert before == unit.code_hash()
    for name in ("tiny.py", "to_onnx.py", "jobs.py", "preflight.py", "trt_support.py", "paths.py"):
        (tree / name).write_text((tree / name).read_text() + "\n# an edit that writes no other byte\n")
    assert unit.code_hash(tree) == before
    fp8 = tree / "fp8.py"
    fp8.write_text(fp8.read_text().replace("FP8_MAX = 448.0", "FP8_MAX = 240.0"))
    assert unit.code_hash(tree) != before
    # Every export module the unit's code reaches is stamped, or is one that writes no unit byte.
    unstamped = {"atomic", "trt_support", "text_config"}  # the stamp file itself, a check, the text files
    seen, todo = set(), ["unit"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += sorted(_export_imports(pkg, name))
    assert seen - unstamped == set(unit.STAMPED_MODULES), seen


def test_interrupted_export_is_not_trusted_and_resumes(checkpoints, tmp_path, exported):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "export.to_onnx", str(checkpoints["alt"]), "--out", str(out),
                             "--quiet", *KILLED_ARGS], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stamps = out / "tp1" / "rank0" / ".stamps"
    deadline = time.time() + 120
    while time.time() < deadline and not list(stamps.glob("*.json")):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(stamps.glob("*.json")))
    assert 1 <= done < 4, "the kill should land mid-export"
    with pytest.raises(ManifestError):
        Manifest.load(out / "tp1")
    man = Manifest.load(export(checkpoints["alt"], out, tp=1, progress=False, **KILLED))
    assert len(man.exported) == 4 - done  # only what had no stamp
    same_bytes_as(man, exported("alt", 1))
    man.verify()
    assert not list((out / "tp1" / "rank0").glob(".tmp-*"))


def _export_cli(capsys, *argv) -> tuple[int, str]:
    """`python -m export.to_onnx ARGV` as its main() in this process: (exit code, stderr). The same
    code as the command but the interpreter's start, and the session's traces of a shape are reused
    (export/to_onnx.py keeps them per process). An exception main() lets through fails the test, as a
    traceback would."""
    from export.to_onnx import main
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_tp_that_does_not_divide_fails_before_any_work(checkpoints, tmp_path, capsys):
    with pytest.raises(ShardingError, match="TP=3 does not divide"):
        export(checkpoints["tiny"], tmp_path / "x", tp=3, progress=False)
    assert not (tmp_path / "x").exists()
    code, err = _export_cli(capsys, str(checkpoints["tiny"]), "--tp", "8", "--out", str(tmp_path / "y"))
    assert code == 2 and "TP=8 does not divide num_key_value_heads=4" in err
    assert not (tmp_path / "y").exists()


def _graph(nodes, inputs, outputs, inits=(), opset=18):
    return onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                                  opset_imports=[onnx.helper.make_opsetid("", opset)])


def _vi(name, elem=onnx.TensorProto.BFLOAT16, shape=("T", 8)):
    return onnx.helper.make_tensor_value_info(name, elem, list(shape))


def test_op_support_check_rejects_what_tensorrt_cannot_build():
    from onnx import TensorProto, helper, numpy_helper
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    ok = _graph([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, sorted=1),
                 helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1)],
                [_vi("x")], [_vi("v", shape=("T", 2)), _vi("i", TensorProto.INT64, ("T", 2)), _vi("s", shape=("T", 1))],
                [k, axes])
    assert check_model(ok) == []
    cases = {
        "NonZero": _graph([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [_vi("x")],
                          [_vi("y", TensorProto.INT64, (2, "N"))]),
        "sorted=0": _graph([helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=0, name="tk")], [_vi("x")],
                           [_vi("v"), _vi("i", TensorProto.INT64)], [k]),
        "axes must be an initializer": _graph(
            [helper.make_node("ReduceSum", ["x", "ax"], ["s"], name="rs")],
            [_vi("x"), _vi("ax", TensorProto.INT64, (1,))], [_vi("s")]),
        "K must be a build-time constant": _graph(
            [helper.make_node("TopK", ["x", "kk"], ["v", "i"], name="tk")],
            [_vi("x"), _vi("kk", TensorProto.INT64, (1,))], [_vi("v"), _vi("i", TensorProto.INT64)]),
        "DOUBLE is not a TensorRT type": _graph(
            [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE, name="c")], [_vi("x")],
            [_vi("y", TensorProto.DOUBLE)]),
        "custom domain": _graph([helper.make_node("Marker", ["x"], ["y"], domain="my.ops", name="m")],
                                [_vi("x")], [_vi("y")]),
        "outside TensorRT's 9..24": _graph([helper.make_node("Identity", ["x"], ["y"])], [_vi("x")], [_vi("y")],
                                           opset=25),
    }
    for message, model in cases.items():
        problems = check_model(model)
        assert any(message in p for p in problems), (message, problems)


def test_op_support_cli(exported, tmp_path):
    man = exported("tiny", 1)
    ok = subprocess.run([sys.executable, "-m", "export.trt_support", str(man.path("layers.0.post_gather", 0))],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and ": ok" in ok.stdout
    bad = tmp_path / "bad.onnx"
    onnx.save(_graph([onnx.helper.make_node("NonZero", ["x"], ["y"], name="nz")], [_vi("x")],
                     [_vi("y", onnx.TensorProto.INT64, (2, "N"))]), str(bad))
    r = subprocess.run([sys.executable, "-m", "export.trt_support", str(bad)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "node nz (NonZero)" in r.stdout


def test_export_uses_the_benchmarks_schedule_only_for_its_shape(tmp_path, checkpoints):
    from export.config import parse_hf_config
    from export.tiny import PRESETS, hf_config
    from export.to_onnx import export, measured_schedule

    real = parse_hf_config(hf_config(PRESETS["real"]))
    f = tmp_path / "moe_forms.json"
    f.write_text(json.dumps({"experts": 256, "inter": 192, "hidden": 3072, "top_k": 8,
                             "moe_forms": "gather:15,dense:300,block", "measured_on": "gpu: test"}))
    got = measured_schedule(f, real, 8, "intermediate", 2048)
    assert got.spec() == "gather:15,dense:300,block:2048" and got.source == "measured by make bench on gpu: test"
    assert measured_schedule(f, real, 4, "intermediate", 2048) is None   # another shard width
    assert measured_schedule(f, real, 8, "expert", 2048) is None         # another split: 32 whole experts
    tiny = parse_hf_config(hf_config(PRESETS["tiny"]))
    assert measured_schedule(f, tiny, 1, "intermediate", 2048) is None
    # An explicit input of the export: a measurement for the alt model's shape is used and recorded,
    # and only its forms are exported.
    alt = parse_hf_config(hf_config(PRESETS["alt"]))
    f.write_text(json.dumps({"experts": alt.num_experts, "inter": alt.intermediate_size, "hidden": alt.hidden_size,
                             "top_k": alt.top_k, "moe_forms": "gather:3,block", "measured_on": "gpu: test"}))
    man = Manifest.load(export(checkpoints["alt"], tmp_path / "x", tp=1, twins=False, progress=False, forms_file=f))
    assert (man.moe.spec(), man.moe.source) == ("gather:3,block:2048", "measured by make bench on gpu: test")
    assert not any(n.endswith("_dense") for n in man.subgraphs) and "layers.0.post_block" in man.subgraphs


def test_streamed_weights_are_the_same_bytes_and_hash_and_fail_loudly(tmp_path):
    import hashlib as _hashlib

    from onnx import TensorProto

    from export import surgery

    a = torch.randn(10, 4, 8).to(torch.bfloat16)
    whole, streamed = surgery.WeightsFile(tmp_path / "a"), surgery.WeightsFile(tmp_path / "b")
    whole.add("pad", surgery._numpy(torch.ones(3, dtype=torch.bfloat16)), TensorProto.BFLOAT16)
    streamed.add("pad", surgery._numpy(torch.ones(3, dtype=torch.bfloat16)), TensorProto.BFLOAT16)
    t1 = whole.add("x", surgery._numpy(a), TensorProto.BFLOAT16)
    t2 = streamed.add_chunks("x", a.shape, TensorProto.BFLOAT16, iter(a))   # one row at a time
    whole.close()
    streamed.close()
    where = lambda t: [(e.key, e.value) for e in t.external_data if e.key != "location"]  # noqa: E731
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() and where(t1) == where(t2)
    assert whole.sha256 == streamed.sha256 == _hashlib.sha256((tmp_path / "a").read_bytes()).hexdigest()

    bad = surgery.WeightsFile(tmp_path / "c")
    with pytest.raises(ValueError, match="chunks gave 288 elements"):
        bad.add_chunks("y", a.shape, TensorProto.BFLOAT16, iter(a[:9]))

    def broken():
        yield a[0]
        raise OSError("shard vanished")

    with pytest.raises(OSError, match="shard vanished"):
        bad.add_chunks("z", a.shape, TensorProto.BFLOAT16, broken())
    bad.close()


def _files_modes(root):
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in root.rglob("*")}


def test_files_get_the_umasks_modes_and_no_temporary_survives_a_rerun(checkpoints, tmp_path):
    """Every file and folder of an export has the mode the umask gives (none 0600 from a renamed
    temporary), and what a killed run leaves (a stamp's write-then-rename temporary, a unit's
    folder, a text file's copy) is gone after the rerun, which ends byte-identical."""
    from export.atomic import write_json_atomic
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        man = Manifest.load(export(checkpoints["alt"], out, tp=1, progress=False))
        modes = _files_modes(out / "tp1")
        assert {m for p, m in modes.items() if (out / "tp1" / p).is_file()} == {0o644}, modes
        assert {m for p, m in modes.items() if (out / "tp1" / p).is_dir()} == {0o755}, modes
        root = out / "tp1"
        # what a SIGKILL leaves at each temporary's place (the names the code itself makes)
        import tempfile
        fd, left = tempfile.mkstemp(prefix=".layers.0.json.", dir=root / "rank0" / ".stamps")
        os.close(fd)
        (root / "rank0" / ".tmp-layers.1").mkdir()
        (root / "rank0" / ".tmp-layers.1" / "layers.1.post.weights").write_bytes(b"half")
        (root / ".tokenizer.json.tmp").write_bytes(b"half")
        (root / "rank0" / ".stamps" / "layers.0.json").unlink()  # that unit is redone
        os.umask(0o027)  # a stricter umask: respected, not widened
        again = Manifest.load(export(checkpoints["alt"], out, tp=1, progress=False))
        assert [(e["unit"], e["rank"]) for e in again.exported] == [("layers.0", 0)]
        assert again.files == man.files
        leftovers = [p for p in root.rglob(".*") if p.name not in (".stamps", ".lock")]
        assert leftovers == [], leftovers
        assert not os.path.exists(left)
        assert (root / "rank0" / ".stamps" / "layers.0.json").stat().st_mode & 0o777 == 0o640
        assert (root / MANIFEST_NAME).stat().st_mode & 0o777 == 0o640
        write_json_atomic(tmp_path / "x.json", {})
        assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


MANIFEST_NAME = "manifest.json"


def test_a_second_export_into_the_folder_names_the_holder_and_a_dead_ones_lock_is_taken_over(checkpoints, tmp_path,
                                                                                              capsys):
    import socket
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from export.lock import FolderLock\n"
                               f"with FolderLock({str(out / 'tp1')!r}, 'export'):\n"
                               "    print('locked', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = _export_cli(capsys, str(checkpoints["alt"]), "--out", str(out), "--quiet")
        assert code == 2, err
        assert f"is being written by another export: pid {holder.pid} on {socket.gethostname()}, started" in err
        assert not (out / "tp1" / "rank0").exists()  # nothing was written
    finally:
        holder.kill()  # SIGKILL: no cleanup; the kernel drops its lock
        holder.wait()
    man = Manifest.load(export(checkpoints["alt"], out, tp=1, progress=False))
    assert len(man.exported) == 4


def test_a_nan_byte_in_a_weight_fails_the_export_with_its_name(checkpoints, tmp_path, capsys):
    """0x7f is an FP8 e4m3fn NaN: the export stops at it, naming tensor, layer and shard."""
    import shutil

    from safetensors.torch import load_file, save_file
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["alt"], ckpt)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    shard = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(str(ckpt / shard))
    tensors[name].view(torch.uint8)[5, 7] = 0x7F
    save_file(tensors, str(ckpt / shard))
    code, err = _export_cli(capsys, str(ckpt), "--out", str(tmp_path / "out"), "--quiet")
    assert code == 2, err
    assert f"error: {name} (layer 1, in {shard}): 1 of " in err and "NaN or infinite" in err, err
    assert "Traceback" not in err  # nor one from the weight-streaming thread


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 24 MB (root only: skipped elsewhere)."""
    d = tmp_path / "disk"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_a_disk_that_fills_mid_export_is_a_clear_error_and_the_rerun_completes(checkpoints, exported, small_disk):
    """The preflight passes (the disk has room); once the first unit is stamped another writer
    takes the rest of the disk: the export fails with the folder and the bytes, no traceback."""
    out = small_disk / "out"
    proc = subprocess.Popen([sys.executable, "-m", "export.to_onnx", str(checkpoints["alt"]), "--out", str(out),
                             "--quiet", *KILLED_ARGS], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    stamps = out / "tp1" / "rank0" / ".stamps"
    deadline = time.time() + 120
    while time.time() < deadline and not list(stamps.glob("*.json")):
        time.sleep(0.01)
    filler = small_disk / "filler"
    try:
        # Every free byte, as another process filling the disk would. Unbuffered: a buffered file's
        # close would flush its unwritten tail into the full disk and raise ENOSPC again.
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
            except OSError:
                pass
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # the disk is unmounted after the test: nothing may still hold it
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, err
    m = re.search(r"error: the disk holding (\S+) is full \(No space left on device.*\): the export still needs "
                  r"(\d+\.\d+) ([MG]B) there, (\d+\.\d+) [MG]B is free", err)
    assert m and m.group(1) == str(out / "tp1") and float(m.group(2)) > 0, err
    assert "Traceback" not in err
    filler.unlink()
    man = Manifest.load(export(checkpoints["alt"], out, tp=1, progress=False, **KILLED))
    same_bytes_as(man, exported("alt", 1))
    assert [p for p in (out / "tp1").rglob(".*") if p.name not in (".stamps", ".lock")] == []
