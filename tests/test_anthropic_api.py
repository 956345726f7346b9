"""The Anthropic-compatible Messages API (/v1/messages) on the real server on loopback, used through the
official `anthropic` client (and the `openai` one for the OpenAI route it must agree with), plus the
answer-to-blocks builder on scripted model output.

References: greedy float32 tokens from `runtime/chat.py --json` (as in test_openai_server.py), the chat
template rendered here by TextCodec from the OpenAI form of the same conversation, and Anthropic's
documented event order and error shape."""
import json

import openai
import pytest

anthropic = pytest.importorskip("anthropic")  # the test extras install it

from runtime.serving.anthropic_api import Blocks
from runtime.serving.tool_calls import ToolCallParser
from runtime.text import TextCodec
from tests.cli import chat_outputs
from tests.test_openai_server import Served, stop_all

KEY = "sekret"
GREEDY = {"temperature": 0}  # the current client leaves the sampling fields to extra_body
N_NEW = 24
QUESTION = "Hello! What is 2 + 3?"
TOOLS = [{"name": "get_weather", "description": "the weather", "input_schema": {"type": "object", "properties": {
    "location": {"type": "string"}, "days": {"type": "integer"}}}}]


@pytest.fixture(scope="module")
def served(exported):
    started = {}

    def get(tp: int) -> Served:
        if tp not in started:
            s = started[tp] = Served(exported("tiny", tp).root, "--api-key", KEY, api_key=KEY)
            s.anthropic = anthropic.Anthropic(base_url=s.url, api_key=KEY, max_retries=0, timeout=120)
        return started[tp]

    yield get
    for out in stop_all(started.values()):
        assert "stopped (engine and its ranks closed)" in out


