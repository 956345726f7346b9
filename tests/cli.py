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


# Greedy references already computed this session, per (export's fingerprint, prompt, length, flags):
# servers in several test files are checked against the same prompts, and each chat.py run pays
# for an interpreter, the imports and an engine load (seconds) before its first token.
_REFERENCES: dict[tuple, list[int]] = {}


def _fingerprint(export: Path) -> tuple:
    """The export's top-level files (manifest, tokenizer, configs) by name, size and mtime: a test that
    rewrites one at the same path gets a fresh reference, not a stale one."""
    root = Path(export).resolve()
    root = root.parent if root.is_file() else root
    return (str(root), tuple(sorted((f.name, st.st_size, st.st_mtime_ns)
                                    for f in root.iterdir() if f.is_file() for st in [f.stat()])))


def chat_outputs(export: Path, prompts_ids=(), texts=(), n: int = 16, *extra) -> list[list[int]]:
    """Greedy outputs of `chat.py --json` for id prompts then text prompts, in that order. Prompts
    already run this session with the same export and flags, for this length or a longer one, are not
    run again; the rest run together in one chat.py (greedy tokens do not depend on the batch:
    tests/test_runtime.py)."""
    base = (_fingerprint(export), n, tuple(map(str, extra)))
    keys = [base + ("ids", tuple(p)) for p in prompts_ids] + [base + ("text", t) for t in texts]
    for k in keys:  # a longer greedy run's first n tokens are this run (an end-of-turn stops both alike)
        longer = [v for c, v in _REFERENCES.items() if c[0] == k[0] and c[2:] == k[2:] and c[1] > n]
        if k not in _REFERENCES and longer:
            _REFERENCES[k] = longer[0][:n]
    todo = [k for k in dict.fromkeys(keys) if k not in _REFERENCES]  # ids before texts, as chat.py orders them
    if todo:
        args = ["--model", export, "--json", "--max-tokens", n, "--temperature", 0, *extra]
        for k in todo:
            args += ["--prompt-ids", ",".join(map(str, k[-1]))] if k[-2] == "ids" else ["--prompt", k[-1]]
        r = run_chat(*args)
        assert r.returncode == 0, r.stderr
        _REFERENCES.update(zip(todo, last_json(r)["outputs"], strict=True))
    return [list(_REFERENCES[k]) for k in keys]
