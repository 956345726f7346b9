"""Constrained decoding and logprobs (runtime/constrained.py, runtime/vocab_parallel.py): outputs held
to schemas taken from real tool definitions validate with `jsonschema` (an independent validator),
whatever picks the tokens -- a seeded random walk over the allowed tokens, and the random embedded
model at TP=1 and TP=2; the masked tokens and the logprobs are the same at both; logprobs equal a
float32 log-softmax of transformers' logits."""
import json
import random

import jsonschema
import pytest
import torch

from runtime.config import EngineConfig
from runtime.constrained import SchemaError, Spec, bitmask, validate_schema
from runtime.llm_engine import LLMEngine
from runtime.sampling import SamplingParams
from runtime.serving.tool_calls import ToolCallParser, merge_calls
from runtime.text import TextCodec
from runtime.vocab_parallel import VocabGather
from runtime.executor import SingleRank

# Shapes of real tool definitions (an issue tracker's search, a calendar event, a shell command).
SEARCH = {"type": "object", "properties": {
    "query": {"type": "string", "maxLength": 24},
    "filters": {"type": "object", "properties": {
        "status": {"type": "string", "enum": ["open", "closed", "merged"]},
        "labels": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "author": {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}]}},
        "required": ["status"], "additionalProperties": False},
    "limit": {"type": "integer", "minimum": 1, "maximum": 100},
    "sort": {"type": "array", "items": {"type": "object", "properties": {
        "field": {"type": "string", "enum": ["created", "updated"]}, "desc": {"type": "boolean"}},
        "required": ["field", "desc"], "additionalProperties": False}, "maxItems": 2}},
    "required": ["query", "filters", "limit"], "additionalProperties": False}
EVENT = {"type": "object", "$defs": {"person": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10}, "optional": {"type": "boolean"}}, "required": ["name"]}},
    "properties": {"title": {"type": "string", "maxLength": 16}, "attendees": {"type": "array", "items": {
        "$ref": "#/$defs/person"}, "minItems": 1, "maxItems": 2},
        "duration": {"type": "number", "minimum": 0, "maximum": 8}, "room": {"enum": ["A", "B", None]}},
    "required": ["title", "attendees", "duration"]}
SHELL = {"type": "object", "properties": {"command": {"type": "string", "maxLength": 30},
                                          "timeout": {"type": "integer", "minimum": 1, "maximum": 600}},
         "required": ["command"]}
SCHEMAS = [SEARCH, EVENT, SHELL]
TOOLS = [{"type": "function", "function": {"name": n, "parameters": s}}
         for n, s in (("search_issues", SEARCH), ("create_event", EVENT), ("run_shell", SHELL))]
# Bounded (enums, ranges): the random model must finish it within a few dozen tokens.
SMALL = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "minimum": 1,
         "maximum": 9}, "ok": {"type": "boolean"}}, "required": ["unit", "days", "ok"], "additionalProperties": False}


