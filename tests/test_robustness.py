"""One request never takes the server down: every field checked before the engine (with the field
named), failures inside the engine per request, a dead or hung engine noticed and the process ended
for its supervisor, the API key and the limits; and a schema-driven fuzzer (schemathesis) against the
real server's /openapi.json.

The expected ranges are the ones OpenAI's API reference and vLLM document (temperature >= 0, 0 < top_p
<= 1, top_k >= -1, a 64-bit seed, max_tokens >= 1 and within the context, one served model name), not
read from the code under test. Token references are the server's own greedy answer before the attack
(itself equal to chat.py --json and transformers in test_openai_server.py / test_runtime.py)."""
import http.client
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from runtime import validation
from runtime.config import EngineConfig
from runtime.llm_engine import LLMEngine
from runtime.sampling import Sampler, SamplingParams, sample_on_device
from runtime.serving.loop import Request, ServingLoop
from tests.cli import ROOT, chat_cmd
from tests.test_openai_server import Served

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


# ---- the sampler and the checks, alone ----------------------------------------------------------

def test_a_nan_row_fails_alone_and_tiny_top_p_keeps_the_best_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    logits[2, 7] = float("nan")
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=1e-46, seed=3),
              SamplingParams(temperature=0.7, seed=1), SamplingParams(temperature=1.0, top_k=5, seed=2)]
    tokens, failed = Sampler().sample(logits, [0, 1, 2, 3], params)
    assert set(failed) == {2} and "NaN" in failed[2]
    assert tokens[0] == int(torch.argmax(logits[0]))
    assert tokens[1] == int(torch.argmax(logits[1]))  # top_p below float32's tiniest: the best token only
    assert tokens[3] in torch.topk(logits[3], 5).indices.tolist()
    # the device sampler (async scheduling) on the same rows, seeds aside
    tokens, status = sample_on_device(logits, params)
    assert status.tolist() == [0, 0, 1, 0]  # 1: NaN
    assert tokens[0] == int(torch.argmax(logits[0])) and tokens[1] == int(torch.argmax(logits[1]))
    assert int(tokens[3]) in torch.topk(logits[3], 5).indices.tolist()


LIMITS = validation.Limits(vocab_size=1000, max_model_len=100)


@pytest.mark.parametrize("field,value,fragment", [
    ("temperature", -0.1, ">= 0"), ("temperature", math.inf, "finite"), ("temperature", math.nan, "finite"),
    ("temperature", "1", "number"), ("top_p", 0.0, r"in \(0, 1\]"), ("top_p", 1.5, r"in \(0, 1\]"), ("top_p", math.nan, "finite"),
    ("top_k", -2, ">= -1"), ("top_k", 1.5, "integer"), ("seed", 2 ** 64, "<="), ("seed", -(2 ** 63) - 1, ">="),
    ("max_tokens", 0, ">= 1"), ("max_tokens", 91, "maximum context length is 100"),
    ("stop_token_ids", [1000], "outside the vocabulary"), ("stop_token_ids", list(range(65)), "at most"),
    ("ignore_eos", "yes", "boolean"),
])
def test_each_bad_field_is_named(field, value, fragment):
    with pytest.raises(validation.RequestError, match=fragment) as e:
        validation.sampling_params(LIMITS, _NO_DEFAULTS, 10, **{field: value})
    assert e.value.param == field


def test_limits_that_hold():
    p = validation.sampling_params(LIMITS, _NO_DEFAULTS, 10, temperature=1e-300, top_k=-1, seed=2 ** 64 - 1,
                                   max_tokens=90)
    assert (p.temperature, p.top_k, p.max_tokens) == (0.0, 0, 90)  # vLLM: below 1e-5 is greedy; -1 is off
    assert validation.sampling_params(LIMITS, _NO_DEFAULTS, 95).max_tokens == 5  # unset: what the context leaves
    with pytest.raises(validation.RequestError, match="longer than the context allows"):
        validation.sampling_params(LIMITS, _NO_DEFAULTS, 100)
    for tools, param in [([{"type": "retrieval"}], "tools[0].type"), ([{"type": "function"}], "tools[0].function"),
                         ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name"),
                         ([{"type": "function", "function": {"name": "f", "parameters": 5}}],
                          "tools[0].function.parameters"),
                         ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
                          "tools[0].function.parameters")]:
        with pytest.raises(validation.RequestError) as e:
            validation.check_tools(tools)
        assert e.value.param == param


