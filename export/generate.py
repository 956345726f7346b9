"""Greedy generation with the traceable PyTorch model, straight from the FP8 checkpoint.

This is the reference path the exported graphs are checked against: no KV cache (every step
recomputes the whole sequence), all weights in memory. Fine for the embedded toy model and for
checking a few layers of a real one; the runtime (runtime/chat.py) is what serves.

The last line printed is one JSON object: {"tokens": [generated ids]}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .checkpoint import Checkpoint, CheckpointError
from .config import ConfigError, note_missing_eos
from .model import MOE_FORMS, Model
from .sharding import EXPERT_SPLITS, ShardingError
from .token_ids import parse_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="MiniMax-M2 checkpoint directory (FP8 safetensors, config.json, index)")
    ap.add_argument("--ids", type=parse_ids, required=True, help="prompt token ids, e.g. 1,5,9")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    ap.add_argument("--moe", choices=MOE_FORMS, default="gather",
                    help="MoE form: gather (chosen experts only) or dense (one-hot over all experts)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")
    ap.add_argument("--tp", type=int, default=1,
                    help="simulate this many tensor-parallel ranks in one process (sums where ranks all-reduce)")
    ap.add_argument("--expert-split", choices=EXPERT_SPLITS, default="intermediate",
                    help="how experts are split across ranks when --tp > 1")
    ap.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-turn token")
    a = ap.parse_args(argv)
    if a.max_new_tokens < 1:
        ap.error("--max-new-tokens must be at least 1")
    try:
        ckpt = Checkpoint(a.checkpoint)
        vocab = ckpt.config.vocab_size
        bad = [i for i in a.ids if not 0 <= i < vocab]
        if bad:
            ap.error(f"token ids {bad} are outside the vocabulary (0..{vocab - 1})")
        if len(a.ids) + a.max_new_tokens > ckpt.config.max_position_embeddings:
            ap.error(f"prompt ({len(a.ids)}) + new tokens ({a.max_new_tokens}) exceed the context "
                     f"({ckpt.config.max_position_embeddings})")
        if not a.ignore_eos:
            note_missing_eos(ckpt.config)
        t0 = time.perf_counter()
        model = Model(ckpt, DTYPES[a.dtype], a.moe, tp=a.tp, expert_split=a.expert_split, progress=True)
        t1 = time.perf_counter()
        tokens = model.generate(a.ids, a.max_new_tokens, stop_at_eos=not a.ignore_eos)
        t2 = time.perf_counter()
    except (CheckpointError, ConfigError, ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"loaded in {t1 - t0:.2f} s; {len(tokens)} tokens in {t2 - t1:.2f} s "
          f"({a.dtype}, moe={a.moe}, tp={a.tp})", file=sys.stderr)
    print(json.dumps({"tokens": tokens}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
