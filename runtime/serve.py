"""An OpenAI-compatible HTTP server for an export (TP from the export, as chat.py).

    python -m runtime.serve --model build/<model>/onnx/tp8 [--host 127.0.0.1] [--port 8000] [--backend trt ...]

Endpoints: /v1/models, /v1/chat/completions, /v1/completions (streaming or not), /health, /metrics.
Point any OpenAI client at http://HOST:PORT/v1. Ctrl-C or SIGTERM drains and stops (ranks included).

It listens on loopback unless --host says otherwise; with --api-key (or MINIMAX_API_KEY) every route but
/health and /metrics needs `Authorization: Bearer KEY`. If the engine dies (a lost or hung rank, a
kernel fault) the server answers 503, ends every open stream with an error and exits with code 3
within seconds, for its supervisor (systemd, Kubernetes) to restart it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.manifest import ManifestError  # noqa: E402
from runtime.config import EngineConfig  # noqa: E402
from runtime.llm_engine import LLMEngine  # noqa: E402
from runtime.serving.openai_server import OpenAIServer, ServerLimits  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="export folder, tp<N> folder or manifest.json")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    ap.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint's folder name)")
    ap.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    ap.add_argument("--api-key", default=os.environ.get("MINIMAX_API_KEY"),
                    help="require `Authorization: Bearer KEY` on every route but /health and /metrics "
                         "(default: $MINIMAX_API_KEY; unset: no key)")
    ap.add_argument("--ssl-keyfile", help="TLS private key file (with --ssl-certfile: serve HTTPS)")
    ap.add_argument("--ssl-certfile", help="TLS certificate file")
    ap.add_argument("--max-request-bytes", type=int, default=ServerLimits.max_body_bytes,
                    help=f"largest request body; larger ones get 413 (default {ServerLimits.max_body_bytes})")
    ap.add_argument("--max-waiting-requests", type=int, default=ServerLimits.max_waiting,
                    help="requests that may wait beyond the running batch; more get 429 "
                         f"(default {ServerLimits.max_waiting})")
    EngineConfig.add_cli_args(ap.add_argument_group("runtime"))
    a = ap.parse_args(argv)
    if bool(a.ssl_keyfile) != bool(a.ssl_certfile):
        ap.error("--ssl-keyfile and --ssl-certfile go together")
    if a.max_request_bytes < 1 or a.max_waiting_requests < 1:
        ap.error("--max-request-bytes and --max-waiting-requests must be >= 1")
    import uvicorn

    try:
        engine = LLMEngine.start(a.model, EngineConfig.from_args(a))
    except (ManifestError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = a.served_model_name or (Path(engine.manifest.checkpoint).name if engine.manifest.checkpoint
                                   else "minimax-m2")
    server = OpenAIServer(engine, name, ServerLimits(api_key=a.api_key or None, max_body_bytes=a.max_request_bytes,
                                                     max_waiting=a.max_waiting_requests))
    scheme = "https" if a.ssl_certfile else "http"
    print(f"serving {name} ({engine.manifest.root}, backend {engine.backend.name}, TP {engine.manifest.tp}) "
          f"on {scheme}://{a.host}:{a.port}/v1" + (" (API key required)" if a.api_key else ""), file=sys.stderr, flush=True)
    try:
        uvicorn.run(server.app, host=a.host, port=a.port, log_level=a.log_level, ssl_keyfile=a.ssl_keyfile,
                    ssl_certfile=a.ssl_certfile)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