def allowed(mask_row: torch.Tensor, vocab: int) -> list[int]:
    """The ids whose bit is set, read bit by bit (the reference for the vectorised unpacking)."""
    words = mask_row.tolist()
    return [i for i in range(vocab) if (words[i // 32] >> (i % 32)) & 1]


def walk(codec, grammars, spec, vocab, seed, limit=400) -> list[int]:
    """A seeded random walk over the grammar's allowed tokens, preferring tokens that hold
    punctuation (so strings and containers close), until only the end-of-turn token is allowed."""
    rng, c, out = random.Random(seed), grammars.constraint(spec, False), []
    m = bitmask(1, vocab)
    for _ in range(limit):
        m.fill_(-1)
        c.fill(m, 0)
        ids = allowed(m[0], vocab)
        ends = [i for i in ids if i in grammars.eos_ids]
        if ends and len(ids) == len(ends):
            return out
        ids = [i for i in ids if i not in ends]
        marks = [i for i in ids if any(not chr(b).isalnum() for b in codec.token_bytes(i))]
        tok = rng.choice(marks if marks and rng.random() < 0.7 else ids)
        assert c.accept(tok)
        out.append(tok)
    raise AssertionError(f"no end within {limit} tokens: {codec.decode(out)!r}")


@pytest.fixture(scope="module")
def codec(tiny_ckpt):
    return TextCodec(tiny_ckpt)


@pytest.fixture(scope="module")
def grammars(codec, tiny_ckpt):
    vocab = json.loads((tiny_ckpt / "config.json").read_text())["vocab_size"]
    from runtime.constrained import Grammars
    return Grammars(codec, vocab, [codec.eos_id])


@pytest.mark.parametrize("schema", SCHEMAS, ids=["search", "event", "shell"])
def test_json_schema_walks_validate(codec, grammars, schema):
    for seed in range(3):
        toks = walk(codec, grammars, Spec("json", schema=schema), grammars.vocab_size, seed)
        jsonschema.validate(json.loads(codec.decode(toks)), schema)


def test_tool_call_walks_parse_to_valid_calls(codec, grammars):
    """required (any tool, one call) and named: the block parses (tool_calls.py) into calls whose
    arguments validate against their tool's schema."""
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for spec, names in ((Spec("tools", tools=tuple(TOOLS), one_call=True), set(by_name)),
                        (Spec("tools", tools=(TOOLS[2],), one_call=True), {"run_shell"})):
        for seed in range(3):
            toks = walk(codec, grammars, spec, grammars.vocab_size, seed)
            text, parser = "", ToolCallParser(TOOLS)
            for t in toks:  # the text as OutputText shows it: tag tokens as their text
                text += codec.literal.get(t) or codec.decode([t])
            parsed = parser.feed(text)
            parsed += parser.finish()
            calls = merge_calls(parsed.calls)
            assert len(calls) == 1 and calls[0]["function"]["name"] in names, text
            assert parsed.content.strip() == ""
            jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), by_name[calls[0]["function"]["name"]])


def test_tool_call_grammar_holds_the_documented_layout(codec, grammars):
    """The block as the model's documented format writes it is accepted to its end; whitespace the
    library would let around a value (where tool_calls.py would keep it: an enum's " c" is not "c"),
    or between the elements, is refused. (A free string's own leading space is its text: allowed.)"""
    from runtime.text import TOOL_CALL_END, TOOL_CALL_START

    ids = {t: i for i, t in codec.literal.items()}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "unit": {"enum": ["c", "f"]}, "days": {"type": "integer"}, "where": {"type": "object"}},
        "required": ["unit", "days", "where"]}}}
    spec = Spec("tools", tools=(tool,), one_call=True)
    parts = ['<invoke name="f">\n<parameter name="unit">', "c", '</parameter>\n<parameter name="days">', "7",
             '</parameter>\n<parameter name="where">', "{}", "</parameter>\n", "</invoke>\n"]

    def run(text: str) -> bool:
        c = grammars.constraint(spec, False)
        return c.accept(ids[TOOL_CALL_START]) and c.matcher.accept_string("\n" + text) and \
            c.accept(ids[TOOL_CALL_END]) and c.accept(grammars.eos_ids[0]) and c.matcher.is_terminated()

    assert run("".join(parts))
    for value in (1, 3, 5):  # a space before or after each value
        for pad in (" " + parts[value], parts[value] + " "):
            assert not run("".join(parts[:value] + [pad] + parts[value + 1:])), pad
    whole = "".join(parts)
    for at in ('<parameter name="days">', "</invoke>"):  # a blank line between elements
        assert not run(whole.replace(at, "\n" + at)), at


@pytest.mark.parametrize("schema,word", [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "string", "format": "hostname-ish"}, "format"),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "if"),
    ({"type": "objekt"}, "not a valid JSON schema"),
    ({"type": "object", "properties": []}, "not a valid JSON schema")])
def test_unsupported_schemas_are_refused_by_name(schema, word):
    with pytest.raises(SchemaError, match=word):
        validate_schema(schema)


