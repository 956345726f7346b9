"""The OpenAI-compatible server (`python -m runtime.serve`) run for real on loopback, used through the
official `openai` client and plain HTTP (the tool-call parser on scripted outputs: tests/test_tool_calls.py).

The token reference is `runtime/chat.py --json` on the same export (itself checked against
transformers in test_runtime.py); greedy float32 tokens must be identical."""
import json
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from runtime.ports import free_port
from runtime.text import TextCodec
from tests.cli import ROOT, chat_outputs

N_NEW = 12
ID_PROMPTS = [[1, 5, 9], [7], [200, 31, 4, 4, 18, 90, 33, 512, 6, 2, 77, 101, 3, 44, 19, 250, 8]]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "location": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "hours": {"type": "array"}, "ratio": {"type": "number"}}}}}]


# ---- the server, for real -------------------------------------------------------------------------

class Served:
    def __init__(self, export, *extra, api_key: str = "none"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--model", str(export), "--port",
                                      str(self.port), "--log-level", "warning", "--kv-cache-gb", "0.05",
                                      "--max-num-seqs", "40", *extra],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            self.proc.kill()  # not left running for the rest of the session
            raise RuntimeError("server did not come up")
        import openai
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)
        self.model = self.client.models.list().data[0].id

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def post(self, path: str, body: bytes | dict) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> str:
        """SIGTERM; returns the server's output (uvicorn re-raises the signal after a graceful stop)."""
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout=60)
        finally:
            self.proc.kill()
        assert code in (0, -15), code
        return self.proc.stdout.read()


def stop_all(servers) -> list[str]:
    """Stop every server, even when one's stop fails (a failed check must not leave the rest running),
    and return their outputs."""
    outs = []
    for s in servers:
        try:
            outs.append(s.stop())
        except Exception as e:  # noqa: BLE001 - reported by the caller's check on the output
            outs.append(f"stop failed: {e!r}")
    return outs


@pytest.fixture(scope="module")
def servers(exported):
    started = {}

    def get(tp: int) -> Served:
        if tp not in started:
            started[tp] = Served(exported("tiny", tp).root)
        return started[tp]

    yield get
    for out in stop_all(started.values()):  # SIGTERM drains and stops cleanly, tensor-parallel ranks included
        assert "stopped (engine and its ranks closed)" in out
    out = subprocess.run(["pgrep", "-f", "runtime.distributed --worker"], capture_output=True, text=True).stdout
    assert not out.strip(), f"worker ranks left running: {out}"



@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.long)])  # TP=2: in make test-slow
def test_completions_with_token_ids_give_chat_cli_tokens(servers, exported, tp):
    s = servers(tp)
    want = chat_outputs(exported("tiny", tp).root, ID_PROMPTS, n=N_NEW)
    eos = exported("tiny", 1).config.eos_token_ids
    for p, w in zip(ID_PROMPTS, want):
        r = s.client.completions.create(model=s.model, prompt=p, max_tokens=N_NEW, temperature=0,
                                        extra_body={"return_token_ids": True})
        c = r.choices[0]
        assert c.model_extra["token_ids"] == w
        assert c.finish_reason == ("stop" if w[-1] in eos else "length")
        assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == len(w)
        # streamed: the same tokens, one per chunk, and the same text
        chunks = list(s.client.completions.create(model=s.model, prompt=p, max_tokens=N_NEW, temperature=0,
                                                  stream=True, extra_body={"return_token_ids": True}))
        assert [t for ch in chunks for t in ch.choices[0].model_extra["token_ids"]] == w
        assert "".join(ch.choices[0].text for ch in chunks) == c.text


