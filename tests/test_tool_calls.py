"""The MiniMax-M2 tool-call parser (runtime/serving/tool_calls.py) on scripted outputs.

Every case is fed whole, in random chunks, one character at a time, and token by token through the
real detokenizer (OutputText on the toy tokenizer, the tool-call tags as their own tokens, as the
model writes them). Expected values come from the model's documented format and from what the
serving engines that serve MiniMax-M2 do (named in docs/DESIGN.md); every result is also checked for
the invariant: each call's arguments one complete, strict JSON object with unique keys, its fragments
joining to it, the call's id and name in its first delta only, indices dense, no markup in content."""
import json
import random
import re
import time

import pytest

from export.tiny import PRESETS, write_checkpoint
from runtime.output_text import OutputText
from runtime.serving.tool_calls import BEGIN, END, Parsed, ToolCallParser, merge_calls
from runtime.text import TextCodec

MARKUP = (BEGIN, END, "<invoke", "</invoke>", "<parameter", "</parameter>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "location": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "hours": {"type": "array"}, "ratio": {"type": "number"}, "opts": {"type": "object"},
    "note": {"type": ["string", "null"]}, "when": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    "level": {"enum": [1, 2, 3]}, "count": {"type": ["integer", "string"]}}}}},
         {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {
             "path": {"type": "string"}, "content": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "ping"}}]  # a tool without parameters

CALL_TEXT = ("Let me check.<minimax:tool_call>\n<invoke name=\"get_weather\">\n"
             "<parameter name=\"location\">San Francisco, CA</parameter>\n<parameter name=\"days\">3</parameter>\n"
             "<parameter name=\"metric\">true</parameter>\n<parameter name=\"hours\">[9, 12]</parameter>\n"
             "<parameter name=\"ratio\">0.5</parameter>\n</invoke>\n<invoke name=\"get_weather\">\n"
             "<parameter name=\"location\">Paris</parameter>\n</invoke>\n</minimax:tool_call>")
WANT_CALLS = [("get_weather", {"location": "San Francisco, CA", "days": 3, "metric": True, "hours": [9, 12],
                               "ratio": 0.5}), ("get_weather", {"location": "Paris"})]


def block(*invokes: str) -> str:
    return BEGIN + "\n" + "".join(invokes) + END


def invoke(name: str, **params: str) -> str:
    return f'<invoke name="{name}">\n' + "".join(f'<parameter name="{k}">{v}</parameter>\n'
                                                 for k, v in params.items()) + "</invoke>\n"


# ---- feeding and the invariant ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    return TextCodec(write_checkpoint(tmp_path_factory.mktemp("toolcalls") / "tiny", PRESETS["tiny"], seed=0))


def token_ids(codec: TextCodec, text: str) -> list[int]:
    """The text as the model would write it: the tool-call tags as their own tokens."""
    ids = []
    for part in re.split(r"(</?minimax:tool_call>)", text):
        if part in (BEGIN, END):
            ids.append(codec.tok.token_to_id(part))
        elif part:
            ids += codec.encode(part)
    return ids


def pieces(text: str, mode: str, codec: TextCodec | None = None, seed: int = 0) -> list[str]:
    if mode == "whole":
        return [text]
    if mode == "chars":
        return list(text)
    if mode == "chunks":
        rng, out, i = random.Random(seed), [], 0
        while i < len(text):
            n = rng.randint(1, 7)
            out, i = out + [text[i:i + n]], i + n
        return out
    out_text = OutputText(codec, thinking=False)  # "tokens": the real detokenizer's deltas
    deltas = [out_text.feed(t).content for t in token_ids(codec, text)] + [out_text.finish().content]
    assert "".join(deltas) == text  # the toy tokenizer round-trips these texts exactly
    return deltas


def _unique(pairs):
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"repeated key in {keys}"
    return dict(pairs)


def _no_constant(name):
    raise AssertionError(f"{name} is not JSON")


