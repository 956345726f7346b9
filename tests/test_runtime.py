"""The runtime on the exported subgraphs (ort backend, FP32 twins) against transformers' greedy
generate, and its paging, batching, caching, preemption and error handling.

The reference is transformers in float32 holding the weights the export holds (BF16-rounded, router
gate float32): the same function the twins compute, so greedy tokens must be identical.
"""
import json
import random
import shutil

import pytest
import torch

from runtime.block_manager import BlockManager
from runtime.config import EngineConfig
from runtime.llm_engine import LLMEngine, RequestError
from runtime.sampling import SamplingParams
from runtime.sequence import Sequence
from runtime.output_text import Delta, OutputText
from runtime.text import Conversation, Detokenizer, TextCodec
from tests.cli import run_chat
from tests.reference import bf16_weight_reference, greedy

N_NEW = 24
GREEDY = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [[1, 5, 9], torch.randint(0, vocab, (21,), generator=g).tolist(), [7],
            torch.randint(0, vocab, (9,), generator=g).tolist()]


@pytest.fixture(scope="module")
def reference(hf_model):
    @__import__("functools").cache
    def get(name: str, ids: tuple) -> list[int]:
        return greedy(bf16_weight_reference(hf_model(name)), list(ids), N_NEW)
    return get


def engine(man, **kw) -> LLMEngine:
    return LLMEngine(man.root, EngineConfig(**kw))


@pytest.mark.parametrize("name", ["tiny", "alt"])
def test_batched_greedy_equals_transformers(name, exported, reference):
    man = exported(name, 1)
    ps = prompts(man.config.vocab_size)
    # a 20-token budget: steps of 20 (block form), then 15 (dense: a prompt's last chunk with new
    # prompts and a decode), then decodes of 4 (gather), by conftest's schedule
    e = engine(man, block_size=4, max_num_batched_tokens=20)
    seqs = e.generate(ps, GREEDY)
    for p, s in zip(ps, seqs):
        assert s.output == reference(name, tuple(p))
    assert set(e.stats.forms) == {"gather", "dense", "block"}


def test_alone_batched_staggered_cached_and_preempted_agree(exported, reference):
    man = exported("tiny", 1)
    ps = prompts(man.config.vocab_size)
    want = [reference("tiny", tuple(p)) for p in ps]
    # alone
    for p, w in zip(ps, want):
        assert engine(man, block_size=4).generate([p], GREEDY)[0].output == w
    # staggered arrivals: prefills join batches of running decodes
    e = engine(man, block_size=4)
    seqs = []
    for p in ps:
        seqs.append(e.add_request(p, GREEDY))
        for _ in range(3):
            e.step()
    while e.has_unfinished():
        e.step()
    assert [s.output for s in seqs] == want
    # prefix-cache hits: the same prompts again, plus one that extends a cached prompt
    again = e.generate(ps, GREEDY)
    assert [s.output for s in again] == want
    assert sum(s.num_cached_prompt for s in again) >= sum((len(p) - 1) // 4 * 4 for p in ps)
    # forced preemption: a cache too small for all four sequences at once
    small = engine(man, block_size=4, num_blocks=14)
    seqs = small.generate(ps, GREEDY)
    assert small.scheduler.num_preemptions > 0
    assert [s.output for s in seqs] == want
    small.blocks.check([])


def test_chunked_prefill_gives_transformers_tokens(exported, reference):
    """Steps of 7 tokens: the 21-token prompt runs in three chunks and the 9-token one in two, beside
    the others' decodes (decodes first in every step); a 40-token prompt, longer than five steps, is
    accepted. Tokens equal transformers' exactly (float32 twins)."""
    man = exported("tiny", 1)
    ps = prompts(man.config.vocab_size)
    g = torch.Generator().manual_seed(5)
    long = torch.randint(0, man.config.vocab_size, (40,), generator=g).tolist()
    e = engine(man, block_size=4, max_num_batched_tokens=7)
    seqs = []
    for p in ps + [long]:  # staggered: chunks share steps with running decodes
        seqs.append(e.add_request(p, GREEDY))
        e.step()
    while e.has_unfinished():
        e.step()
    assert [s.output for s in seqs] == [reference("tiny", tuple(p)) for p in ps + [long]]
    assert all(s.num_prefilled >= len(s.prompt) for s in seqs)
    e.blocks.check([])


def test_scheduler_runs_decodes_first_then_chunks_within_the_budget():
    from runtime.scheduler import Scheduler

    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    seqs = [Sequence(list(range(n)), GREEDY) for n in (3, 20, 5)]
    for s in seqs:
        sched.add(s)
    mixed = 0
    for _ in range(40):
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        assert sum(batch.num_new) <= 8 and all(n >= 1 for n in batch.num_new)
        kinds = ["decode" if len(s) - s.num_computed == 1 else "prefill" for s in batch.seqs]
        assert kinds == sorted(kinds)  # every decode before every prompt chunk
        mixed += "decode" in kinds and "prefill" in kinds
        for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new)):
            done = batch.completes(i)
            s.num_computed += n
            if done:
                s.output.append(0)
                if len(s.output) == 4:
                    sched.finish(s, "length")
    assert not sched.has_unfinished() and mixed > 0 and all(len(s.output) == 4 for s in seqs)
    bm.check([])