@pytest.mark.slow
def test_chat_stream_joins_to_the_answer_and_splits_reasoning(servers, exported):
    s = servers(1)
    codec = TextCodec(exported("tiny", 1).root)
    msgs = [{"role": "user", "content": "Hello! What is 2 + 3?"}]
    ids = codec.encode_chat(msgs)
    want = chat_outputs(exported("tiny", 1).root, texts=["Hello! What is 2 + 3?"], n=24)[0]
    r = s.client.chat.completions.create(model=s.model, messages=msgs, max_tokens=24, temperature=0)
    m = r.choices[0].message
    # The reference split, worked out here: the prompt opened <think>, so text up to </think> is reasoning.
    cut = want.index(codec.think_end) if codec.think_end in want else len(want)
    assert (m.model_extra.get("reasoning_content") or "") == codec.decode(want[:cut])
    assert (m.content or "") == codec.decode(want[cut + 1:])
    assert r.usage.completion_tokens == len(want) and r.usage.prompt_tokens == len(ids)
    stream = s.client.chat.completions.create(model=s.model, messages=msgs, max_tokens=24, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    reasoning, content, usage, reasons = "", "", None, []
    for ch in stream:
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            reasoning += c.delta.model_extra.get("reasoning_content") or ""
            content += c.delta.content or ""
            reasons.append(c.finish_reason)
    assert (reasoning, content) == ((m.model_extra.get("reasoning_content") or ""), m.content or "")
    assert reasons[-1] == r.choices[0].finish_reason and usage.completion_tokens == len(want)
    # the same prompt again: its full blocks come from the prefix cache
    again = s.client.chat.completions.create(model=s.model, messages=msgs, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= (len(ids) - 1) // 16 * 16 > 0
    # thinking closed in the prompt: the answer starts at once, nothing is reasoning
    r = s.client.chat.completions.create(model=s.model, messages=msgs, max_tokens=8, temperature=0,
                                         extra_body={"thinking": False})
    assert not r.choices[0].message.model_extra.get("reasoning_content")


@pytest.mark.slow
def test_tools_are_rendered_and_tool_turns_accepted(servers, exported):
    s = servers(1)
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"location": "Paris", "days": 2})}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    codec = TextCodec(exported("tiny", 1).root)
    rendered = codec.render([msgs[0], dict(msgs[1], tool_calls=[{"type": "function", "function": {
        "name": "get_weather", "arguments": {"location": "Paris", "days": 2}}}]), msgs[2]], True, tools=TOOLS)
    assert '<parameter name="days">2</parameter>' in rendered and "<response>sunny</response>" in rendered
    r = s.client.chat.completions.create(model=s.model, messages=msgs, tools=TOOLS, max_tokens=4, temperature=0,
                                         )
    assert r.usage.prompt_tokens == len(codec.encode(rendered))


@pytest.mark.slow
def test_concurrent_streams_are_batched_and_correct(servers, exported):
    """32 clients at once get chat.py's tokens. Both are float32, but the steps are composed
    differently, so a step may run the gather MoE form where the reference ran the dense one; the
    two agree within ~1e-5 (test_export), which a near-tie can still flip (seen with prompts of
    consecutive ids: one token flipped after 3). Seeded random prompts, as in the Triton test."""
    s = servers(1)
    g = random.Random(5)
    prompts = [[g.randrange(1, 896) for _ in range(g.randint(1, 40))] for _ in range(32)]
    want = chat_outputs(exported("tiny", 1).root, prompts, n=16)
    got, errors = {}, []

    def one(i):
        try:
            chunks = s.client.completions.create(model=s.model, prompt=prompts[i], max_tokens=16, temperature=0,
                                                 stream=True, extra_body={"return_token_ids": True})
            got[i] = [t for ch in chunks for t in ch.choices[0].model_extra["token_ids"]]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert [got[i] for i in range(32)] == want
    m = s.metrics()
    # some step carried more than 16 sequences at once: the requests were batched together
    assert m['minimax_step_batch_size_bucket{le="16.0"}'] < m["minimax_step_batch_size_count"]