def check(parsed: Parsed, names: set | None = None) -> list[tuple[str, dict]]:
    """The invariant on one parse; returns [(name, arguments)]."""
    seen = set()
    for d in parsed.calls:  # the id and name come once, in a call's first delta
        assert (d.id is not None) == (d.name is not None) == (d.index not in seen), d
        seen.add(d.index)
    calls = merge_calls(parsed.calls)
    assert [d.index for d in parsed.calls if d.id] == list(range(len(calls)))  # dense, in order
    out = []
    for c in calls:
        args = json.loads(c["function"]["arguments"], object_pairs_hook=_unique, parse_constant=_no_constant)
        assert isinstance(args, dict) and c["id"].startswith("call_")
        assert names is None or c["function"]["name"] in names
        out.append((c["function"]["name"], args))
    assert len({c["id"] for c in calls}) == len(calls)
    for tag in MARKUP:
        assert tag not in parsed.content, (tag, parsed.content)
    return out


def parse(text: str, mode: str = "whole", codec=None, tools=TOOLS, seed: int = 0) -> tuple[str, list]:
    parser = ToolCallParser(tools)
    out = Parsed()
    for p in pieces(text, mode, codec, seed):
        out += parser.feed(p)
    out += parser.finish()
    names = None if tools is None else {t.get("function", t)["name"] for t in tools}
    return out.content, check(out, names)


MODES = ["whole", "chunks", "chars", "tokens"]


def parse_all(text: str, codec, tools=TOOLS) -> tuple[str, list]:
    """The parse, the same whichever way the text is fed."""
    results = [parse(text, m, codec, tools, seed) for m in MODES for seed in ([0, 1, 2] if m == "chunks" else [0])]
    assert all(r == results[0] for r in results), results
    return results[0]


# ---- expected values --------------------------------------------------------------------------------

def test_the_documented_format(codec):
    assert parse_all(CALL_TEXT, codec) == ("Let me check.", WANT_CALLS)


def test_arguments_stream_by_parameter():
    """Fed one character at a time: the id and name first, then each parameter once it is closed."""
    parser = ToolCallParser(TOOLS)
    seen = [c.arguments for ch in CALL_TEXT for c in parser.feed(ch).calls]
    assert seen[:4] == ["", '{"location": "San Francisco, CA"', ', "days": 3', ', "metric": true']
    assert "".join(seen[:7]) == json.dumps(WANT_CALLS[0][1])


@pytest.mark.parametrize("value", [
    "This text contains </parameter> in it",  # a closing tag with text after it is value text
    "<div>Hello</div>",
    '<parameter name="inner">x</parameter>',  # this very format, nested
    '<parameter>\n  <hello></hello>\n</parameter>',
    "a </invoke> b </minimax:tool_call-ish> c",
    "</parameter></parameter>x",
])
def test_values_holding_markup(codec, value):
    text = "Writing." + block(invoke("write_file", content=value, path="a.xml"))
    assert parse_all(text, codec) == ("Writing.", [("write_file", {"content": value, "path": "a.xml"})])


def test_repeated_parameter_keeps_the_first(codec):
    text = block('<invoke name="get_weather"><parameter name="days">3</parameter>'
                 '<parameter name="location">Rome</parameter><parameter name="days">4</parameter></invoke>')
    assert parse_all(text, codec) == ("", [("get_weather", {"days": 3, "location": "Rome"})])


@pytest.mark.parametrize("tag", [
    '<invoke name="get_weather" description="Get the weather > now">',
    "<invoke name='get_weather'>",
    '<invoke id="1" name="get_weather" >',
    '<invoke\nname="get_weather">',
])
def test_extra_attributes_and_quotes(codec, tag):
    text = block(tag + '\n<parameter name="days" type="integer">2</parameter>\n'
                 "<parameter type='string' name='location' required=\"true\">Oslo</parameter>\n</invoke>\n")
    assert parse_all(text, codec) == ("", [("get_weather", {"days": 2, "location": "Oslo"})])


