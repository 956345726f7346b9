"""Where each stage writes by default, in one place (the Makefile spells the same layout):

    build/<checkpoint name>/onnx/tp<N>/      the export (manifest.json, rank<r>/...)
    build/<checkpoint name>/engines/tp<N>/   its TensorRT engines (engines.json, rank<r>/*.engine)
    build/<checkpoint name>/triton/          a Triton model repository
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = Path("build")
TINY_CHECKPOINT = ROOT / BUILD / "tiny-minimax-m2"  # the embedded toy model (`make tiny`)


def export_dir(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """The export folder (holding tp<N>/) of a checkpoint."""
    return Path(out) if out else BUILD / Path(checkpoint).resolve().name / "onnx"


def tp_dir(export: str | Path, tp: int) -> Path:
    return Path(export) / f"tp{tp}"


def engines_dir(manifest_root: str | Path) -> Path:
    """An export's engines: <x>/onnx/tp<N> -> <x>/engines/tp<N>."""
    root = Path(manifest_root)
    return root.parent.parent / "engines" / root.name


def triton_dir(manifest_root: str | Path) -> Path:
    """An export's Triton repository: <x>/onnx/tp<N> -> <x>/triton."""
    return Path(manifest_root).parent.parent / "triton"