class _Defaults:
    temperature = top_p = top_k = do_sample = None


_NO_DEFAULTS = _Defaults()


# ---- the engine and the serving loop, in process -------------------------------------------------

def _engine(man, **kw) -> LLMEngine:
    return LLMEngine(man.root, EngineConfig(block_size=4, num_blocks=64, max_model_len=256, **kw))


@pytest.mark.parametrize("overlap", [False, True], ids=["one-step-at-a-time", "async-scheduling"])
def test_a_request_failing_inside_a_step_fails_alone(exported, overlap):
    """A fault injected into one sequence's logits (NaN) ends that request with an error and frees its
    blocks; the others get the tokens of a clean run. With async scheduling the NaN is found on the
    device and reported when the step completes, after the next step was launched."""
    man = exported("tiny", 1)
    prompts = [[1, 5, 9], [7, 8], [200, 31, 4, 4, 18]]
    clean = _engine(man)
    want = [s.output for s in clean.generate(prompts, GREEDY)]
    e = _engine(man, async_scheduling=overlap)
    seqs = [e.add_request(p, GREEDY) for p in prompts]
    run = e.executor.run

    def poisoned(ids, positions, meta, rows, k, extras=None, carried=None):
        out = run(ids, positions, meta, rows, k, extras, carried)
        # the second request's third token (len counts a token still on the device)
        if len(seqs[1]) == len(prompts[1]) + 2 and out.shape[0] == 3:
            out = out.clone()
            out[1, 0] = float("nan")
        return out

    e.executor.run = poisoned
    errors = []
    while e.has_unfinished():
        errors += [o for o in e.step() if o.error]
    assert [o.seq for o in errors] == [seqs[1]] and "NaN" in errors[0].error and errors[0].token is None
    assert seqs[1].finish_reason == "error" and seqs[1].output == want[1][:2]
    assert [seqs[0].output, seqs[2].output] == [want[0], want[2]]
    assert (e.stats.overlapped_steps > 0) == overlap
    e.blocks.check([])  # every block back


def test_a_broken_engine_fails_everyone_and_stops_the_loop(exported):
    man = exported("tiny", 1)
    e = _engine(man)
    events, dead = [], []
    steps = {"n": 0}
    run = e.executor.run

    def breaks(*a):
        steps["n"] += 1
        if steps["n"] > 2:
            raise RuntimeError("injected kernel fault")
        return run(*a)

    e.executor.run = breaks
    loop = ServingLoop(e, on_dead=dead.append, step_timeout=0)
    for p in ([1, 2, 3], [4, 5]):
        loop.submit(Request(p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), events.append))
    deadline = time.time() + 30
    while loop.thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert not loop.thread.is_alive()  # the thread ends: no spinning on a dead engine
    assert len(dead) == 1 and "injected kernel fault" in dead[0]
    failed = [ev for ev in events if ev.error]
    assert len(failed) == 2 and all(ev.finished and ev.token is None for ev in failed)
    late = []
    loop.submit(Request([1], GREEDY, late.append))  # answered at once
    assert late and late[0].error == loop.dead


def test_a_cancelled_stream_under_async_scheduling_leaves_the_others_exact(exported):
    """The serving loop over an engine with async scheduling: a client that goes away after three
    tokens (its row may be in the step in flight) gets nothing more, and its blocks come back; the
    other streams get exactly the tokens of a one-step-at-a-time run, each once, in order, then one
    final event."""
    man = exported("tiny", 1)
    prompts = [[1, 5, 9], [7, 8], [200, 31, 4, 4, 18]]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = [s.output for s in _engine(man).generate(prompts, params)]
    e = _engine(man, async_scheduling=True)
    loop = ServingLoop(e, step_timeout=0)
    events = [[] for _ in prompts]
    reqs = []
    for i, p in enumerate(prompts):
        def on_event(ev, i=i):
            events[i].append(ev)
            if i == 1 and len(events[1]) == 3:
                reqs[1].cancel()
        reqs.append(Request(p, params, on_event))
    for r in reqs:
        loop.submit(r)
    deadline = time.time() + 60
    while time.time() < deadline and not (events[0] and events[0][-1].finished and events[2]
                                          and events[2][-1].finished):
        time.sleep(0.05)
    time.sleep(0.3)  # a few more steps: nothing more may reach the cancelled request
    left = loop.stop()
    assert not left
    for i in (0, 2):
        assert [ev.token for ev in events[i]] == want[i] and [ev.finished for ev in events[i]].count(True) == 1
    assert len(events[1]) == 3 and [ev.token for ev in events[1]] == want[1][:3]
    assert reqs[1].seq.finish_reason == "abort" and e.stats.overlapped_steps > 0
    assert e.blocks.num_free == e.blocks.num_usable
    e.blocks.check([])


