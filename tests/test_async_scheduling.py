"""Adversarial tests of async scheduling (runtime/llm_engine.py: each step launched before the previous
step's tokens reach the host; a sequence whose token is still on the device has `pending` > 0).

The reference is the same engine one step at a time (async_scheduling=False) in a roomy configuration
(a cache that holds every request, steps that take whole prompts: no preemption, no chunking): greedy
tokens must be identical, cut where the request's own stop ids, max_tokens or max_model_len end it
(the cut is computed here, from the reference's uncut output). That engine equals transformers on
these prompts (tests/test_runtime.py); two prompts are checked against transformers here too."""
import random
from collections import Counter

import pytest
import torch

from runtime.config import EngineConfig
from runtime.constrained import Constraint, Spec
from runtime.llm_engine import LLMEngine
from runtime.sampling import SamplingParams, on_device
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


# ---- randomized: arrivals, aborts, NaN rows, stops, a small cache, chunked prompts ----------------

class Req:
    """One planned request: its prompt and parameters, when it arrives (the engine's step count),
    and at most one disturbance: an abort once it has `abort_after` tokens, or NaN logits in the row
    that samples its token number `nan_at` (0-based)."""

    def __init__(self, prompt, params, kind, arrive, abort_after=None, nan_at=None, grammar=None):
        self.prompt, self.params, self.kind, self.arrive = prompt, params, kind, arrive
        self.abort_after, self.nan_at, self.grammar = abort_after, nan_at, grammar


def _cut(full: list[int], req: Req, eos: list[int], max_model_len: int) -> tuple[list[int], str]:
    """What an uncut output becomes under the request's ends, first come first: a stop id (or an end
    token without ignore_eos) ends it after that token, then max_tokens, then max_model_len."""
    p = req.params
    for n, tok in enumerate(full, start=1):
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in eos):
            return full[:n], "stop"
        if n >= p.max_tokens or len(req.prompt) + n >= max_model_len:
            return full[:n], "length"
    raise AssertionError("the reference output is too short for this request")


def _plan(rng: random.Random, vocab: int, grammar, max_model_len: int) -> list[Req]:
    """Random prompts (some sharing a prefix with an earlier one, so the prefix cache hits blocks that
    other requests registered) with a mix of the sampling kinds that take different paths."""
    prompts: list[list[int]] = []
    for _ in range(22):
        if prompts and rng.random() < 0.35:
            base = rng.choice(prompts)
            p = base[:rng.randint(1, len(base))] + [rng.randrange(vocab) for _ in range(rng.randint(0, 9))]
        else:
            p = [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
        prompts.append(p[:max_model_len - 1])  # the longest prompt the engine takes
    reqs, arrive = [], 0
    for p in prompts:
        kind = rng.choices(["greedy", "top1", "seeded", "logprobs", "random", "grammar"],
                           weights=[8, 2, 2, 1, 1, 1])[0]
        max_tokens = rng.randint(1, 14)
        ignore_eos = rng.random() < 0.8
        if kind == "seeded":
            params = SamplingParams(temperature=0.9, top_k=20, seed=rng.randrange(1000), max_tokens=max_tokens,
                                    ignore_eos=ignore_eos)
        elif kind in ("top1", "random"):  # unseeded: sampled on the device; top_k=1 leaves the greedy token
            params = SamplingParams(temperature=1.5, top_k=1 if kind == "top1" else 0, max_tokens=max_tokens,
                                    ignore_eos=ignore_eos)
        else:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos,
                                    logprobs=2 if kind == "logprobs" else None)
        disturb = rng.random()
        abort_after = rng.randint(0, 6) if disturb < 0.2 else None
        nan_at = rng.randint(0, 6) if 0.2 <= disturb < 0.3 else None
        arrive += rng.choice([0, 0, 1, 2, 4])
        reqs.append(Req(p, params, kind, arrive, abort_after, nan_at, grammar if kind == "grammar" else None))
    return reqs


