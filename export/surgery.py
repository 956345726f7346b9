"""From a PyTorch piece to checked ONNX files: trace, move weights to external data, graph surgery,
and the BF16 -> FP32 twin pass.

No protobuf ever holds the weights: the traced model's initializers are written straight from the
torch tensors into an external-data file (shared by the subgraphs of one weights group on one rank,
so the gather and dense MoE forms store their experts once), and the ModelProto keeps only
references. Graph surgery (onnx-graphsurgeon) works on that small proto.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx import TensorProto, numpy_helper

from .layout import random_inputs
from .manifest import TOKENS, SubgraphSpec

OPSET = 18  # TensorRT 11's parser takes 9..24; ONNX Runtime and the reference evaluator run 18 fully
INLINE_BYTES = 1024  # smaller initializers stay inside the .onnx file
ALIGN = 4096  # external tensors start on page boundaries, so readers can map them directly
SAMPLE_TOKENS = 13  # traced with a token count equal to no model dimension, so T stays symbolic

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # it warns that numpy has no BF16 type, and keeps BF16 as is
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "int64": torch.int64}


class WeightsFile:
    """One external-data file. Tensors are added once by name; a later subgraph asking for the same
    name (the other MoE form) gets a reference to the same bytes. The file's sha256 is computed as it
    is written (`sha256` after close), so nobody reads it back to hash it."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb", buffering=0)
        self._protos: dict[str, TensorProto] = {}
        self.sha256: str | None = None
        # Hashing (sha256, ~1.4 GB/s here) runs on its own thread beside the writes and the dequantization.
        self._hash = hashlib.sha256()
        self._to_hash: queue.Queue = queue.Queue(maxsize=16)
        self._hasher = threading.Thread(target=self._hash_loop, daemon=True)
        self._hasher.start()

    def _hash_loop(self) -> None:
        while (view := self._to_hash.get()) is not None:
            self._hash.update(view)

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        self._to_hash.put(view)
        while view:  # a raw file may write less than asked
            view = view[self._f.write(view):]

    def _proto(self, name: str, shape, data_type: int) -> TensorProto | None:
        if name in self._protos:
            known = self._protos[name]
            if list(known.dims) != list(shape) or known.data_type != data_type:
                raise ValueError(f"initializer {name} differs between subgraphs sharing {self.path.name}")
            return known
        return None

    def _record(self, name: str, shape, data_type: int, offset: int, length: int) -> TensorProto:
        t = TensorProto(name=name, data_type=data_type, dims=list(shape))
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        t.data_location = TensorProto.EXTERNAL
        self._protos[name] = t
        return t

    def _align(self) -> int:
        self._write(b"\0" * (-self._f.tell() % ALIGN))
        return self._f.tell()

    def add(self, name: str, array: np.ndarray, data_type: int) -> TensorProto:
        if (known := self._proto(name, array.shape, data_type)) is not None:
            return known
        offset = self._align()
        # A plain buffer write: ndarray.tofile is ~3x slower on ml_dtypes' bfloat16 (seen: 270 MB/s).
        self._write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        return self._record(name, array.shape, data_type, offset, array.nbytes)

    def add_chunks(self, name: str, shape, data_type: int, chunks) -> TensorProto:
        """A tensor given as consecutive slices along its first axis (torch tensors), written as they
        come; a background thread makes the next ones meanwhile (torch and file writes both release
        the GIL), so producing and writing overlap and only a few slices are ever in memory."""
        if (known := self._proto(name, shape, data_type)) is not None:
            return known
        offset, elements, itemsize = self._align(), 0, 0
        for chunk in prefetched(chunks, depth=4):
            elements, itemsize = elements + chunk.numel(), chunk.element_size()
            self._write(_numpy(chunk).reshape(-1).view(np.uint8))
        if elements != int(np.prod(shape)):
            raise ValueError(f"{name}: the chunks gave {elements} elements, the shape {tuple(shape)} has "
                             f"{int(np.prod(shape))}")
        return self._record(name, shape, data_type, offset, elements * itemsize)

    def close(self) -> None:
        self._to_hash.put(None)
        os.fsync(self._f.fileno())
        self._f.close()
        self._hasher.join()
        self.sha256 = self._hash.hexdigest()


