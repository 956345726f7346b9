"""Every engine against ONNX Runtime on the same inputs, through polygraphy (machines with TensorRT).

    python -m engines.verify build/<model>/onnx/tp<N> [--engines DIR] [--tokens 1,7,300]

For each engine and token count: random inputs, the engine run in BF16 (TensorRT) and the FP32 twin
on ONNX Runtime (CPU has no BF16 MatMul), compared with a BF16 tolerance (rtol and atol 2^-5 of the
output's scale: a few BF16 roundings through a layer).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from export.layout import random_inputs
from export.manifest import Manifest


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
        twin = man.path(rec.subgraph, rec.rank, "fp32")
        for t in (int(x) for x in a.tokens.split(",")):
            if not any(p.min <= t <= p.max for p in rec.profiles):
                continue
            feed = random_inputs(sg.inputs, t, man.config.vocab_size, seed=t)
            results = RunResults()
            with TrtRunner(EngineFromBytes((out / engine_rel).read_bytes())) as trt_runner:
                trt_in = {k: (v.bfloat16().cuda() if s.dtype == "bfloat16" else v.cuda())
                          for (k, v), s in zip(feed.items(), sg.inputs)}
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