def _run(e: LLMEngine, reqs: list[Req], constraint) -> tuple[list, dict, Counter]:
    """Drive the plan: arrivals at their step, aborts between steps, NaN rows injected into the
    step's logits. After every step the block manager's invariants hold and no sequence has more
    than one token on the device. Returns the sequences, what the steps reported of each, and how
    often the run met each case async scheduling must handle."""
    seqs = [None] * len(reqs)
    by_id = {}
    batch = {}
    seen = Counter()
    schedule, run = e.scheduler.schedule, e.executor.run

    def scheduled():
        batch["now"] = b = schedule()
        seen["skipped: its token on the device ends it"] += sum(
            1 for q in e.scheduler.running if q.pending and q not in b.seqs)
        return b

    def poisoned(ids, positions, meta, rows, k, extras=None, carried=None):
        out = run(ids, positions, meta, rows, k, extras, carried)
        b = batch["now"]
        if carried is not None:
            seen["steps taking ids from the device"] += 1
            seen["of those, completing at once"] += not all(
                on_device(q.params) and q.constraint is None for i, q in enumerate(b.seqs) if b.completes(i)) \
                or extras is not None
        for i, seq in enumerate(b.seqs):
            r = by_id[seq.id]
            # the row samples output token number len(seq) - prompt (len counts a token on the device)
            if r.nan_at is not None and b.completes(i) and len(seq) - seq.num_prompt == r.nan_at:
                out = out.clone()
                out[i, 0] = float("nan")
        return out

    preempt = e.scheduler._preempt

    def preempted(seq):
        seen["preempted with a token on the device"] += seq.pending > 0
        preempt(seq)

    e.scheduler.schedule, e.executor.run, e.scheduler._preempt = scheduled, poisoned, preempted
    reported: dict[int, list] = {}
    tick = 0
    while tick <= reqs[-1].arrive or e.has_unfinished():
        for j, r in enumerate(reqs):
            if r.arrive == tick:
                seqs[j] = e.add_request(r.prompt, r.params, constraint(r))
                by_id[seqs[j].id] = r
        for j, r in enumerate(reqs):
            s = seqs[j]
            if s is not None and r.abort_after is not None and s.status is not Status.FINISHED \
                    and len(s.output) >= r.abort_after:
                seen["aborted with a token on the device"] += s.pending > 0
                seen["aborted waiting"] += s.status is Status.WAITING
                e.abort(s)
        for out in e.step():
            reported.setdefault(out.seq.id, []).append(out.token)
            seen["NaN rows"] += out.error is not None
            seen["ended by max_model_len"] += out.finished and len(out.seq.tokens) >= e.max_model_len
            if out.seq.params.logprobs is not None and out.token is not None:
                # greedy: the chosen token is the most likely; its logprob is the first alternative's
                # (the same float32 value, gathered two ways: 1e-6)
                (best, lp), = out.top_logprobs[:1]
                assert best == out.token and abs(out.logprob - lp) < 1e-6 and len(out.top_logprobs) == 2
        e.blocks.check(e.scheduler.running)
        assert all(s is None or s.pending <= 1 for s in seqs)
        tick += 1
        assert tick < 2000, "the run does not end"
    e.step()  # a step in flight for finished sequences only: completed and dropped
    assert e._inflight is None and all(s.pending == 0 for s in seqs)
    assert e.blocks.num_free == e.blocks.num_usable
    e.blocks.check([])
    return seqs, reported, seen


def _reference(man, rng: random.Random, n: int = 22, backend: str = "ort"):
    """A plan and each request's uncut output from the roomy engine one step at a time; a third of the
    requests then get a stop id taken from their own output (so that it is met), past max_tokens at
    times. Returns (plan, uncut outputs, the grammar's constraint maker)."""
    V = man.config.vocab_size
    clean = _engine(man, backend=backend, block_size=4, num_blocks=512, max_model_len=256,
                    max_num_batched_tokens=256, async_scheduling=False)
    compiled = clean.grammars.compile(Spec("json", schema=SMALL))
    keep = clean.grammars.keep("json")

    def constraint(r):
        return None if r.grammar is None else Constraint(compiled, None, V, keep)

    reqs = _plan(rng, V, "json", MAX_MODEL_LEN)[:n]
    uncut = [Req(r.prompt, SamplingParams(temperature=r.params.temperature, top_k=r.params.top_k,
                                          seed=r.params.seed, max_tokens=16, ignore_eos=True), r.kind, 0,
                 grammar=r.grammar) for r in reqs]
    ref = [s.output for s in _run(clean, uncut, constraint)[0]]
    for r, full in zip(reqs, ref):
        if r.kind != "grammar" and rng.random() < 0.3:
            r.params.stop_token_ids = [full[rng.randrange(min(len(full), r.params.max_tokens + 2))]]
    return reqs, ref, constraint