def _post(s: Served, path: str, body, headers: dict | None = None) -> tuple[int, dict]:
    import urllib.request
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", "x-api-key": KEY, "anthropic-version": "2023-06-01"}
    req = urllib.request.Request(s.url + path, data=data, headers={**h, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _expected_blocks(codec: TextCodec, want: list[int]) -> list[dict]:
    """The split worked out from the token ids: the prompt opened <think>, so text up to </think> is a
    thinking block and the rest (without its leading whitespace) a text block, if any."""
    cut = want.index(codec.think_end) if codec.think_end in want else len(want)
    out = [{"type": "thinking", "thinking": codec.decode(want[:cut]), "signature": ""}]
    text = codec.decode(want[cut + 1:]).lstrip()
    return out + ([{"type": "text", "text": text}] if text else [])


def _dump(blocks) -> list[dict]:
    return [b.model_dump(exclude_none=True) for b in blocks]


def _check_event_order(events) -> None:
    """Anthropic's sequence: message_start, then per block start / deltas / stop (indices 0, 1, ...),
    then message_delta and message_stop; pings anywhere."""
    kinds = [e.type for e in events if e.type != "ping"]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    open_, next_index = None, 0
    for e in events[1:]:
        if e.type == "content_block_start":
            assert open_ is None and e.index == next_index
            open_, next_index = e.index, next_index + 1
        elif e.type == "content_block_delta":
            assert e.index == open_
        elif e.type == "content_block_stop":
            assert e.index == open_
            open_ = None
    assert open_ is None


# ---- on the server ------------------------------------------------------------------------------

@pytest.mark.slow
def test_stream_joins_to_the_answer_and_thinking_is_the_text_up_to_think_end(served, exported):
    s = served(1)
    export = exported("tiny", 1).root
    codec = TextCodec(export)
    ids = codec.encode_chat([{"role": "user", "content": QUESTION}])
    want = chat_outputs(export, texts=[QUESTION], n=N_NEW)[0]
    msgs = [{"role": "user", "content": QUESTION}]
    r = s.anthropic.messages.create(model=s.model, messages=msgs, max_tokens=N_NEW, extra_body=GREEDY)
    assert _dump(r.content) == _expected_blocks(codec, want)
    eos = codec.eos_id
    assert r.stop_reason == ("end_turn" if want[-1] == eos else "max_tokens") and r.stop_sequence is None
    assert r.usage.output_tokens == len(want)
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == len(ids)
    assert s.anthropic.messages.count_tokens(model=s.model, messages=msgs).input_tokens == len(ids)

    with s.anthropic.messages.stream(model=s.model, messages=msgs, max_tokens=N_NEW, extra_body=GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_message()
    _check_event_order(events)
    assert _dump(final.content) == _dump(r.content)
    assert (final.stop_reason, final.usage.output_tokens) == (r.stop_reason, r.usage.output_tokens)
    # the same prompt again: its full blocks are read from the prefix cache, and said so
    assert final.usage.cache_read_input_tokens >= (len(ids) - 1) // 16 * 16 > 0
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == len(ids)

    # a stop sequence taken from the thinking text ends it there and is named
    thinking = r.content[0].thinking
    stop = thinking[len(thinking) // 2:len(thinking) // 2 + 3]
    if stop.strip():
        cut = s.anthropic.messages.create(model=s.model, messages=msgs, max_tokens=N_NEW, extra_body=GREEDY,
                                          stop_sequences=[stop])
        assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
        assert _dump(cut.content) == [{"type": "thinking", "thinking": thinking[:thinking.index(stop)],
                                       "signature": ""}]
    # thinking disabled: the prompt closes the block, so no thinking comes back
    r = s.anthropic.messages.create(model=s.model, messages=msgs, max_tokens=4, extra_body=GREEDY,
                                    thinking={"type": "disabled"})
    assert all(b.type != "thinking" for b in r.content)


@pytest.mark.slow
def test_tool_round_trip_renders_as_the_openai_tool_messages(served, exported):
    s = served(1)
    codec = TextCodec(exported("tiny", 1).root)
    system = "You are terse."
    anth = [{"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "the user wants weather", "signature": "opaque"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"location": "Paris", "days": 2}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                {"type": "text", "text": "and tomorrow?"}]}]
    oai_tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                   "parameters": t["input_schema"]}} for t in TOOLS]
    oai = [{"role": "system", "content": system}, {"role": "user", "content": "weather in Paris?"},
           {"role": "assistant", "content": "Let me check.", "reasoning_content": "the user wants weather",
            "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"location": "Paris", "days": 2})}}]},
           {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
           {"role": "user", "content": "and tomorrow?"}]
    rendered = codec.render([dict(m, tool_calls=[{"type": "function", "function": {
        "name": "get_weather", "arguments": {"location": "Paris", "days": 2}}}]) if "tool_calls" in m else m
        for m in oai], True, tools=oai_tools)
    assert "<response>sunny</response>" in rendered and '<parameter name="days">2</parameter>' in rendered
    n = len(codec.encode(rendered))
    counted = s.anthropic.messages.count_tokens(model=s.model, system=system, messages=anth, tools=TOOLS)
    assert counted.input_tokens == n
    r = s.anthropic.messages.create(model=s.model, system=[{"type": "text", "text": system}], messages=anth,
                                    tools=TOOLS, tool_choice={"type": "auto"}, max_tokens=4, extra_body=GREEDY)
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == n
    o = s.client.chat.completions.create(model=s.model, messages=oai, tools=oai_tools, max_tokens=4, temperature=0)
    assert o.usage.prompt_tokens == n
    # tool_choice none: the tools are not shown to the model
    plain = s.anthropic.messages.count_tokens(model=s.model, messages=anth[:1], tools=TOOLS,
                                              tool_choice={"type": "none"})
    assert plain.input_tokens == len(codec.encode_chat([anth[0]]))


BAD = [  # (path, body, status, error type, fragment of the message)
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request_error", "max_tokens"),
    ("/v1/messages", {"max_tokens": 5, "messages": []}, 400, "invalid_request_error", "at least one message"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, 400,
     "invalid_request_error", "not supported"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                      "tools": [{"name": "bad name!", "input_schema": {"type": "object"}}]}, 400,
     "invalid_request_error", "tools.0.name"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                      "tools": [{"name": "f", "input_schema": {"type": "array"}}]}, 400,
     "invalid_request_error", "tools[0].input_schema"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "thinking", "thinking": "x"}]}]}, 400, "invalid_request_error", "assistant turns"),
    ("/v1/messages", {"max_tokens": 10 ** 9, "messages": [{"role": "user", "content": "hi"}]}, 400,
     "invalid_request_error", "maximum context length"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400,
     "invalid_request_error", "temperature"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "top_k": 1.5}, 400,
     "invalid_request_error", "top_k"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "stop_sequences": ["x"] * 99},
     400, "invalid_request_error", "stop_sequences"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "output_format": {}}, 400,
     "invalid_request_error", "not supported"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "x " * 5000}]}, 400,
     "invalid_request_error", "context"),
    ("/v1/messages", {"max_tokens": 5, "model": "claude-x", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "not_found_error", "does not exist"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "output_config": {
        "format": {"type": "json_schema", "schema": {"type": "array", "uniqueItems": True}}}}, 400,
     "invalid_request_error", "output_config.format.schema.uniqueItems: the keyword 'uniqueItems'"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
                      "tool_choice": {"type": "tool", "name": "get_tide"}}, 400, "invalid_request_error",
     "not in tools"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                      "tool_choice": {"type": "any"}}, 400, "invalid_request_error", "needs tools"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "The answer is"}]}, 400,
     "invalid_request_error", "prefill"),
    ("/v1/messages", b"{nope", 400, "invalid_request_error", "not valid JSON"),
    ("/v1/messages/count_tokens", {"messages": [{"role": "assistant", "content": [
        {"type": "tool_result", "tool_use_id": "1", "content": "x"}]}, {"role": "user", "content": "hi"}]}, 400,
     "invalid_request_error", "user turns"),
]