def test_undeclared_tools_are_dropped_indices_dense(codec):
    text = ("A" + block(invoke("get_weather", location="Rome"), invoke("rm_rf", path="/"),
                        invoke("ping"), '<invoke>\n<parameter name="x">1</parameter>\n</invoke>\n',
                        invoke("write_file", path="b")) + "B")
    assert parse_all(text, codec) == ("AB", [("get_weather", {"location": "Rome"}), ("ping", {}),
                                             ("write_file", {"path": "b"})])


def test_several_blocks_and_text_around(codec):
    text = ("Before. " + block(invoke("ping")) + " Between, ünïcödé 世界 🎉. "
            + block(invoke("get_weather", location="Zürich 🌧"), invoke("ping")) + " After.")
    assert parse_all(text, codec) == ("Before.  Between, ünïcödé 世界 🎉.  After.",
                                      [("ping", {}), ("get_weather", {"location": "Zürich 🌧"}), ("ping", {})])


def test_empty_values_and_no_parameters(codec):
    text = block('<invoke name="get_weather"><parameter name="location"></parameter>'
                 '<parameter name="days"></parameter></invoke>', '<invoke name="ping"></invoke>')
    assert parse_all(text, codec) == ("", [("get_weather", {"location": "", "days": ""}), ("ping", {})])


@pytest.mark.parametrize("text, content", [
    (BEGIN + "\nplain words, no tags" + END + " after", " after"),
    (BEGIN + '\n<call name="x">1</call>\n' + END + " after", " after"),
    ("a" + END + "b", "ab"),  # a stray end tag
    ("x < y and <b>bold</b>, <invoke name=\"ping\"></invoke>", None),  # no block: all content
])
def test_malformed_blocks_are_dropped(codec, text, content):
    got, calls = parse_all(text, codec) if content is not None else (None, None)
    if content is None:  # markup outside a block is not this parser's: the text stays as it is
        parser = ToolCallParser(TOOLS)
        out = parser.feed(text)
        out += parser.finish()
        assert out.content == text and out.calls == []
        return
    assert (got, calls) == (content, [])


def test_truncated_at_every_character(codec):
    """Cut anywhere (finish() called): a call appears once its invoke tag is complete and holds
    exactly the parameters whose </parameter> came before the cut; content is the text before the
    block (a partial start tag is still text)."""
    start = CALL_TEXT.index(BEGIN)
    invoke_ends = [m.end() for m in re.finditer(r'<invoke name="[^"]*">', CALL_TEXT)]
    param_ends = [(m.start(), m.group(1), m.end()) for m in re.finditer(r'<parameter name="([^"]*)">.*?</parameter>',
                                                                         CALL_TEXT)]
    for cut in range(len(CALL_TEXT) + 1):
        want = []
        for i, (name, args) in enumerate(WANT_CALLS):
            if cut >= invoke_ends[i]:
                lo, hi = invoke_ends[i], invoke_ends[i + 1] if i + 1 < len(invoke_ends) else len(CALL_TEXT)
                keys = [k for s, k, e in param_ends if lo <= s < hi and e <= cut]
                want.append((name, {k: args[k] for k in keys}))
        content = CALL_TEXT[:cut] if cut < start + len(BEGIN) else CALL_TEXT[:start]
        for mode in ("whole", "chars"):
            assert parse(CALL_TEXT[:cut], mode) == (content, want), (cut, mode)


def test_truncated_tokens(codec):
    """The same through the detokenizer, cut after every token."""
    ids = token_ids(codec, CALL_TEXT)
    for n in range(len(ids) + 1):
        out_text, parser, got = OutputText(codec, thinking=False), ToolCallParser(TOOLS), Parsed()
        for t in ids[:n]:
            got += parser.feed(out_text.feed(t).content)
        got += parser.feed(out_text.finish().content)
        got += parser.finish()
        calls = check(got)
        assert len(calls) <= 2 and all(a.items() <= w[1].items() for (_, a), w in zip(calls, WANT_CALLS))