def _check(reqs, ref, seqs, reported, eos) -> None:
    """Each request against its reference output, cut here by its ends and disturbances."""
    for r, s, full in zip(reqs, seqs, ref):
        got = reported.get(s.id, [])
        if s.finish_reason == "error":  # one error report, last
            assert got[-1] is None and None not in got[:-1]
            got = got[:-1]
        assert got == s.output, r.kind  # each token reported once, in order
        if r.kind == "random":  # its tokens are its own draws: only its ends are checked
            assert len(s.output) <= r.params.max_tokens
            assert s.finish_reason in ("stop", "length", "abort") or (s.finish_reason, len(s.output)) == \
                ("error", r.nan_at)
            continue
        want, reason = _cut(full, r, eos, MAX_MODEL_LEN)
        if r.nan_at is not None and r.nan_at < len(want):
            want, reason = want[:r.nan_at], "error"
        if s.finish_reason == "abort":  # a strict prefix: the token that ends it would have ended it
            assert r.abort_after is not None and s.output == want[:len(s.output)], r.kind
            assert r.abort_after <= len(s.output) < len(want)
        else:
            assert (s.output, s.finish_reason) == (want, reason), (r.kind, r.params)


MAX_MODEL_LEN = 28  # prompts of up to 27 tokens and up to 14 new ones: some requests end by it
# 10 blocks of 4: room for one to three sequences (preemption); 7 tokens a step: prompts run in chunks
CHAOS = dict(block_size=4, num_blocks=10, max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=7, max_num_seqs=6)
# what every plan below meets under async scheduling (counted by _run), and what one plan meets besides
MET = ["steps taking ids from the device", "of those, completing at once", "skipped: its token on the device ends it",
       "preempted with a token on the device", "aborted with a token on the device", "ended by max_model_len"]


@pytest.mark.parametrize("seed,also", [(0, "aborted waiting"), (3, "NaN rows")])
def test_randomized_async_equals_one_step_at_a_time(exported, hf_model, seed, also):
    """Random arrivals, aborts (also of waiting and preempted requests), NaN rows, stop ids, end
    tokens, max_tokens and max_model_len ends, a cache that forces preemption and a step budget that
    chunks prompts, over requests that mix greedy, unseeded device-sampled (top_k 1: the greedy
    token), seeded, logprobs, grammar-constrained and freely sampled rows (the last four make their
    steps complete at once). Async and one-step-at-a-time engines run the same plan; each equals the
    roomy reference, cut here; an aborted request got a prefix of it; every token is reported once,
    in order; every block comes back."""
    man = exported("tiny", 1)
    rng = random.Random(seed)
    torch.manual_seed(seed)  # the freely sampled rows' draws: the same plan runs the same way each time
    reqs, ref, constraint = _reference(man, rng)
    # the roomy reference equals transformers (the first two greedy prompts, 12 tokens)
    hf = bf16_weight_reference(hf_model("tiny"))
    for r, full in [(r, f) for r, f in zip(reqs, ref) if r.kind == "greedy"][:2]:
        assert full[:12] == greedy(hf, r.prompt, 12)
    runs = {}
    for overlap in (False, True):
        e = _engine(man, **CHAOS, async_scheduling=overlap)
        seqs, reported, seen = _run(e, reqs, constraint)
        assert e.scheduler.num_preemptions > 0 and (e.stats.overlapped_steps > 0) == overlap
        _check(reqs, ref, seqs, reported, man.config.eos_token_ids)
        runs[overlap] = seqs
    assert all(seen[k] > 0 for k in MET + [also]), dict(seen)
    # the same plan both ways: the same tokens for every request neither run aborted
    for r, a, b in zip(reqs, runs[False], runs[True]):
        if r.kind != "random" and "abort" not in (a.finish_reason, b.finish_reason):
            assert a.output == b.output


@pytest.mark.long  # two more exports and two processes: beyond this file's minute
def test_randomized_async_at_tp2_over_gloo(exported, hf_model):
    """The randomized plan at TP=2 (two processes, gloo, the torch backend) with async scheduling:
    each step's carried ids reach rank 1 by broadcast from rank 0's tokens, also in the steps that
    complete at once (seeded, logprobs and grammar rows beside them). Against the roomy TP=1 reference
    of the same backend: the backends' float32 sums differ in order, and this plan holds a near tie
    (two logits 5e-4 apart) that the ort and torch backends break differently."""
    man = exported("tiny", 1)
    rng = random.Random(5)
    torch.manual_seed(5)
    reqs, ref, constraint = _reference(man, rng, n=16, backend="torch")
    e = LLMEngine.start(exported("tiny", 2).root, EngineConfig(backend="torch", **CHAOS, async_scheduling=True))
    try:
        seqs, reported, seen = _run(e, reqs, constraint)
    finally:
        e.close()
    _check(reqs, ref, seqs, reported, man.config.eos_token_ids)
    assert seen["steps taking ids from the device"] > 0 and seen["of those, completing at once"] > 0, dict(seen)