def test_mask_unpacking_equals_the_bits():
    """VocabGather.apply_mask on a rank's slice sets exactly the unset bits to -inf (the bits read one
    by one in Python), whatever the slice's start (not a multiple of 32 here)."""
    torch.manual_seed(0)
    vocab, rows = 100, 37
    mask = torch.randint(-2 ** 31, 2 ** 31 - 1, (2, (vocab + 31) // 32), dtype=torch.int32)

    class Rank(SingleRank):
        def __init__(self, r):
            self.rank, self.world = r, 3

    for r in range(3):
        g = VocabGather(Rank(r), vocab, rows)
        local = torch.randn(3, rows)
        out = g.apply_mask(local, [0, 2], mask)
        for j, row in enumerate([0, 2]):
            ok = set(allowed(mask[j], vocab))
            for c in range(g.valid):
                want = local[row, c] if g.start + c in ok else float("-inf")
                assert out[row, c] == want
        assert torch.equal(out[1], local[1])  # an unconstrained row is untouched


@pytest.mark.long
def test_engine_outputs_validate_and_agree_at_tp1_tp2_with_logprobs(exported, hf_model):
    """The random embedded model under a grammar: every output validates; TP=2 (each rank masks its
    vocabulary slice) gives the tokens of TP=1, greedy and seeded; logprobs equal a float32 log-softmax
    of transformers' logits within 1e-4 (float32 sums in a different order: ~1e-6 apart measured)."""
    from tests.reference import bf16_weight_reference

    outs, lps = {}, {}
    for tp in (1, 2):
        e = LLMEngine.start(exported("tiny", tp).root, EngineConfig(backend="ort"))
        try:
            prompt = e.codec.encode_chat([{"role": "user", "content": "weather?"}], thinking=False)
            # no constrained row and no logprobs: no step sends extras (no mask, no logprob gather)
            e.generate([prompt, prompt[:3]], [SamplingParams(temperature=0, max_tokens=4),
                                              SamplingParams(temperature=1.0, seed=3, max_tokens=4)])
            assert e.stats.steps > 0 and e.stats.extras_steps == 0
            seqs, lps[tp] = [], {}
            for seed, temp in ((0, 0.0), (1, 1.0), (2, 1.0)):
                c = e.grammars.constraint(Spec("json", schema=SMALL), e.codec.in_thinking(prompt))
                seqs.append(e.add_request(prompt, SamplingParams(temperature=temp, seed=seed, max_tokens=60,
                                                                 logprobs=3), c))
            while e.has_unfinished():
                for o in e.step():  # keyed by (request, tokens so far) as the step leaves them
                    lps[tp][seqs.index(o.seq), len(o.seq.output)] = (o.logprob, o.top_logprobs)
            outs[tp] = [list(s.output) for s in seqs]
            assert e.stats.extras_steps > 0
            for s in seqs:
                assert s.finish_reason == "stop"
                jsonschema.validate(json.loads(e.codec.decode(s.output)), SMALL)
        finally:
            e.close()
    assert outs[1] == outs[2]
    for k, (lp, top) in lps[1].items():
        lp2, top2 = lps[2][k]
        assert abs(lp - lp2) < 1e-4 and [t for t, _ in top] == [t for t, _ in top2]
    # the reference: transformers (the export's BF16-rounded weights, float32) on prompt + output
    ref = bf16_weight_reference(hf_model("tiny"))
    for j, out in enumerate(outs[1][:2]):
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1].float()
        want = torch.log_softmax(logits, -1)
        for n, tok in enumerate(out, start=1):
            lp, top = lps[1][(j, n)]
            assert abs(lp - want[n - 1, tok].item()) < 1e-4
            ids = torch.topk(want[n - 1], 3).indices.tolist()
            assert [t for t, _ in top] == ids
            assert all(abs(v - want[n - 1, t].item()) < 1e-4 for t, v in top)
