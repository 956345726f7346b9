"""Token ids on the command line: "1,5,9" -> [1, 5, 9] (export.generate --ids, chat.py --prompt-ids)."""
from __future__ import annotations

import argparse


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"token ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("no token ids given")
    return ids