def prefetched(items, depth: int):
    """Iterate `items` with a thread producing up to `depth` ahead; its exceptions re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer
            q.put(e)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def sample_inputs(spec: SubgraphSpec, cfg) -> tuple[torch.Tensor, ...]:
    x = random_inputs(spec.inputs, SAMPLE_TOKENS, cfg.vocab_size, seed=0)
    return tuple(x[t.name].to(_TORCH_DTYPES[t.dtype]) for t in spec.inputs)


@dataclass
class Traced:
    """A traced piece with its initializers detached: the graph (ModelProto without initializers),
    which initializers are the module's weights (filled per layer), and the small constants."""
    proto: onnx.ModelProto
    weights: dict[str, tuple[tuple[int, ...], int]]  # name -> (shape, ONNX dtype)
    constants: dict[str, np.ndarray]


def trace(module: torch.nn.Module, spec: SubgraphSpec, cfg) -> Traced:
    """(Meta weights are given uninitialized memory first: tracing needs shapes, not values.)"""
    if any(p.is_meta for p in module.parameters()):
        import copy
        module = copy.deepcopy(module).to_empty(device="cpu")
    return _trace(module, spec, cfg)


def _trace(module: torch.nn.Module, spec: SubgraphSpec, cfg) -> Traced:
    """torch.onnx (dynamo) export of one piece, with the token dimension symbolic.

    Every layer of a model has the same graph, so a trace is reused for every layer (to_proto puts
    that layer's weights in): tracing is the slow part of an export. That is only sound if every
    large initializer is one of the module's own tensors, not something the exporter computed from
    them (a folded transpose, say); this checks it."""
    T = torch.export.Dim(TOKENS, min=1)
    dynamic = {t.name: {i: T for i, d in enumerate(t.shape) if d == TOKENS} for t in spec.inputs}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on renamed axes and missing torchvision
        program = torch.onnx.export(module.eval(), sample_inputs(spec, cfg), dynamo=True, opset_version=OPSET,
                                    input_names=[t.name for t in spec.inputs],
                                    output_names=[t.name for t in spec.outputs],
                                    dynamic_shapes=dynamic, optimize=True, verbose=False)
    import onnx_ir as ir

    model = program.model
    own = dict(module.named_parameters())
    weights, constants = {}, {}
    for name, value in model.graph.initializers.items():
        if name in own:  # shape and dtype only: a numpy copy of the experts would double the memory
            weights[name] = (tuple(value.const_value.shape), value.const_value.dtype.value)
            continue
        array = value.const_value.numpy()
        if array.nbytes < INLINE_BYTES or not np.issubdtype(array.dtype, np.floating) and array.dtype != ml_dtypes.bfloat16:
            constants[name] = array.copy()  # small or integer (indices, shapes): structure, not weights
        else:
            raise RuntimeError(f"{spec.name}: initializer {name} {array.shape} is computed from the weights "
                               "by the exporter; keep weights in the layout the graph uses")
    model.graph.initializers.clear()
    return Traced(ir.serde.serialize_model(model), weights, constants)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A view of a tensor's bytes as numpy (BF16 through ml_dtypes), no copy."""
    if t.dtype == torch.bfloat16:
        return t.detach().contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.detach().contiguous().numpy()


