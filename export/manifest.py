"""The export manifest: the one file the engine builder and the runtime read.

`<export>/tp<N>/manifest.json` holds the format version, the model config, the tensor-parallel
settings, the ordered steps, every subgraph's I/O and files per rank, and the size and sha256 of
every file. A file that does not match is an error that names it, never a silent run.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig

FORMAT_VERSION = 2  # 2: special ids from the checkpoint's text files (model.eos_token_ids)
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """The export is missing, from another format version, or its files do not match it."""


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write-then-rename: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=1).encode())


@dataclass
class Manifest:
    root: Path
    data: dict

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{path}: no manifest; run `make onnx` (an interrupted export leaves none)")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ManifestError(f"{path}: unreadable ({e})") from e
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"{path}: format version {data.get('format_version')!r}, this code reads "
                                f"{FORMAT_VERSION}; export again")
        return cls(path.parent, data)

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.data["model"])

    @property
    def tp(self) -> int:
        return self.data["tp"]

    @property
    def steps(self) -> list[dict]:
        return self.data["steps"]

    @property
    def subgraphs(self) -> dict[str, dict]:
        return self.data["subgraphs"]

    def path(self, subgraph: str, rank: int, kind: str = "bf16") -> Path:
        """The ONNX file of one subgraph on one rank: kind "bf16" (for TensorRT) or "fp32" (the twin)."""
        sg = self.subgraphs.get(subgraph)
        if sg is None:
            raise ManifestError(f"{self.root / MANIFEST}: no subgraph {subgraph!r}")
        files = sg["files"].get(str(rank))
        if files is None:
            raise ManifestError(f"subgraph {subgraph} has no files for rank {rank} (ranks {sg['ranks']})")
        if kind not in files:
            raise ManifestError(f"subgraph {subgraph} has no {kind} graph in this export "
                                f"(fp32 twins: {self.data['fp32_twins']})")
        return self.root / files[kind]["onnx"]

    def verify(self, ranks: list[int] | None = None, kinds: tuple[str, ...] = ("bf16", "fp32"),
               hashes: bool = True) -> None:
        """Every file the manifest lists for these ranks exists with its recorded size (and sha256)."""
        wanted = set()
        for sg in self.subgraphs.values():
            for rank, files in sg["files"].items():
                if ranks is None or int(rank) in ranks:
                    for kind in kinds:
                        if kind in files:
                            wanted.update((files[kind]["onnx"], files[kind]["weights"]))
        for rel in sorted(wanted):
            meta = self.data["files"][rel]
            p = self.root / rel
            if not p.is_file():
                raise ManifestError(f"{p}: listed in the manifest but missing")
            if p.stat().st_size != meta["bytes"]:
                raise ManifestError(f"{p}: {p.stat().st_size} bytes, the manifest says {meta['bytes']}")
            if hashes and sha256_file(p) != meta["sha256"]:
                raise ManifestError(f"{p}: content does not match the manifest's sha256; export again")


def find_manifest(path: str | Path) -> Path:
    """Accept a manifest, a tp<N> folder, or an export folder holding one tp<N>."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / MANIFEST).is_file():
        return p / MANIFEST
    found = sorted(p.glob(f"tp*/{MANIFEST}")) if p.is_dir() else []
    if len(found) == 1:
        return found[0]
    if found:
        raise ManifestError(f"{p} holds exports for several TP sizes ({', '.join(f.parent.name for f in found)}); "
                            "name one")
    raise ManifestError(f"{p}: no export manifest here; run `make onnx MODEL=<checkpoint>` first")


def engines_dir(manifest: "Manifest") -> Path:
    """Where an export's engines go by default: build/<model>/onnx/tp<N> -> build/<model>/engines/tp<N>."""
    return manifest.root.parent.parent / "engines" / manifest.root.name