def test_usage_counts_the_tokens_reported_when_a_stop_string_ends_a_two_token_step(exported):
    """Under async scheduling a step that must complete at once (a seeded row joins) also completes the
    step in flight: one engine step gives a running sequence two tokens. When a stop string ends the
    text at the first, the second was generated (it is in seq.output) but never reported; the usage
    (Event.completion_tokens, what the OpenAI, Anthropic and Triton front ends report) must count the
    reported tokens. Before the fix they counted len(seq.output): one too many. The reference: the
    same request's greedy tokens one step at a time, and where its text first holds the stop string."""
    from runtime.output_text import OutputText

    man = exported("tiny", 1)
    prompt = [1, 5, 9, 200]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = _engine(man)
    want, codec = ref.generate([prompt], params)[0].output, ref.codec
    texts = _texts(codec, want)
    # B joins after A's k-th reported token: the step it joins gives A tokens k + 1 and k + 2. A's stop
    # string is its whole text through token k + 1, which must add text (a token can hold back half a
    # character): then the string first appears there.
    k = next(i for i in range(4, len(want) - 4) if texts[i])
    stop = "".join(texts[:k + 1])
    e = _engine(man, async_scheduling=True)
    loop = ServingLoop(e, step_timeout=0)
    a_events, b_events = [], []

    def on_a(ev):
        a_events.append(ev)
        if len(a_events) == k:  # on the loop's thread: B is taken before the next step
            loop.submit(Request([7, 8], SamplingParams(temperature=1.0, seed=3, max_tokens=4, ignore_eos=True),
                                b_events.append, OutputText(codec, False)))

    loop.submit(Request(prompt, params, on_a, OutputText(codec, False, stops=[stop])))
    deadline = time.time() + 60
    while time.time() < deadline and not (a_events and a_events[-1].finished and b_events and b_events[-1].finished):
        time.sleep(0.05)
    loop.stop()
    assert a_events[-1].finished and a_events[-1].finish_reason == "stop"
    assert [ev.token for ev in a_events] == want[:k + 1]
    assert [ev.completion_tokens for ev in a_events] == list(range(1, k + 2))
    seq = a_events[-1].seq
    assert seq.output == want[:k + 2]  # the step that gave two tokens happened: one generated, not reported
    # what the front ends report for the final event
    from runtime.serving import anthropic_api
    from runtime.serving.openai_server import OpenAIServer

    assert OpenAIServer._usage(a_events[-1], len(prompt))["completion_tokens"] == k + 1
    assert anthropic_api._usage(a_events[-1], len(prompt))["output_tokens"] == k + 1
    assert e.stats.overlapped_steps > 0


def _texts(codec, ids):
    """Each token's text as the serving detokenizer gives it, one token at a time."""
    from runtime.output_text import OutputText

    out = OutputText(codec, False)
    return [out.feed(t).content for t in ids]


# ---- the real server -----------------------------------------------------------------------------

def _greedy(s: Served) -> list[int]:
    r = s.client.completions.create(model=s.model, prompt=[1, 5, 9, 200], max_tokens=8, temperature=0,
                                    extra_body={"return_token_ids": True, "ignore_eos": True})
    return r.choices[0].model_extra["token_ids"]


