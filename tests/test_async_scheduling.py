"""Adversarial tests of async scheduling (runtime/llm_engine.py: each step launched before the previous
step's tokens reach the host; a sequence whose token is still on the device has `pending` > 0).

The reference is the same engine one step at a time (async_scheduling=False) in a roomy configuration
(a cache that holds every request, steps that take whole prompts: no preemption, no chunking): greedy
tokens must be identical, cut where the request's own stop ids, max_tokens or max_model_len end it
(the cut is computed here, from the reference's uncut output). That engine equals transformers on
these prompts (tests/test_runtime.py); two prompts are checked against transformers here too."""
import random

import pytest
import torch

from runtime.config import EngineConfig
from runtime.constrained import Constraint, Spec
from runtime.llm_engine import LLMEngine
from runtime.sampling import SamplingParams
from runtime.sequence import Status
from tests.reference import bf16_weight_reference, greedy

# a small schema the random toy model finishes within a few dozen tokens (enums, a bounded integer)
SMALL = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "minimum": 1,
         "maximum": 9}, "ok": {"type": "boolean"}}, "required": ["unit", "days", "ok"], "additionalProperties": False}


def _engine(man, **kw) -> LLMEngine:
    return LLMEngine(man.root, EngineConfig(**kw))


def _drain(e: LLMEngine) -> dict[int, list]:
    """Step to the end; each sequence's reported tokens (None for an error), in the order reported."""
    got: dict[int, list] = {}
    while e.has_unfinished():
        for out in e.step():
            got.setdefault(out.seq.id, []).append(out.token)
    return got


# ---- a grammar that starts after a token (the end of a thinking block) -----------------------------

def test_a_grammar_waiting_for_its_start_token_is_followed_under_async_scheduling(exported):
    """A constrained request whose grammar starts after a token (runtime/constrained.py `wait_for`:
    a prompt that opened a thinking block) samples unconstrained until that token, then under the
    grammar. While it waits its constraint is not `active` (no mask is sent), yet the constraint must
    still see every token to notice the start, and the step after the start token must be masked: so
    such a request's tokens cannot stay on the device. Before the fix its steps ran async, the start
    token was never given to the matcher, and the grammar never began. The reference: the same
    request one step at a time, and the grammar itself (a fresh matcher accepts every token after the
    start token, and the output after it ends with an end token the grammar allows)."""
    man = exported("tiny", 1)
    sync = _engine(man, block_size=4, async_scheduling=False)
    prompt = [1, 5, 9, 33, 2]
    free = sync.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].output
    start = free[2]  # the greedy third token: the grammar starts once the model emits it
    compiled = sync.grammars.compile(Spec("json", schema=SMALL))
    keep = sync.grammars.keep("json")
    V = man.config.vocab_size

    def run(e):
        c = Constraint(compiled, start, V, keep)
        seq = e.add_request(prompt, SamplingParams(temperature=0, max_tokens=80), c)
        got = _drain(e)
        return seq, got[seq.id]

    want, _ = run(sync)
    e = _engine(man, block_size=4, async_scheduling=True)
    seq, reported = run(e)
    assert seq.output == want.output and reported == seq.output
    assert seq.finish_reason == want.finish_reason == "stop"
    # the grammar's own check: a fresh matcher takes every token after the first start token
    after = seq.output[seq.output.index(start) + 1:]
    fresh = Constraint(compiled, None, V, keep)
    assert after and all(fresh.accept(t) for t in after)
    assert fresh.matcher.is_terminated()  # the last token (an end token) closed the grammar
    e.blocks.check([])