def test_chunked_prompt_hits_the_prefix_cache_and_survives_preemption(exported, reference):
    man = exported("tiny", 1)
    g = torch.Generator().manual_seed(6)
    long = torch.randint(0, man.config.vocab_size, (33,), generator=g).tolist()
    want = reference("tiny", tuple(long))
    e = engine(man, block_size=4, max_num_batched_tokens=6)
    first = e.generate([long], GREEDY)[0]
    assert first.output == want
    # the same prompt again: its full blocks (32 tokens) come from the cache; one chunk computes the rest
    again = e.add_request(long, GREEDY)
    e.step()
    assert again.num_cached_prompt == 32 and again.num_computed == 33 and len(again.output) == 1
    while e.has_unfinished():
        e.step()
    assert again.output == want
    # preemption between chunks: with 18 blocks of 4, the 30- and 33-token prompts are admitted
    # together, and the first one's decodes take the blocks of the second while that one is still
    # prefilling; it resumes from the blocks it had cached
    other = torch.randint(0, man.config.vocab_size, (30,), generator=g).tolist()
    small = engine(man, block_size=4, num_blocks=18, max_num_batched_tokens=6)
    a, b = small.add_request(other, GREEDY), small.add_request(long, GREEDY)
    preempted_mid_prompt = False
    while small.has_unfinished():
        before = small.scheduler.num_preemptions
        small.step()
        if small.scheduler.num_preemptions > before and b.status.value == "waiting" and not b.output:
            preempted_mid_prompt = True
    assert preempted_mid_prompt
    assert a.output == reference("tiny", tuple(other)) and b.output == want
    small.blocks.check([])