def _raw(s: Served, method: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else {}


@pytest.fixture(scope="module")
def server(exported):
    # A short context bounds the fuzzer's generations (its max_tokens reach the context): at 64 it
    # sends the same 1365 cases with as many accepted as at 320, and generates a quarter of the tokens.
    # async scheduling (a GPU's default) on: the fuzzer and the hostile requests meet the device sampler
    # and the steps launched before the previous one's tokens are read
    s = Served(exported("tiny", 1).root, "--max-model-len", "64", "--async-scheduling")
    yield s
    s.stop()


HOSTILE = [  # (body, status, param or None, fragment of the message)
    ({"prompt": [1, 2], "seed": 2 ** 70}, 400, "seed", "less than or equal"),
    ({"prompt": [1, 2], "top_p": 1e-46, "temperature": 0.5, "max_tokens": 2}, 200, None, None),
    ({"prompt": [1, 2], "temperature": 1e-300, "max_tokens": 2}, 200, None, None),
    ({"prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"prompt": [1, 2], "model": "gpt-4o"}, 404, "model", "does not exist"),
    ({"prompt": [[False]]}, 400, "prompt", "token ids"),
    ({"prompt": [1, 2], "max_tokens": 10 ** 9}, 400, "max_tokens", "maximum context length"),
    ({"prompt": [1, 2], "top_k": -5}, 400, "top_k", "greater than or equal to -1"),
    ({"prompt": [1, 2], "stop_token_ids": [10 ** 9]}, 400, "stop_token_ids", "outside the vocabulary"),
    ({"prompt": [1, 2], "stop": ["x"] * 100}, 400, "stop", None),
    ({"prompt": [1, 2], "stream": "yes"}, 400, "stream", None),
    ({"prompt": [1, 2], "echo": True}, 400, "echo", "not supported"),
    ({"prompt": [1, 2], "logprobs": 50}, 400, "logprobs", None),
    ({"messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "function", "function": {"name": "f", "parameters": 5}}]}, 400,
     "tools.0.function.parameters", None),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "retrieval"}]}, 400, "tools.0.type", None),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools.0.function",
     None),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {}}]}, 400,
     "tools.0.function.name", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400,
     "messages.0.content", "text only"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}, 400, "temperature", "finite"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400, "tool_choice", None),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}, 400, "messages", None),
    ({}, 400, None, "Field required"),
]


@pytest.mark.slow
def test_hostile_requests_get_4xx_and_change_nothing(server):
    before = _greedy(server)
    for body, status, param, fragment in HOSTILE:
        path = "/v1/chat/completions" if "messages" in body or not body else "/v1/completions"
        code, out = server.post(path, body)
        assert code == status, (body, out)
        if status >= 400:
            assert out["error"]["type"] in ("invalid_request_error",) and out["error"]["message"], out
            assert param is None or out["error"]["param"] == param, (body, out)
            assert fragment is None or fragment in out["error"]["message"], (body, out)
    for raw, fragment in [(b'{"prompt": "\xff\xfe"}', "could not be parsed"), (b"[" * 100000 + b"]" * 100000,
                                                                               "could not be parsed"),
                          (b'{"prompt": [1, 2], "temperature": Infinity}', "finite"), (b"{nope", "not valid JSON")]:
        code, out = _raw(server, "POST", "/v1/completions", raw)
        assert code == 400 and fragment in out["error"]["message"], (raw[:40], out)
    code, out = _raw(server, "GET", "/v1/nowhere", b"")
    assert code == 404 and out["error"]["type"] == "not_found_error"
    assert server.post("/v1/completions", {"prompt": [1, 2], "max_tokens": 2})[0] == 200
    assert _greedy(server) == before
    code, health = _raw(server, "GET", "/health", b"")
    assert code == 200
    m = server.metrics()
    assert m['minimax_requests_rejected_total{status="400"}'] >= len([h for h in HOSTILE if h[1] == 400])


@pytest.mark.slow
def test_schema_driven_fuzzing_finds_no_server_error(server):
    """schemathesis against /openapi.json, bounded: no 5xx, answers as documented (status codes, content
    types, 405s with Allow); then /health is 200 and a greedy completion is unchanged. Schema-valid
    requests may still be refused for what a schema cannot say (a tool message with no call before it),
    so the 'positive data acceptance' check is left out."""
    before = _greedy(server)
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run",
                        f"{server.url}/openapi.json", "--max-examples", "12", "--seed", "7", "--checks", "all",
                        "--exclude-checks", "positive_data_acceptance", "--max-response-time", "120",
                        "--request-timeout", "120", "--no-color"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:]
    code, _ = _raw(server, "GET", "/health", b"")
    assert code == 200 and _greedy(server) == before