@pytest.mark.slow
def test_disconnect_frees_blocks_and_bad_requests_get_400(servers):
    s = servers(1)
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": [1, 2, 3], "max_tokens": 3000, "temperature": 0,
                                                        "ignore_eos": True, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    for _ in range(5):
        resp.readline()
    assert s.metrics()["minimax_kv_blocks_used"] > 0
    conn.close()  # the client goes away mid-answer
    deadline = time.time() + 30
    while time.time() < deadline and (s.metrics()["minimax_kv_blocks_used"] or s.metrics()["minimax_requests_running"]):
        time.sleep(0.2)
    m = s.metrics()
    assert m["minimax_kv_blocks_used"] == 0 and m["minimax_requests_running"] == 0

    bad = [
        (b"{not json", "not valid JSON"),
        ({"model": s.model, "messages": []}, "at least one message"),
        ({"model": s.model, "messages": [{"role": "user", "content": "x " * 5000}]}, "longer than the context"),
        ({"model": s.model, "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n > 1"),
        ({"model": s.model, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
         "top_logprobs needs logprobs"),
        ({"model": s.model, "messages": [{"role": "wizard", "content": "hi"}]}, "Input should be 'system'"),
    ]
    for body, message in bad:
        code, out = s.post("/v1/chat/completions", body)
        assert code == 400 and message in out["error"]["message"], (body, out)
        assert out["error"]["type"] == "invalid_request_error"
    code, out = s.post("/v1/completions", {"model": s.model, "prompt": [1, 99999]})
    assert code == 400 and "outside the vocabulary" in out["error"]["message"]
    # stop strings end the text and are never shown
    full = s.client.completions.create(model=s.model, prompt=ID_PROMPTS[2], max_tokens=N_NEW, temperature=0).choices[0]
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    if stop.strip():
        cut = s.client.completions.create(model=s.model, prompt=ID_PROMPTS[2], max_tokens=N_NEW, temperature=0,
                                          stop=[stop]).choices[0]
        assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    # and the server still serves
    assert s.client.completions.create(model=s.model, prompt=[1, 5, 9], max_tokens=2, temperature=0).choices


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.long)])
def test_constrained_answers_and_logprobs_through_the_official_client(servers, tp):
    """response_format through the client's pydantic `parse`, tool_choice required and named, logprobs
    in the OpenAI shape; every answer validates against its schema (jsonschema), whatever the weights."""
    import jsonschema
    import pydantic
    from typing import Literal

    class Weather(pydantic.BaseModel):
        city: Literal["Paris", "Oslo"]
        days: int = pydantic.Field(ge=1, le=9)
        metric: bool

    s = servers(tp)
    msgs = [{"role": "user", "content": "weather?"}]
    r = s.client.chat.completions.parse(model=s.model, messages=msgs, response_format=Weather, max_tokens=60,
                                        temperature=0, extra_body={"thinking": False})
    assert isinstance(r.choices[0].message.parsed, Weather) and r.choices[0].finish_reason == "stop"
    params = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
              "days": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["city", "days"],
              "additionalProperties": False}
    names = ("get_weather", "get_tide")
    tools = [{"type": "function", "function": {"name": n, "parameters": params}} for n in names]
    # The schema bounds the block (enums, a one-digit range), so the grammar ends it within its longest
    # spelling: every token but the two tags and the end of turn holds at least one character (the
    # toy's tokenizer spells this XML ~1.4 characters a token), plus the lead of up to 4 whitespace.
    longest = max(len(f'\n<invoke name="{n}">\n<parameter name="city">Paris</parameter>\n'
                      '<parameter name="days">9</parameter>\n</invoke>\n') for n in names)
    for choice in ("required", {"type": "function", "function": {"name": "get_tide"}}):
        r = s.client.chat.completions.create(model=s.model, messages=msgs, tools=tools, tool_choice=choice,
                                             parallel_tool_calls=False, max_tokens=4 + longest + 3, temperature=0,
                                             extra_body={"thinking": False}, logprobs=True, top_logprobs=2)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0].function
        assert choice == "required" or call.name == "get_tide"
        jsonschema.validate(json.loads(call.arguments), params)
        assert len(c.logprobs.content) == r.usage.completion_tokens
        assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in c.logprobs.content)
    # completions: a json_schema and the legacy logprobs form (token -> logprob maps, text offsets)
    small = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
             "additionalProperties": False}
    r = s.client.completions.create(model=s.model, prompt="weather?", max_tokens=40, temperature=0, logprobs=2,
                                    extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                        "name": "ok", "schema": small}}})
    c = r.choices[0]
    jsonschema.validate(json.loads(c.text), small)
    assert len(c.logprobs.tokens) == r.usage.completion_tokens and "".join(c.logprobs.tokens) == c.text
    assert all(lp <= 0 and 1 <= len(top) <= 2 for lp, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs))
    code, body = s.post("/v1/chat/completions", {"messages": msgs, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}})
    assert code == 400 and body["error"]["param"] == "response_format.json_schema.schema"
    assert "uniqueItems" in body["error"]["message"]