@pytest.mark.slow
def test_bad_requests_get_anthropic_shaped_errors(served):
    s = served(1)
    for path, body, status, kind, fragment in BAD:
        if isinstance(body, dict):
            body = {"model": s.model, **body}
        code, out = _post(s, path, body)
        assert code == status and set(out) == {"type", "error"} and out["type"] == "error", (body, out)
        assert out["error"]["type"] == kind and fragment in out["error"]["message"], (body, out)
    code, out = _post(s, "/v1/messages", {"model": s.model, "max_tokens": 5, "messages": []}, {"x-api-key": "no"})
    assert code == 401 and out["error"]["type"] == "authentication_error" and out["type"] == "error"
    # the official client reads them as their classes
    with pytest.raises(anthropic.BadRequestError) as e:
        s.anthropic.messages.create(model=s.model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                    tool_choice={"type": "tool", "name": "nope"}, tools=TOOLS)
    assert e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        s.anthropic.messages.create(model="claude-x", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=s.url, api_key="wrong", max_retries=0).messages.create(
            model=s.model, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    # the OpenAI routes keep OpenAI's shape, and the server still serves
    with pytest.raises(openai.BadRequestError) as e:
        s.client.chat.completions.create(model=s.model, messages=[], max_tokens=2)
    assert e.value.body["type"] == "invalid_request_error"
    sampled = {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "metadata": {"user_id": "u"}}
    assert s.anthropic.messages.create(model=s.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body=sampled).usage.output_tokens == 2


@pytest.mark.slow
def test_forced_tool_use_and_structured_output(served):
    """tool_choice any / tool (disable_parallel_tool_use: one call) hold the answer to one tool_use
    block whose input validates against its input_schema; output_config.format through the client's
    pydantic `parse` gives a text block that validates. Whatever the random weights: the grammar."""
    import jsonschema
    import pydantic
    from typing import Literal

    class Weather(pydantic.BaseModel):
        city: Literal["Paris", "Oslo"]
        days: Literal[1, 2, 3]  # the client moves a range into the description: an enum is kept
        metric: bool

    s = served(1)
    msgs, off = [{"role": "user", "content": "weather?"}], {"type": "disabled"}
    r = s.anthropic.messages.parse(model=s.model, messages=msgs, max_tokens=80, output_format=Weather,
                                   thinking=off, extra_body=GREEDY)
    assert r.stop_reason == "end_turn" and isinstance(r.parsed_output, Weather)
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
              "days": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["city", "days"],
              "additionalProperties": False}
    tools = [{"name": n, "input_schema": schema} for n in ("get_weather", "get_tide")]
    # bounded by the schema (tests/test_openai_server.py: every token but the tags and the end holds a character)
    longest = max(len(f'\n<invoke name="{t["name"]}">\n<parameter name="city">Paris</parameter>\n'
                      '<parameter name="days">9</parameter>\n</invoke>\n') for t in tools)
    for choice in ({"type": "any", "disable_parallel_tool_use": True}, {"type": "tool", "name": "get_tide"}):
        r = s.anthropic.messages.create(model=s.model, messages=msgs, max_tokens=4 + longest + 3, tools=tools,
                                        tool_choice=choice, thinking=off, extra_body=GREEDY)
        uses = [b for b in r.content if b.type == "tool_use"]
        assert r.stop_reason == "tool_use" and len(uses) == 1, r
        assert choice["type"] == "any" or uses[0].name == "get_tide"
        jsonschema.validate(uses[0].input, schema)