def test_thinking_holds_markup_the_parser_never_sees(codec):
    ids = (token_ids(codec, "I could " + block(invoke("rm_rf", path="/")) + " or not")
           + [codec.think_end] + token_ids(codec, "Done." + block(invoke("ping"))))
    out_text, parser, reasoning, got = OutputText(codec, thinking=True), ToolCallParser(TOOLS), "", Parsed()
    for t in ids:
        d = out_text.feed(t)
        reasoning += d.reasoning
        got += parser.feed(d.content)
    got += parser.finish()
    assert reasoning == "I could " + block(invoke("rm_rf", path="/")) + " or not"
    assert (got.content, check(got)) == ("Done.", [("ping", {})])


# ---- typing by schema --------------------------------------------------------------------------------

@pytest.mark.parametrize("param, text, want", [
    ("days", "5", 5), ("days", " 7 ", 7), ("days", "-3", -3), ("days", "5.5", "5.5"), ("days", "abc", "abc"),
    ("days", "", ""), ("days", "null", "null"),  # not nullable: the word stays a string
    ("ratio", "5", 5), ("ratio", "2.50", 2.5), ("ratio", "5.0", 5), ("ratio", "1e3", 1000), ("ratio", "-0.25", -0.25),
    ("ratio", "NaN", "NaN"), ("ratio", "Infinity", "Infinity"), ("ratio", "1e999", "1e999"), ("ratio", "0x10", "0x10"),
    ("metric", "true", True), ("metric", "True", True), ("metric", "FALSE", False), ("metric", "1", True),
    ("metric", "0", False), ("metric", "yes", True), ("metric", "off", False), ("metric", "maybe", "maybe"),
    ("hours", "[9, 12]", [9, 12]), ("hours", "\n[1]\n", [1]), ("hours", "9, 12", "9, 12"), ("hours", '{"a": 1}', '{"a": 1}'),
    ("hours", "[NaN]", "[NaN]"),
    ("opts", '{"a": [1, {"b": null}]}', {"a": [1, {"b": None}]}), ("opts", "[1]", "[1]"), ("opts", "{bad", "{bad"),
    ("note", "null", None), ("note", "NULL", None), ("note", "hi", "hi"), ("note", "5", "5"),
    ("when", "null", None), ("when", "noon", "noon"),
    ("level", "2", 2), ("level", "two", "two"),
    ("count", "12", 12), ("count", "a dozen", "a dozen"),
    ("location", "5", "5"), ("location", "[1, 2]", "[1, 2]"), ("location", "null", "null"), ("location", "true", "true"),
    ("location", "\n  indented\n", "  indented"), ("location", "\n\nline\n\n", "line"), ("location", " pad ", " pad "),
    ("not_in_schema", "5", "5"), ("not_in_schema", '{"a": 1}', '{"a": 1}'),
])
def test_values_typed_by_schema(param, text, want):
    _, calls = parse(block(invoke("get_weather", **{param: text})))
    assert calls == [("get_weather", {param: want})]
    assert type(calls[0][1][param]) is type(want)  # 5, not 5.0 or True


def test_without_a_tool_list_every_name_and_value_is_text(codec):
    text = block(invoke("anything", days="5", hours="[1, 2]", flag="true", none="null"))
    assert parse_all(text, codec, tools=None) == (
        "", [("anything", {"days": "5", "hours": "[1, 2]", "flag": "true", "none": "null"})])


def test_an_empty_tool_list_declares_nothing():
    assert parse(block(invoke("ping")), tools=[]) == ("", [])


def test_anthropic_tools_are_typed_the_same():
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"days": {"type": "integer"}}}}]
    assert parse(block(invoke("get_weather", days="4")), tools=tools) == ("", [("get_weather", {"days": 4})])


# ---- a property: random markup soup ------------------------------------------------------------------

SOUP_TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {
    k: {"type": "string"} for k in ("a", "b", "ç")}}}} for n in ("f", "g", "ü")]
