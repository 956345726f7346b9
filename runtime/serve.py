"""An OpenAI-compatible HTTP server for an export (TP from the export, as chat.py).

    python -m runtime.serve --model build/<model>/onnx/tp8 [--host 127.0.0.1] [--port 8000] [--backend trt ...]

Endpoints: /v1/models, /v1/chat/completions, /v1/completions (streaming or not), /health, /metrics.
Point any OpenAI client at http://HOST:PORT/v1. Ctrl-C or SIGTERM drains and stops (ranks included).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.manifest import ManifestError  # noqa: E402
from runtime.config import EngineConfig  # noqa: E402
from runtime.llm_engine import LLMEngine  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="export folder, tp<N> folder or manifest.json")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    ap.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint's folder name)")
    ap.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    EngineConfig.add_cli_args(ap.add_argument_group("runtime"))
    a = ap.parse_args(argv)
    import uvicorn

    from runtime.serving.openai_server import OpenAIServer

    try:
        engine = LLMEngine.start(a.model, EngineConfig.from_args(a))
    except (ManifestError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = a.served_model_name or (Path(engine.manifest.checkpoint).name if engine.manifest.checkpoint
                                   else "minimax-m2")
    server = OpenAIServer(engine, name)
    print(f"serving {name} ({engine.manifest.root}, backend {engine.backend.name}, TP {engine.manifest.tp}) "
          f"on http://{a.host}:{a.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(server.app, host=a.host, port=a.port, log_level=a.log_level)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
