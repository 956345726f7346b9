"""Write a Triton Inference Server model repository that hosts the runtime.

    python -m runtime.serving.triton_repo build/<model>/onnx/tp8 --out build/<model>/triton [--copy]

Per-layer engines cannot carry the KV cache between steps inside a Triton ensemble, so the whole
runtime (scheduler, paged KV cache, continuous batching) runs inside one decoupled Python-backend
model that streams a response per generated token. The repository holds:

    <out>/<name>/config.pbtxt         generated from Triton's ModelConfig protobuf and parsed back
    <out>/<name>/1/model.py           loads runtime/serving/triton_model.py from beside it
    <out>/<name>/1/{runtime,export}/  this project's runtime code (what model.py imports)
    <out>/<name>/artifacts/           only with --copy: the export (and engines) copied in

Without --copy the export and engines are referenced in place (absolute paths in config.pbtxt).
The backend is TensorRT when the export's engines exist (`make engines`), else ONNX Runtime.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from export.manifest import ENGINES_JSON, Manifest, ManifestError, find_manifest
from export.paths import engines_dir
from runtime.config import EngineConfig

ROOT = Path(__file__).resolve().parents[2]  # the repository: runtime/serving/ -> .
CODE_PACKAGES = ("runtime", "export")
MODEL_PY = '''"""Triton Python-backend entry point; the model is runtime/serving/triton_model.py beside this file."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime.serving.triton_model import TritonPythonModel  # noqa: E402,F401
'''

# name, Triton data type, dims. Every input is optional: a request gives text_input or input_ids,
# and the sampling inputs default to the model's generation_config.json.
INPUTS = [
    ("text_input", "TYPE_STRING", [1]),        # a user message (chat template applied) or raw text
    ("input_ids", "TYPE_INT64", [-1]),         # a prompt as token ids, used as given
    ("chat_template", "TYPE_BOOL", [1]),       # text_input through the chat template (default true)
    ("thinking", "TYPE_BOOL", [1]),            # false: the prompt closes the thinking block (default true)
    ("max_tokens", "TYPE_INT32", [1]),
    ("temperature", "TYPE_FP32", [1]),         # 0: greedy
    ("top_p", "TYPE_FP32", [1]),
    ("top_k", "TYPE_INT32", [1]),              # 0: off
    ("seed", "TYPE_INT64", [1]),
    ("stop", "TYPE_STRING", [-1]),             # stop strings (not included in the output)
    ("stop_token_ids", "TYPE_INT64", [-1]),
    ("ignore_eos", "TYPE_BOOL", [1]),
    ("stream", "TYPE_BOOL", [1]),              # false: one response at the end (HTTP /generate)
    ("tools", "TYPE_STRING", [1]),             # JSON list of OpenAI tools: shown by the chat template, typing the calls
]
# One response per generated token (stream=false: one in all); the last carries finish_reason and
# the final flag.
OUTPUTS = [
    ("text_output", "TYPE_STRING", [1]),       # answer text this token completes (may be empty)
    ("reasoning_output", "TYPE_STRING", [1]),  # thinking text (output up to </think> when the prompt opened it)
    ("tool_calls_output", "TYPE_STRING", [1]),  # JSON list of tool-call deltas {index, id, name, arguments}
    ("output_ids", "TYPE_INT64", [-1]),        # the token(s) of this response
    ("finish_reason", "TYPE_STRING", [1]),     # "" until the end: stop | length | abort
    ("prompt_tokens", "TYPE_INT32", [1]),
    ("completion_tokens", "TYPE_INT32", [1]),  # generated so far
    ("cached_tokens", "TYPE_INT32", [1]),      # prompt tokens served from the prefix cache
    ("batch_size", "TYPE_INT32", [1]),         # sequences in the step that made this token
]


class RepoError(ValueError):
    pass


def model_config(name: str, params: dict[str, str]):
    """The ModelConfig message; text_format round-trips it, so a field Triton does not know fails here."""
    from tritonclient.grpc import model_config_pb2 as mc

    c = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    c.model_transaction_policy.decoupled = True
    for spec, (n, t, dims) in [(c.input.add(), i) for i in INPUTS]:
        spec.name, spec.data_type, spec.optional = n, mc.DataType.Value(t), True
        spec.dims.extend(dims)
    for spec, (n, t, dims) in [(c.output.add(), o) for o in OUTPUTS]:
        spec.name, spec.data_type = n, mc.DataType.Value(t)
        spec.dims.extend(dims)
    # KIND_MODEL: the runtime places its own ranks on GPUs (one process per rank), not Triton.
    c.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_MODEL)
    for k, v in params.items():
        c.parameters[k].string_value = str(v)
    return c


def config_text(config) -> str:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    text = text_format.MessageToString(config)
    parsed = text_format.Parse(text, mc.ModelConfig())  # raises on anything outside the schema
    if parsed != config:
        raise RepoError("config.pbtxt does not round-trip through Triton's ModelConfig schema")
    return text


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # same filesystem: no second copy of hundreds of GB (files are never rewritten in place)
    except OSError:
        shutil.copy2(src, dst)


def copy_tree(src: Path, dst: Path, skip_suffixes: tuple[str, ...] = ()) -> None:
    from tqdm import tqdm

    files = [p for p in sorted(src.rglob("*")) if p.is_file() and not p.name.startswith(".")
             and not p.name.endswith(skip_suffixes)]
    for p in tqdm(files, desc=f"copy {src.name}", unit="file", disable=len(files) < 50):
        _link_or_copy(p, dst / p.relative_to(src))


def write_repository(model: str | Path, out: str | Path, name: str = "minimax_m2", backend: str = "auto",
                     engines: str | Path | None = None, copy: bool = False,
                     config: EngineConfig | None = None) -> Path:
    """Write (or replace) `<out>/<name>`; returns that folder. Written beside it and renamed into
    place, so a failed write leaves the previous model as it was. `config`: the runtime settings the
    model starts its engine with (backend, engines and, unless given, device are decided here)."""
    manifest = Manifest.load(find_manifest(model))
    engines = Path(engines) if engines else engines_dir(manifest.root)
    has_engines = (engines / ENGINES_JSON).is_file()
    if backend == "auto":
        backend = "trt" if has_engines else "ort"
    if backend == "trt" and not has_engines:
        raise RepoError(f"{engines}: no engines.json; run `make engines` or use --backend ort")
    if backend == "ort" and not manifest.fp32_twins:
        raise RepoError(f"{manifest.root}: exported without FP32 twins, which the ort backend runs; "
                        "export again with --fp32-twins on (`make onnx TWINS=on`) or use --backend trt")
    if backend == "torch" and copy:
        raise RepoError("the torch backend reads the checkpoint the export came from; reference it in place "
                        "(no --copy)")
    config = replace(config or EngineConfig(), backend=backend, engines=None)
    if backend == "trt" and not config.device.startswith("cuda"):
        config = replace(config, device="cuda")  # engines run on the GPU
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = out / name
    # Staged beside the repository, not in it: Triton would take a folder in it for a model.
    tmp = Path(tempfile.mkdtemp(dir=out.resolve().parent, prefix=f".{out.name}-{name}-"))
    try:
        version = tmp / "1"
        version.mkdir()
        (version / "model.py").write_text(MODEL_PY)
        for pkg in CODE_PACKAGES:
            shutil.copytree(ROOT / pkg, version / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if copy:
            # TensorRT engines hold their weights: with them, the export's ONNX files are not needed.
            skip = (".onnx", ".weights", ".data") if backend == "trt" else ()
            copy_tree(manifest.root, tmp / "artifacts" / "onnx", skip)
            if backend == "trt":
                copy_tree(engines, tmp / "artifacts" / "engines")
            model_ref, engines_ref = "artifacts/onnx", "artifacts/engines"
        else:
            model_ref, engines_ref = str(manifest.root.resolve()), str(engines.resolve())
        params = {"model": model_ref} | config.to_strings()
        if backend == "trt":
            params["engines"] = engines_ref
        (tmp / "config.pbtxt").write_text(config_text(model_config(name, params)))
        old = out.resolve().parent / f".{out.name}-{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.serving.triton_repo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="export folder, tp<N> folder or manifest.json")
    ap.add_argument("--out", required=True, help="model repository folder (other models in it are kept)")
    ap.add_argument("--name", default="minimax_m2", help="model name in the repository (default minimax_m2)")
    ap.add_argument("--backend", choices=["auto", "trt", "ort", "torch"], default="auto",
                    help="auto: trt when the export's engines exist, else ort (default auto)")
    ap.add_argument("--engines", help="engines folder (default build/<model>/engines/tp<N>)")
    ap.add_argument("--copy", action="store_true",
                    help="copy the export (and engines) into the repository (hard links on the same filesystem) "
                         "instead of referencing them in place")
    EngineConfig.add_cli_args(ap, skip=("backend", "engines"))  # the runtime settings the model starts with
    a = ap.parse_args(argv)
    try:
        path = write_repository(a.model, a.out, a.name, a.backend, a.engines, a.copy, EngineConfig.from_args(a))
    except (ManifestError, RepoError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} (serve it: python -m runtime.serving.triton_server {Path(a.out)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