@pytest.mark.long  # the OpenAI routes' TP=2 cases stay in make test
def test_tensor_parallel_2_stream_and_answer(served, exported):
    """The reference is chat.py at TP=1 (the first test's run): TP=2 gives TP=1's greedy tokens
    (test_tensor_parallel.py), so no second chat.py with its own worker rank is started for it."""
    s = served(2)
    codec = TextCodec(exported("tiny", 2).root)
    want = chat_outputs(exported("tiny", 1).root, texts=[QUESTION], n=N_NEW)[0]
    msgs = [{"role": "user", "content": QUESTION}]
    r = s.anthropic.messages.create(model=s.model, messages=msgs, max_tokens=N_NEW, extra_body=GREEDY)
    assert _dump(r.content) == _expected_blocks(codec, want) and r.usage.output_tokens == len(want)
    with s.anthropic.messages.stream(model=s.model, messages=msgs, max_tokens=N_NEW, extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert _dump(final.content) == _dump(r.content)


# ---- the answer as blocks, on scripted output ---------------------------------------------------

def test_blocks_from_thinking_text_and_tool_calls():
    """A scripted answer fed in pieces: the stream's deltas join to the blocks; whitespace after
    </think> and before the call makes no text block; the tool's input is typed by its schema."""
    parser = ToolCallParser(TOOLS)
    pieces = [("I should ", ""), ("call it.\n", ""), ("", "\n\nChecking"), ("", " now.\n<minimax:tool_call>\n"),
              ("", '<invoke name="get_weather">\n<parameter name="location">Par'),
              ("", 'is</parameter>\n<parameter name="days">3</parameter>\n</invoke>\n'),
              ("", '<invoke name="undeclared"><parameter name="a">1</parameter></invoke>\n</minimax:tool_call>\n')]
    blocks, events = Blocks(), []
    for i, (reasoning, content) in enumerate(pieces):
        last = i == len(pieces) - 1
        parsed = parser.feed(content)
        if last:
            parsed += parser.finish()
        events += blocks.feed(reasoning, parsed.content, parsed.calls)
    events += blocks.finish()
    assert [{k: v for k, v in b.items() if k != "id"} for b in blocks.blocks] == [
        {"type": "thinking", "thinking": "I should call it.\n", "signature": ""},
        {"type": "text", "text": "Checking now.\n"},
        {"type": "tool_use", "name": "get_weather", "input": {"location": "Paris", "days": 3}}]
    assert blocks.called
    joined = {}
    for e in events:
        if e["type"] == "content_block_start":
            joined[e["index"]] = dict(e["content_block"])
            joined[e["index"]]["json"] = ""
        elif e["type"] == "content_block_delta":
            d, b = e["delta"], joined[e["index"]]
            b["thinking" if d["type"] == "thinking_delta" else "text" if d["type"] == "text_delta" else "json"] += (
                d.get("thinking") or d.get("text") or d.get("partial_json"))
    assert json.loads(joined[2]["json"]) == blocks.blocks[2]["input"]
    assert joined[0]["thinking"] == blocks.blocks[0]["thinking"] and joined[1]["text"] == blocks.blocks[1]["text"]
    assert [e["type"] for e in events].count("content_block_stop") == 3


def test_no_tools_declared_markup_is_dropped():
    """Without tools (ToolCallParser([]), as both chat routes build it) a call the model writes anyway
    is neither a tool_use block nor text."""
    parser, blocks = ToolCallParser([]), Blocks()
    parsed = parser.feed('Hi <minimax:tool_call><invoke name="f"><parameter name="a">1</parameter></invoke>'
                         '</minimax:tool_call> there')
    parsed += parser.finish()
    blocks.feed("", parsed.content, parsed.calls)
    blocks.finish()
    assert blocks.blocks == [{"type": "text", "text": "Hi  there"}] and not blocks.called
