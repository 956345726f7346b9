"""Is an ONNX graph within what TensorRT 11's ONNX parser builds, with BF16?

A static check of op types, attributes and tensor dtypes against onnx-tensorrt's operator support
for TensorRT 11 (its operators.md: no NonZero-style data-dependent shapes, TopK with sorted output and
a constant K, constant reduction axes, no DOUBLE, the default domain only, opset <= 24), run on every
exported subgraph, so a graph that TensorRT would reject fails at export time on a machine without
TensorRT.

    python -m export.trt_support model.onnx [...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

MIN_OPSET, MAX_OPSET = 9, 24
TOPK_MAX_K = 3840

# Elementwise and data-movement ops the parser takes for every float type, BF16 included.
ANY_FLOAT = {
    "Abs", "Add", "And", "Cast", "Ceil", "Concat", "Constant", "ConstantOfShape", "Cos", "Div", "Equal", "Erf",
    "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Greater", "GreaterOrEqual",
    "Gemm", "Identity", "Less", "LessOrEqual", "Log", "MatMul", "Max", "Min", "Mod", "Mul", "Neg", "Not", "Or", "Pow",
    "Range", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "Relu", "Reshape", "Shape",
    "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "TopK", "Transpose",
    "Trilu", "Unsqueeze", "Where", "Einsum", "CumSum", "OneHot", "ScatterElements", "ScatterND", "Size",
    "RMSNormalization", "RotaryEmbedding", "Attention", "LayerNormalization", "Xor", "Sign", "IsNaN",
}
# Ops the parser rejects or that would make shapes depend on data.
REJECTED = {"NonZero", "Unique", "Loop", "If", "Scan", "NonMaxSuppression", "SequenceConstruct", "SequenceAt",
            "StringNormalizer", "Compress", "RandomNormal", "RandomUniform", "Multinomial"}
# Tensor dtypes TensorRT has.
DTYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32, TensorProto.INT64,
          TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL, TensorProto.FLOAT8E4M3FN}


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray | None]:
    """Tensors known at build time: initializers (values only if stored inline) and Constant outputs."""
    known: dict[str, np.ndarray | None] = {}
    for t in graph.initializer:
        known[t.name] = None if t.data_location == TensorProto.EXTERNAL else numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    known[n.output[0]] = numpy_helper.to_array(a.t)
    return known


def _dtypes(model: onnx.ModelProto) -> dict[str, int]:
    try:
        g = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except onnx.shape_inference.InferenceError:  # an op without a schema: use the declared types alone
        g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def check_model(model: onnx.ModelProto) -> list[str]:
    """Problems TensorRT 11 would have with this graph; empty if none. Reads no external data."""
    problems = []
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if not MIN_OPSET <= opsets.get("ai.onnx", 0) <= MAX_OPSET:
        problems.append(f"opset {opsets.get('ai.onnx')} is outside TensorRT's {MIN_OPSET}..{MAX_OPSET}")
    g = model.graph
    known = _constant_values(g)
    types = _dtypes(model)
    for name, elem in types.items():
        if elem and elem not in DTYPES:
            problems.append(f"tensor {name}: dtype {TensorProto.DataType.Name(elem)} is not a TensorRT type")
    for n in g.node:
        where = f"node {n.name or '?'} ({n.op_type})"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {n.domain!r} has no TensorRT implementation here")
            continue
        if n.op_type in REJECTED:
            problems.append(f"{where}: not supported by TensorRT (data-dependent shape or control flow)")
            continue
        if n.op_type not in ANY_FLOAT:
            problems.append(f"{where}: op not in the supported list")
            continue
        if n.op_type == "TopK":
            if attrs.get("sorted", 1) != 1:
                problems.append(f"{where}: sorted=0 is not supported (TensorRT needs sorted=1)")
            k = known.get(n.input[1]) if len(n.input) > 1 else None
            if len(n.input) > 1 and n.input[1] not in known:
                problems.append(f"{where}: K must be a build-time constant")
            elif k is not None and int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX_K:
                problems.append(f"{where}: K={int(np.asarray(k).reshape(-1)[0])} exceeds {TOPK_MAX_K - 1}")
        if n.op_type.startswith("Reduce") and len(n.input) > 1 and n.input[1] and n.input[1] not in known:
            problems.append(f"{where}: axes must be an initializer or Constant, not a runtime tensor")
        if n.op_type == "OneHot" and n.input[1] not in known:
            problems.append(f"{where}: depth must be a build-time constant")
        if n.op_type == "CumSum" and n.input[1] not in known:
            problems.append(f"{where}: axis must be a build-time constant")
        if n.op_type in ("ScatterND", "ScatterElements") and attrs.get("reduction", b"none") not in (b"none", "none"):
            problems.append(f"{where}: reduction={attrs['reduction']!r} is not supported (only none)")
        if n.op_type == "Attention" and any(i for i in n.input[4:]):
            problems.append(f"{where}: past/present KV inputs are not supported")
        if n.op_type == "Cast" and attrs.get("to") not in DTYPES:
            problems.append(f"{where}: cast to {TensorProto.DataType.Name(attrs['to'])} is not a TensorRT type")
    return problems


def check_file(path: str | Path) -> list[str]:
    return check_model(onnx.load(str(path), load_external_data=False))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.trt_support", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="ONNX files (external data is not read)")
    a = ap.parse_args(argv)
    bad = 0
    for m in a.models:
        problems = check_file(m)
        bad += bool(problems)
        print(f"{m}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for p in problems:
            print(f"  {p}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
