"""The project's command lines as a user runs them, for tests: `runtime/chat.py` and `python -m ...`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def chat_cmd(*args) -> list[str]:
    return [sys.executable, str(ROOT / "runtime" / "chat.py"), *map(str, args)]


def run_chat(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(chat_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_module(module: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def last_json(r: subprocess.CompletedProcess) -> dict:
    """The JSON object a scripted run prints as its last line."""
    assert r.returncode in (0, 1), r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def chat_outputs(export: Path, prompts_ids=(), texts=(), n: int = 16, *extra) -> list[list[int]]:
    """Greedy outputs of `chat.py --json` for id prompts then text prompts, in that order."""
    args = ["--model", export, "--json", "--max-tokens", n, "--temperature", 0, *extra]
    for p in prompts_ids:
        args += ["--prompt-ids", ",".join(map(str, p))]
    for t in texts:
        args += ["--prompt", t]
    r = run_chat(*args)
    assert r.returncode == 0, r.stderr
    return last_json(r)["outputs"]