@pytest.mark.slow
def test_api_key_body_cap_and_queue_cap(exported):
    s = Served(exported("tiny", 1).root, "--api-key", "sekret", "--max-request-bytes", "4000",
               "--max-waiting-requests", "2", "--max-num-seqs", "1", api_key="sekret")
    try:
        key = {"Authorization": "Bearer sekret"}
        assert _raw(s, "GET", "/health", b"")[0] == 200  # open, for probes
        code, out = _raw(s, "GET", "/v1/models", b"")
        assert code == 401 and out["error"]["code"] == "invalid_api_key"
        assert _raw(s, "GET", "/v1/models", b"", {"Authorization": "Bearer wrong"})[0] == 401
        assert _raw(s, "GET", "/openapi.json", b"")[0] == 401
        assert _raw(s, "GET", "/v1/models", b"", key)[0] == 200
        body = json.dumps({"prompt": "x " * 3000}).encode()
        code, out = _raw(s, "POST", "/v1/completions", body, key)
        assert code == 413 and "4000 bytes" in out["error"]["message"]
        # a chunked body (no Content-Length) is counted too
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/completions", iter([body[:3000], body[3000:]]),
                     {"Content-Type": "application/json", **key}, encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 413
        conn.close()
        # one sequence runs, two may wait; the rest are told to come back
        results = []

        def one():
            results.append(_raw(s, "POST", "/v1/completions", json.dumps(
                {"prompt": [1, 2, 3], "max_tokens": 40, "temperature": 0, "ignore_eos": True}).encode(), key)[0])

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert 429 in results and results.count(200) >= 3, results
        assert set(results) <= {200, 429}
    finally:
        s.stop()


def _workers_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", "runtime.distributed --worker"], capture_output=True,
                         text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.slow
def test_a_hung_rank_is_noticed_and_the_server_exits(exported):
    """SIGSTOP on rank 1 of a TP=2 server mid-stream: within the step timeout the open stream gets an
    error naming the rank and the process exits with code 3 (its supervisor restarts
    it), taking the stopped rank with it."""
    s = Served(exported("tiny", 2).root, "--step-timeout", "3")
    worker = _workers_of(s.proc.pid)
    assert len(worker) == 1
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": [1, 2, 3], "max_tokens": 3000, "temperature": 0,
                                                        "ignore_eos": True, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    for _ in range(4):
        resp.readline()
    os.kill(worker[0], signal.SIGSTOP)
    t0 = time.time()
    try:
        tail = b""
        while True:
            line = resp.readline()
            if not line:
                break
            tail = (tail + line)[-4000:]
        assert b'"error"' in tail and b"rank 1" in tail, tail[-500:]
        code = s.proc.wait(timeout=20)
        assert code == 3 and time.time() - t0 < 3 + 10
        log = s.proc.stdout.read()
        assert "no progress" in log and "rank 1" in log and "stopped by a signal" in log, log[-2000:]
        deadline = time.time() + 10
        while time.time() < deadline and os.path.exists(f"/proc/{worker[0]}") and \
                open(f"/proc/{worker[0]}/stat").read().split(") ")[1][0] != "Z":
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{worker[0]}") or \
            open(f"/proc/{worker[0]}/stat").read().split(") ")[1][0] == "Z"  # killed with the server
    finally:
        for p in [worker[0]]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        s.proc.kill()


# ---- chat.py -------------------------------------------------------------------------------------

def _read_to_prompt(stream) -> str:
    """What chat.py printed up to its next prompt ("\n> ", flushed by input() before it reads)."""
    out = b""
    while not out.endswith(b"\n> "):
        byte = stream.read(1)  # unbuffered: nothing read here is lost to communicate() later
        assert byte, out.decode(errors="replace")
        out += byte
    return out.decode()


def test_chat_unknown_command_and_ctrl_c(exported):
    export = exported("tiny", 1).root
    r = subprocess.run(chat_cmd("--model", export, "--max-tokens", 2), input="/bogus\n/help\n/quit\n", cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "unknown command '/bogus'" in r.stdout and "/reset" in r.stdout and "system prompt is kept" in r.stdout
    # SIGINT's default action, as at a terminal: a shell that starts the tests in the background
    # hands them SIGINT ignored, and Python then leaves it ignored (no KeyboardInterrupt).
    p = subprocess.Popen(chat_cmd("--model", export), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, bufsize=0,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert "MiniMax-M2 chat" in _read_to_prompt(p.stdout)
        p.send_signal(signal.SIGINT)  # at the prompt, waiting for input
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0 and "bye" in out.decode(), err.decode()[-2000:]