def test_second_turn_prefills_only_new_tokens(exported):
    man = exported("tiny", 1)
    bs = 4
    e = engine(man, block_size=bs)
    conv = Conversation(e.codec, "Be brief.")
    params = SamplingParams(temperature=0, max_tokens=12)
    p1 = conv.prompt("hello model")
    s1 = e.generate([p1], params)[0]
    conv.commit("hello model", p1, s1.output)
    p2 = conv.prompt("what is 2 + 3?")
    assert p2[: len(conv.ids)] == conv.ids  # the next prompt extends the conversation's tokens
    s2 = e.generate([p2], params)[0]
    computed_before = len(p1) + len(s1.output) - 1  # the last sampled token was never computed
    expected_cached = min(computed_before // bs * bs, (len(p2) - 1) // bs * bs)
    assert s2.num_cached_prompt == expected_cached
    assert s2.num_prefilled == len(p2) - expected_cached
    assert s2.num_prefilled < len(p2) - len(conv.ids) + bs  # only the new turn, up to a block's tail
    fresh = engine(man, block_size=bs).generate([p2], params)[0]
    assert fresh.output == s2.output and fresh.num_cached_prompt == 0


def test_step_inputs_follow_each_sequence_block_table():
    """build_step's ids, positions and slots against their definitions, per token: slot = the block
    holding position p times the block size plus p's offset in it; chunks that start and end inside
    blocks, across several sequences, and one-token decodes."""
    from runtime.block_tables import TableRows
    from runtime.scheduler import ScheduledBatch
    from runtime.step_inputs import build_step

    rng = random.Random(3)
    bs = 4
    seqs, num_new = [], []
    for n_tokens, start, n, decoding in [(30, 5, 19, False), (9, 0, 9, False), (17, 16, 1, True), (40, 13, 2, False)]:
        s = Sequence([rng.randrange(1000) for _ in range(n_tokens)], GREEDY)
        if decoding:  # its last token is one it sampled
            s.output.append(rng.randrange(1000))
        s.block_table = rng.sample(range(100), -(-len(s) // bs))
        s.num_computed = start
        seqs.append(s)
        num_new.append(n)
    inputs = build_step(ScheduledBatch(seqs, num_new), bs, TableRows())
    assert (inputs.prefill_tokens, inputs.decode_tokens) == (19 + 9 + 2, 1)
    want_ids, want_pos, want_slots, want_last = [], [], [], []
    for s, n in zip(seqs, num_new):
        for p in range(s.num_computed, s.num_computed + n):
            want_ids.append(s.tokens[p])
            want_pos.append(p)
            want_slots.append(s.block_table[p // bs] * bs + p % bs)
        want_last.append(len(want_ids) - 1)
    assert inputs.ids.tolist() == want_ids and inputs.positions.tolist() == want_pos
    assert inputs.meta.slot_mapping.tolist() == want_slots and inputs.logits_rows.tolist() == want_last
    assert inputs.ids.dtype == inputs.meta.slot_mapping.dtype == torch.int64


def test_block_manager_invariants_randomized():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    live: list[Sequence] = []
    vocab = [rng.randrange(50) for _ in range(40)]  # shared prefixes make cache hits frequent
    for it in range(3000):
        op = rng.random()
        if op < 0.35:
            n = rng.randint(1, 30)
            s = Sequence(vocab[: rng.randint(0, 20)] + [rng.randrange(50) for _ in range(n)], GREEDY)
            if bm.can_allocate(s):
                bm.allocate(s)
                assert s.num_computed < len(s) and s.num_computed % 4 == 0
                live.append(s)
        elif op < 0.75 and live:
            s = rng.choice(live)  # compute what is pending, then decode one token
            s.num_computed = len(s)
            bm.cache_full_blocks(s)
            s.output.append(rng.randrange(50))
            if bm.can_append(s):
                bm.append(s)
                assert len(s.block_table) == bm.blocks_needed(len(s))
            else:  # preempt
                bm.free_seq(s)
                live.remove(s)
        elif live:
            s = live.pop(rng.randrange(len(live)))  # finish
            bm.free_seq(s)
        bm.check(live)
        assert bm.num_free + len({b for s in live for b in s.block_table}) == 64
    for s in live:
        bm.free_seq(s)
    bm.check([])
    assert bm.num_free == 64
    with pytest.raises(AssertionError, match="freed twice"):
        s = Sequence([1, 2, 3], GREEDY)
        bm.allocate(s)
        table = list(s.block_table)
        bm.free_seq(s)
        s.block_table = table
        bm.free_seq(s)


BAD_REQUESTS = [  # (prompt, params, fragment of the error)
    ([], GREEDY, "the prompt is empty"),
    ([1, 99999], GREEDY, r"token ids \[99999\] are outside the vocabulary"),
    ([-1, 2], GREEDY, r"token ids \[-1\] are outside the vocabulary"),
    ([1, True], GREEDY, r"token ids \[True\] are outside the vocabulary"),  # a bool is an int in Python
    ([1, 2.0], GREEDY, r"token ids \[2.0\] are outside the vocabulary"),
    (list(range(1, 300)), GREEDY, "longer than the context allows"),
    ([1, 2], SamplingParams(temperature=-1), "temperature must be >= 0"),
    ([1, 2], SamplingParams(top_p=0), r"top_p must be in \(0, 1\]"),
    ([1, 2], SamplingParams(top_k=-3), "top_k must be >= 0"),
    ([1, 2], SamplingParams(max_tokens=0), "max_tokens must be >= 1"),
    ([1, 2], SamplingParams(stop_token_ids=[5000]), "stop token ids"),
]


def test_bad_requests_fail_alone(exported, reference):
    """Each bad request, arriving while two good ones decode, is refused with its reason; the good ones
    end with the reference's tokens and every block comes back. (One engine run for all of them: each
    refusal changes nothing, which the good sequences' tokens and the block check show.)"""
    man = exported("tiny", 1)
    e = engine(man, block_size=4, max_model_len=256)
    good = [e.add_request(p, GREEDY) for p in prompts(man.config.vocab_size)[:2]]
    e.step()
    e.step()
    for prompt, params, message in BAD_REQUESTS:
        with pytest.raises(RequestError, match=message):
            e.add_request(prompt, params)
        e.step()  # the refused request took no part in the steps that follow
    while e.has_unfinished():
        e.step()
    for s, p in zip(good, prompts(man.config.vocab_size)):
        assert s.output == reference("tiny", tuple(p))
    e.blocks.check([])


def test_sampling_is_seeded_and_filters(exported):
    man = exported("tiny", 1)
    e = engine(man, block_size=4)
    p = [1, 5, 9]
    a = e.generate([p, p], SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True))
    b = e.generate([p], SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True))
    assert a[0].output == a[1].output == b[0].output  # a seed reproduces, whatever the batch
    c = e.generate([p], SamplingParams(temperature=1.0, seed=8, max_tokens=16, ignore_eos=True))
    assert c[0].output != a[0].output
    g = e.generate([p], GREEDY)[0].output
    assert e.generate([p], SamplingParams(temperature=2.0, top_k=1, seed=1, max_tokens=N_NEW, ignore_eos=True)
                      )[0].output == g
    assert e.generate([p], SamplingParams(temperature=2.0, top_p=1e-6, seed=1, max_tokens=N_NEW, ignore_eos=True)
                      )[0].output == g


def _published_eos(man) -> int:
    """The end-of-turn id as generation_config.json gives it (config.json has none, as published)."""
    return json.loads((man.root / "generation_config.json").read_text())["eos_token_id"]


def test_stops_at_end_of_turn(exported, reference):
    man = exported("tiny", 1)
    e = engine(man)
    eos = _published_eos(man)
    assert man.config.eos_token_ids == (eos,)
    for p in prompts(man.config.vocab_size):
        want = reference("tiny", tuple(p))
        s = e.generate([p], SamplingParams(temperature=0, max_tokens=N_NEW))[0]
        assert s.output == (want[: want.index(eos) + 1] if eos in want else want)
        assert s.finish_reason == ("stop" if eos in want else "length")


def test_streaming_text(exported):
    man = exported("tiny", 1)
    codec = TextCodec(man.root)
    ids = codec.encode("hello model, the tensor engine: 7 + 3 = 10! ünïcödé ✓")
    d = Detokenizer(codec)
    assert "".join(d.feed(t) for t in ids) == codec.decode(ids)
    think = codec.encode("let me think") + [codec.think_end] + codec.encode("\n\nthe answer")

    def run(out, tokens):
        got = Delta()
        for t in tokens:
            got += out.feed(t)
        got += out.finish()
        return got

    # After the published generation prompt the output starts inside the thinking block.
    prompt = codec.encode_chat([{"role": "user", "content": "hi"}])
    assert codec.in_thinking(prompt)
    assert run(OutputText(codec, codec.in_thinking(prompt)), think) == Delta("let me think", "\n\nthe answer")
    # Thinking closed in the prompt (--no-thinking): everything is the answer.
    closed = codec.encode_chat([{"role": "user", "content": "hi"}], thinking=False)
    assert closed[:len(prompt)] == prompt and codec.decode(closed[len(prompt):]) == "\n\n"
    assert closed[len(prompt)] == codec.think_end and not codec.in_thinking(closed)
    assert run(OutputText(codec, False), codec.encode("the answer")) == Delta("", "the answer")
    # A stop string ends the text; it and anything after it are never shown.
    stopped = OutputText(codec, True, stops=["answ"])
    assert run(stopped, think) == Delta("let me think", "\n\nthe ") and stopped.stopped
    held = OutputText(codec, False, stops=["the answer!"])
    assert run(held, codec.encode("so the answer")) == Delta("", "so the answer") and not held.stopped


def test_sampling_defaults_from_generation_config(exported, tmp_path):
    """A request that leaves sampling unset gets generation_config.json's values; do_sample false
    there means greedy; an explicit temperature 0 stays greedy."""
    man = exported("tiny", 1)
    gen = json.loads((man.root / "generation_config.json").read_text())
    e = engine(man)
    s = e.add_request([1, 2, 3])
    assert (s.params.temperature, s.params.top_p, s.params.top_k) == (gen["temperature"], gen["top_p"], gen["top_k"])
    assert e.sampling_params(temperature=0).temperature == 0 and e.sampling_params(top_k=5).top_p == gen["top_p"]
    d = tmp_path / "export"
    shutil.copytree(man.root, d)
    (d / "generation_config.json").write_text(json.dumps(gen | {"do_sample": False}))
    greedy_default = LLMEngine(d, EngineConfig()).sampling_params()
    assert greedy_default.temperature == 0 and LLMEngine(d, EngineConfig()).sampling_params(temperature=0.7).temperature == 0.7


def test_chat_scripted_contract(exported, reference):
    man = exported("tiny", 1)
    ps = prompts(man.config.vocab_size)[:3]
    args = [x for p in ps for x in ("--prompt-ids", ",".join(map(str, p)))]
    r = run_chat("--model", man.root, *args, "--max-tokens", N_NEW, "--temperature", 0, "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"outputs": [reference("tiny", tuple(p)) for p in ps]}
    text = run_chat("--model", man.root, "--prompt", "hello", "--max-tokens", 8, "--temperature", 0, "--json")
    codec = TextCodec(man.root)
    want = reference("tiny", tuple(codec.encode_chat([{"role": "user", "content": "hello"}])))[:8]
    got = json.loads(text.stdout.strip().splitlines()[-1])["outputs"][0]
    eos = _published_eos(man)
    assert got == (want[: want.index(eos) + 1] if eos in want else want)


def test_chat_reports_bad_input(exported, tmp_path):
    man = exported("tiny", 1)
    r = run_chat("--model", man.root, "--prompt-ids", "1,99999", "--json")
    assert r.returncode == 1 and "outside the vocabulary" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["outputs"] == [None]
    r = run_chat("--model", tmp_path)
    assert r.returncode == 2 and "no export manifest here" in r.stderr


def test_ids_without_a_tokenizer(exported, reference, tmp_path):
    """An export of a checkpoint with no tokenizer: ids in, ids out; text says what it needs."""
    man = exported("tiny", 1)
    d = tmp_path / "export"
    shutil.copytree(man.root, d)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / name).unlink()
    p = prompts(man.config.vocab_size)[0]
    r = run_chat("--model", d, "--prompt-ids", ",".join(map(str, p)), "--max-tokens", N_NEW, "--temperature", 0,
                 "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["outputs"] == [reference("tiny", tuple(p))]
    r = run_chat("--model", d, "--prompt", "hello", "--json")
    assert r.returncode == 2 and "no tokenizer.json" in r.stderr and "--prompt-ids" in r.stderr


def test_a_chat_template_that_does_not_parse_names_its_file(exported, tmp_path):
    """The template comes from tokenizer_config.json or chat_template.jinja: the error says which."""
    man = exported("tiny", 1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(man.root / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ValueError, match=r"chat_template\.jinja does not parse: .*line 1"):
        TextCodec.load(tmp_path)
    config["chat_template"] = "{% if %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json does not parse"):
        TextCodec.load(tmp_path)


@pytest.mark.parametrize("backend", ["ort", pytest.param("torch", marks=pytest.mark.long)])
def test_bucketed_decode_path(backend, exported, reference):
    """The GPU's decode path (steps padded to bucket sizes, attention on fixed-shape tensors, what a
    CUDA graph captures), run eagerly on the CPU: same tokens as the reference."""
    man = exported("tiny", 1)
    ps = prompts(man.config.vocab_size)[:3]
    e = engine(man, block_size=4, backend=backend, decode_buckets=True, max_num_seqs=6)
    assert e.executor.decode_graphs is not None and e.executor.decode_graphs.buckets == [1, 2, 4, 6]
    seqs = e.generate(ps, GREEDY)
    if backend == "ort":
        assert [s.output for s in seqs] == [reference("tiny", tuple(p)) for p in ps]
    else:  # float32 pieces with the exact weights
        assert [s.output for s in seqs] == [engine(man, block_size=4, backend="torch").generate([p], GREEDY)[0].output
                                            for p in ps]
    e.blocks.check([])


def test_padded_prefill_chunks_give_transformers_tokens(exported, reference):
    """The GPU's path for one sequence's prefill chunks (runtime/prefill_graphs.py: each chunk padded
    to its bucket, the padding rows writing into the padding block and attending past the sequence,
    attention and head on the fixed buffers a CUDA graph captures), run eagerly on the CPU: the
    tokens equal transformers' exactly (float32 twins). 37 tokens in steps of 24 are a full chunk and
    13 padded to 16; 50 are two full chunks and 2 padded to 16."""
    from runtime.prefill_graphs import PrefillGraphs

    man = exported("tiny", 1)
    e = engine(man, block_size=4, decode_buckets=True, max_num_batched_tokens=24)
    ex = e.executor
    ex.prefill_graphs = PrefillGraphs(ex, 24, 64, BlockManager.padding_block_of(e.kv.num_blocks), use_graphs=False)
    assert ex.prefill_graphs.buckets == [16, 24]
    g = torch.Generator().manual_seed(9)
    ps = [torch.randint(0, man.config.vocab_size, (n,), generator=g).tolist() for n in (37, 50)]
    outs = [e.generate([p], GREEDY)[0].output for p in ps]  # one at a time: single-sequence chunks
    assert ex.prefill_graphs.steps == 5
    assert outs == [reference("tiny", tuple(p)) for p in ps]
    e.blocks.check([])


@pytest.mark.parametrize("buckets", [False, True], ids=["packed", "decode-buckets"])
def test_async_scheduling_gives_the_same_tokens(exported, reference, buckets):
    """Async scheduling (each greedy step launched before the previous step's tokens reach the host;
    the next step takes them from the device) on the CPU, where it runs the same logic: staggered
    arrivals, chunked prompts, preemption in a small cache, a stop token, a request sampled on the
    device whose top_p leaves one token, a request sampled with a seed (its steps run one at a time)
    and an abort while a step is in flight. Greedy tokens equal
    transformers', cut where the stop token or max_tokens ends them; the seeded request equals the
    same request in an engine without async scheduling; every block comes back. With decode buckets
    (a GPU's fixed-size decode steps, here without graphs) the carried ids go into the padded step's
    buffers."""
    man = exported("tiny", 1)
    ps = prompts(man.config.vocab_size)
    want = [reference("tiny", tuple(p)) for p in ps]
    stop_at = want[1][9]  # a token of the second reference's output: that request stops at its first one
    params = [SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, stop_token_ids=[stop_at]),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
              # sampled on the device, unseeded, yet one token is left: the greedy ones
              SamplingParams(temperature=2.0, top_p=1e-6, max_tokens=N_NEW, ignore_eos=True)]
    cut = [w[:w.index(stop_at) + 1] if i == 1 else w[:p.max_tokens] for i, (w, p) in enumerate(zip(want, params))]
    seeded = SamplingParams(temperature=0.8, top_k=20, max_tokens=10, seed=7, ignore_eos=True)
    sync = engine(man, block_size=4, async_scheduling=False).generate([ps[0]], seeded)[0].output
    e = engine(man, block_size=4, num_blocks=16, max_num_batched_tokens=7, async_scheduling=True,
               decode_buckets=buckets)
    seqs, sampled, aborted, emitted = [], None, None, {}
    for p, sp in zip(ps, params):  # staggered: prompt chunks join running decodes
        seqs.append(e.add_request(p, sp))
        for out in e.step():
            emitted.setdefault(out.seq.id, []).append(out.token)
    sampled = e.add_request(ps[0], seeded)
    aborted = e.add_request(ps[3], GREEDY)
    while e.has_unfinished():
        for out in e.step():
            emitted.setdefault(out.seq.id, []).append(out.token)
        if aborted.status.value == "running" and aborted.pending and len(aborted.output) >= 3:
            e.abort(aborted)  # its step in flight is dropped when it completes
    assert [s.output for s in seqs] == cut
    assert [s.finish_reason for s in seqs] == ["length", "stop", "length", "length"]
    assert sampled.output == sync
    assert aborted.finish_reason == "abort" and aborted.output == want[3][:len(aborted.output)]
    assert all(emitted[s.id] == s.output for s in seqs + [sampled])  # each token reported once, in order
    assert e.scheduler.num_preemptions > 0 and e.stats.overlapped_steps > 0
    assert (e.executor.decode_graphs is not None) == buckets
    e.step()  # a step in flight for finished sequences only is completed and dropped
    assert e._inflight is None and e.blocks.num_free == e.blocks.num_usable
    e.blocks.check([])


def test_device_sampling_draws_the_filtered_distribution():
    """runtime.sampling.sample_on_device (async scheduling's sampler) against the definition written
    out here: softmax(logits / T), cut to the top_k largest, then to the smallest prefix of those
    (most likely first) whose mass reaches top_p, renormalised. 40,000 draws a setting; each token's
    frequency within 5 standard errors (sqrt(p (1 - p) / n)) of its probability, and no draw outside
    the kept set. Greedy rows take the first maximum; a NaN row is reported, not drawn."""
    from runtime.sampling import sample_on_device

    torch.manual_seed(0)
    V, n = 50, 40_000
    x = torch.randn(V) * 2
    settings = [SamplingParams(temperature=0.7, top_k=10, top_p=0.8), SamplingParams(temperature=1.3),
                SamplingParams(temperature=1.0, top_p=0.5)]

    def expected(p: SamplingParams) -> torch.Tensor:
        probs = torch.softmax(x.double() / p.temperature, -1)
        order = probs.argsort(descending=True).tolist()
        keep = order[:p.top_k] if p.top_k else order
        mass = probs[keep] / probs[keep].sum()
        kept, total = [], 0.0
        for tok, m in zip(keep, mass.tolist()):
            kept.append(tok)
            total += m
            if total >= p.top_p:
                break
        out = torch.zeros(V, dtype=torch.float64)
        out[kept] = probs[kept] / probs[kept].sum()
        return out

    params = [p for p in settings for _ in range(n)] + [GREEDY, SamplingParams(temperature=1.0)]
    logits = x.repeat(len(params), 1)
    logits[-1, 3] = float("nan")
    tokens, status = sample_on_device(logits, params)
    assert (status[:-1] == 0).all() and status[-1] == 1  # 1: NaN
    assert tokens[-2] == int(x.argmax())
    for j, p in enumerate(settings):
        want = expected(p)
        got = torch.bincount(tokens[j * n:(j + 1) * n], minlength=V).double() / n
        assert (got[want == 0] == 0).all(), p
        se = (want * (1 - want) / n).sqrt()
        assert ((got - want).abs() <= 5 * se + 1e-12).all(), (p, (got - want).abs().max())