def to_proto(traced: Traced, module: torch.nn.Module, weights: WeightsFile, chunks=None,
             as_inputs: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """The traced graph with this module's weights, large ones written to `weights`. Meta weights
    (streamed) come from `chunks(parameter name)`, slice by slice. Parameters named in `as_inputs`
    are written the same way but become graph inputs (appended after the traced ones) instead of
    initializers; returns, for those, {name: [offset, bytes]} in the weights file."""
    proto = onnx.ModelProto()
    proto.CopyFrom(traced.proto)
    params = dict(module.named_parameters())
    at: dict[str, list[int]] = {}
    for name, (shape, dtype) in traced.weights.items():
        if params[name].is_meta:
            if tuple(params[name].shape) != shape:
                raise RuntimeError(f"{name}: shape {tuple(params[name].shape)} differs from the traced {shape}")
            t = weights.add_chunks(name, shape, dtype, chunks(name))
        else:
            array = _numpy(params[name])
            if tuple(array.shape) != shape:
                raise RuntimeError(f"{name}: shape {array.shape} differs from the traced {shape}")
            if array.nbytes < INLINE_BYTES and name not in as_inputs:
                proto.graph.initializer.append(numpy_helper.from_array(array, name))
                continue
            t = weights.add(name, array, dtype)
        if name in as_inputs:
            ext = {e.key: e.value for e in t.external_data}
            at[name] = [int(ext["offset"]), int(ext["length"])]
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, dtype, list(shape)))
        else:
            proto.graph.initializer.append(t)
    missing = set(as_inputs) - set(at)
    if missing:
        raise RuntimeError(f"weight inputs {sorted(missing)} are not weights of the traced module")
    for name, array in traced.constants.items():
        proto.graph.initializer.append(numpy_helper.from_array(array, name))
    return proto, at


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def tidy(proto: onnx.ModelProto, spec: SubgraphSpec) -> onnx.ModelProto:
    """Check the I/O against the plan, remove dead nodes and tensors, sort, name the graph."""
    graph = gs.import_onnx(proto)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    graph.name = spec.name
    for kind, have, want in (("input", graph.inputs, spec.inputs + spec.weight_inputs),
                             ("output", graph.outputs, spec.outputs)):
        if [t.name for t in have] != [t.name for t in want]:
            raise RuntimeError(f"{spec.name}: traced {kind}s {[t.name for t in have]}, planned {[t.name for t in want]}")
    out = gs.export_onnx(graph, do_type_check=True)
    out.producer_name, out.producer_version = "minimax-m2-trt", "0.1"
    out.doc_string = f"MiniMax-M2 subgraph {spec.name}; I/O per the export manifest"
    for have, want in zip(list(out.graph.input) + list(out.graph.output),
                          spec.inputs + spec.weight_inputs + spec.outputs):
        elem = onnx.helper.tensor_dtype_to_np_dtype(have.type.tensor_type.elem_type)
        if _dims(have) != list(want.shape) or _dtype_name(have.type.tensor_type.elem_type) != want.dtype:
            raise RuntimeError(f"{spec.name}: {have.name} traced as {elem} {_dims(have)}, planned "
                               f"{want.dtype} {list(want.shape)}")
    return out


def _dtype_name(elem_type: int) -> str:
    return {TensorProto.BFLOAT16: "bfloat16", TensorProto.FLOAT: "float32", TensorProto.INT64: "int64"}.get(
        elem_type, TensorProto.DataType.Name(elem_type).lower())


def fp32_twin(proto: onnx.ModelProto, base_dir: Path, weights: WeightsFile) -> onnx.ModelProto:
    """The same graph with every BF16 tensor, initializer, constant and Cast promoted to FP32: what
    ONNX Runtime's CPU provider (which has no BF16 MatMul) runs. Node for node the same structure."""
    twin = onnx.ModelProto()
    twin.CopyFrom(proto)
    g = twin.graph

    def promote_type(vi):
        tt = vi.type.tensor_type
        if tt.elem_type == TensorProto.BFLOAT16:
            tt.elem_type = TensorProto.FLOAT

    for vi in list(g.input) + list(g.output) + list(g.value_info):
        promote_type(vi)
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.BFLOAT16:
                a.i = TensorProto.FLOAT
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.BFLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
    new_inits = []
    for t in g.initializer:
        array = numpy_helper.to_array(t, base_dir=str(base_dir))
        if t.data_type == TensorProto.BFLOAT16:
            array = array.astype(np.float32)
        if t.data_location == TensorProto.EXTERNAL:
            new_inits.append(weights.add(t.name, array, onnx.helper.np_dtype_to_tensor_dtype(array.dtype)))
        else:
            new_inits.append(numpy_helper.from_array(array, t.name))
    del g.initializer[:]
    g.initializer.extend(new_inits)
    return twin


def save(proto: onnx.ModelProto, path: Path) -> None:
    """Write the (small) model file and check it, external data included, with shape inference."""
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    onnx.checker.check_model(str(path), full_check=True)

