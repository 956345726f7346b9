"""Every engine against ONNX Runtime on the same inputs, through polygraphy (machines with TensorRT).

    python -m engines.verify build/<model>/onnx/tp<N> [--engines DIR] [--tokens 1,7,300]

For each engine and token count: random inputs (and the subgraph's weight inputs, the experts, from
the export), the engine run in BF16 (TensorRT) and the FP32 twin on ONNX Runtime (CPU has no BF16
MatMul), compared with a BF16 tolerance (rtol and atol 2^-5 of the output's scale: a few BF16
roundings through a layer). Exports without twins (`make engines` writes none) get each twin made
in a temporary folder for its check.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from export.layout import random_inputs
from export.manifest import Manifest


@contextlib.contextmanager
def fp32_twin(man: Manifest, subgraph: str, rank: int):
    """The export's twin of a subgraph, or one made from its BF16 graph in a temporary folder."""
    if "fp32" in man.subgraphs[subgraph].files[rank]:
        yield man.path(subgraph, rank, "fp32")
        return
    import onnx

    from export import surgery
    bf16 = man.path(subgraph, rank, "bf16")
    with tempfile.TemporaryDirectory() as tmp:
        weights = surgery.WeightsFile(Path(tmp) / "twin.weights")
        twin = surgery.fp32_twin(onnx.load(str(bf16), load_external_data=False), bf16.parent, weights)
        weights.close()
        surgery.save(twin, Path(tmp) / "twin.onnx")
        yield Path(tmp) / "twin.onnx"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engines.verify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", help="export folder (tp<N>) or manifest.json")
    ap.add_argument("--engines", help="engines folder (default build/<model>/engines/tp<N>)")
    ap.add_argument("--tokens", default="1,7,300", help="token counts to try (default 1,7,300)")
    a = ap.parse_args(argv)
    from engines.build import BuildEnvironmentError, check_environment
    from export.manifest import EnginesIndex, find_manifest
    from export.paths import engines_dir
    try:
        check_environment("tensorrt")  # polygraphy runs the engines with TensorRT 11
    except BuildEnvironmentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import CompareFunc, Comparator, RunResults

    man = Manifest.load(find_manifest(a.export))
    out = Path(a.engines) if a.engines else engines_dir(man.root)
    records = EnginesIndex.load(out).engines
    failures = 0
    for engine_rel, rec in sorted(records.items()):
        sg = man.subgraphs[rec.subgraph]
        # the experts, as the runtime binds them
        weights = {k: torch.from_numpy(v) for k, v in man.weight_input_arrays(rec.subgraph, rec.rank, "float32").items()}
        dtypes = {s.name: s.dtype for s in list(sg.inputs) + list(sg.weight_inputs)}
        engine = (out / engine_rel).read_bytes()
        with fp32_twin(man, rec.subgraph, rec.rank) as twin:
            for t in (int(x) for x in a.tokens.split(",")):
                if not any(p.min <= t <= p.max for p in rec.profiles):
                    continue
                feed = random_inputs(sg.inputs, t, man.config.vocab_size, seed=t)
                feed |= weights
                results = RunResults()
                with TrtRunner(EngineFromBytes(engine)) as trt_runner:
                    trt_in = {k: (v.bfloat16().cuda() if dtypes[k] == "bfloat16" else v.cuda()) for k, v in feed.items()}
                    trt_out = trt_runner.infer(trt_in)
                    results.append((trt_runner.name, [{k: np.asarray(v.float().cpu()) for k, v in trt_out.items()}]))
                with OnnxrtRunner(SessionFromOnnx(str(twin))) as ort_runner:
                    ort_out = ort_runner.infer({k: v.numpy() for k, v in feed.items()})
                    results.append((ort_runner.name, [dict(ort_out)]))
                ok = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(rtol=2 ** -5, atol=2 ** -5))
                failures += not bool(ok)
                print(f"{'ok  ' if ok else 'FAIL'} {engine_rel} T={t}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