VALUE_BITS = ["x", "yz ", " ", "\n", "é", "世", "<div>", "</div>", "</parameter> q", "a</invoke>b", "<", ">", '"',
              "</minimax:tool_call", "<parameter", "&amp;"]
JUNK = ["", "", "\n", " ", "junk", "</invoke", "<p>", ">"]


def soup(rng: random.Random) -> tuple[str, str, list]:
    """A random answer and what it means: (text, content, calls). Blocks are well formed up to the
    variations the parser must take (attributes, quotes, junk between elements, undeclared or
    nameless invokes, repeated parameters, markup in values)."""
    text, content, calls = "", "", []
    for _ in range(rng.randint(0, 3)):
        words = rng.choice(["", "Hi ", "ok\n", "a < b ", "ünï ", "x>y"])
        text, content = text + words, content + words
        text += BEGIN + rng.choice(JUNK)
        for _ in range(rng.randint(0, 3)):
            name = rng.choice(["f", "g", "ü", "nope", None])
            q = rng.choice(['"', "'"])
            attrs = [f"name={q}{name}{q}"] if name else []
            attrs += rng.sample(['type="object"', "description='a > b'", 'x=1'], rng.randint(0, 2))
            rng.shuffle(attrs)
            text += "<invoke " + " ".join(attrs) + ">" + rng.choice(JUNK)
            args = {}
            for _ in range(rng.randint(0, 3)):
                key = rng.choice(["a", "b", "ç"])
                value = "".join(rng.choice(VALUE_BITS) for _ in range(rng.randint(0, 5)))
                # After a </parameter> only whitespace: text there would make it value text.
                text += f'<parameter name="{key}" {rng.choice(["", "kind=1"])}>{value}</parameter>'
                text += rng.choice(["", "\n", " "])
                args.setdefault(key, value.strip("\n"))
            text += "</invoke>" + rng.choice(JUNK)
            if name in ("f", "g", "ü"):
                calls.append((name, args))
        text += END
    tail = rng.choice(["", " bye", "\n"])
    return text + tail, content + tail, calls


def test_soup_property(codec):
    rng = random.Random(1234)
    for case in range(3000):
        text, content, calls = soup(rng)
        modes = ["whole", "chunks"] + (["chars", "tokens"] if case % 10 == 0 else [])
        for mode in modes:
            assert parse(text, mode, codec, SOUP_TOOLS, seed=case) == (content, calls), (case, mode, text)
        cut = rng.randint(0, len(text))  # truncated: the invariant only
        for mode in ("whole", "chunks"):
            parse(text[:cut], mode, codec, SOUP_TOOLS, seed=case)


# ---- speed ------------------------------------------------------------------------------------------

def _feed_time(text: str) -> float:
    best = float("inf")
    for _ in range(3):
        parser = ToolCallParser(TOOLS)
        t0 = time.perf_counter()
        for i in range(0, len(text), 4):  # about one token's text each
            parser.feed(text[i:i + 4])
        parser.finish()
        best = min(best, time.perf_counter() - t0)
    return best


def test_a_long_answer_is_parsed_in_linear_time():
    """A 20 KB answer (prose, then a call writing a 16 KB file) fed 4 characters at a time, against
    one 4x as long: linear work gives a ratio near 4, a rescan per token near 16; 8 leaves room for
    timer noise on a shared machine. The absolute bound is generous (measured about 20 ms)."""
    def answer(n):
        body = "".join(f"line {i} <b>x</b> </parameter> y\n" for i in range(n))
        return "Prose. " * n + block(invoke("write_file", path="big.txt", content=body))
    small, large = answer(500), answer(2000)
    assert 19_000 < len(small) < 25_000
    t_small, t_large = _feed_time(small), _feed_time(large)
    print(f"20 KB fed 4 chars at a time: {t_small * 1e3:.1f} ms; 4x: {t_large * 1e3:.1f} ms")
    assert t_small < 0.5 and t_large / t_small < 8
