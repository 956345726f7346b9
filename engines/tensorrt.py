"""Which TensorRT builds the engines, and the few names in which the two differ.

- TensorRT 11 (`tensorrt`): the builder the user runs on the A100 machine; it builds for the GPU it
  runs on (or, with hardware compatibility `ampere_plus`, for SM80+ from a newer GPU). Its engines
  are what the runtime loads.
- TensorRT-RTX (`tensorrt_rtx_bindings`, 1.7): NVIDIA's TensorRT for RTX GPUs, whose builder compiles
  ahead of time with no GPU for a chosen compute capability (SM80 here). It installs fully from PyPI
  (the `tensorrt-rtx` extra), so CI parses and compiles every subgraph with NVIDIA's own parser and
  compiler. Its engines load only in the TensorRT-RTX runtime, never in TensorRT 11.

Both are strongly typed (the BF16 ONNX graph is the engine's precision); everything else in
engines/build.py is shared.
"""
from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass
from pathlib import Path

KINDS = ("auto", "tensorrt", "tensorrt-rtx")
# The TensorRT-RTX libraries ship inside this wheel (without their .so.1 names): preloaded by path.
RTX_LIBS_PACKAGE = "onnxruntime_ep_nv_tensorrt_rtx"
RTX_LIBS = ("libtensorrt_rtx.so.1.7.1", "libtensorrt_onnxparser_rtx.so.1.7.1")


class TensorRTMissing(RuntimeError):
    """The asked-for TensorRT (or a GPU it needs) is not here; the message says what to install."""


@dataclass
class TensorRT:
    kind: str       # "tensorrt" | "tensorrt-rtx"
    trt: object     # the module
    version: str    # recorded with the engines: "tensorrt 11.4.0" | "tensorrt-rtx 1.7.1.116"

    @property
    def needs_gpu(self) -> bool:
        return self.kind == "tensorrt"

    def create_network(self, builder):
        if self.kind == "tensorrt-rtx":
            return builder.create_network(1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        return builder.create_network(0)  # TensorRT 11: always strongly typed, explicit batch

    def target(self, config, settings) -> None:
        """What the engine runs on: RTX compiles for a named compute capability; TensorRT 11 for its
        own GPU, or SM80+ with hardware compatibility, optionally for the lean runtime."""
        trt = self.trt
        if self.kind == "tensorrt-rtx":
            config.num_compute_capabilities = 1
            config.set_compute_capability(getattr(trt.ComputeCapability, settings.compute_capability), 0)
            return
        config.hardware_compatibility_level = (trt.HardwareCompatibilityLevel.AMPERE_PLUS
                                               if settings.hardware == "ampere_plus"
                                               else trt.HardwareCompatibilityLevel.NONE)
        if settings.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
            config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)  # the lean runtime is installed separately


def _tensorrt11() -> TensorRT:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTMissing(
            "TensorRT (with its builder and ONNX parser) is not installed. On a machine with an NVIDIA GPU "
            "and access to NVIDIA's package index: `pip install tensorrt` (TensorRT 11; its -libs packages "
            f"download the libraries from NVIDIA's index at install time). ({e})") from None
    if not hasattr(trt, "Builder") or not hasattr(trt, "OnnxParser"):
        raise TensorRTMissing(f"the tensorrt module at {getattr(trt, '__file__', '?')} has no Builder or "
                              "OnnxParser: the runtime-only (lean/dispatch) package cannot build engines")
    return TensorRT("tensorrt", trt, f"tensorrt {trt.__version__}")


def _tensorrt_rtx() -> TensorRT:
    spec = importlib.util.find_spec(RTX_LIBS_PACKAGE)
    if spec is None or importlib.util.find_spec("tensorrt_rtx_bindings") is None:
        raise TensorRTMissing("TensorRT-RTX is not installed: `pip install -e '.[tensorrt-rtx]'` (the bindings and "
                              "the wheel that carries its libraries, both from PyPI)")
    folder = Path(spec.submodule_search_locations[0])
    for lib in RTX_LIBS:
        if not (folder / lib).is_file():
            raise TensorRTMissing(f"{folder / lib}: not found; reinstall the tensorrt-rtx extra")
        ctypes.CDLL(str(folder / lib), mode=ctypes.RTLD_GLOBAL)  # found by soname when the bindings load
    import tensorrt_rtx_bindings as trt

    return TensorRT("tensorrt-rtx", trt, f"tensorrt-rtx {trt.__version__}")


def load(kind: str = "auto") -> TensorRT:
    """auto: TensorRT 11 where it is installed with its builder, else TensorRT-RTX."""
    if kind not in KINDS:
        raise ValueError(f"TensorRT kind {kind!r} is not one of {KINDS}")
    if kind == "tensorrt":
        return _tensorrt11()
    if kind == "tensorrt-rtx":
        return _tensorrt_rtx()
    try:
        return _tensorrt11()
    except TensorRTMissing as first:
        try:
            return _tensorrt_rtx()
        except TensorRTMissing as second:
            raise TensorRTMissing(f"{first}\nNor is TensorRT-RTX (for ahead-of-time SM80 builds): {second}") from None
