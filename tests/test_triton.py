"""The Triton model repository (`make triton`) served by a real tritonserver (the one inside the
nvidia-pytriton wheel, `python -m runtime.serving.triton_server --install`) on loopback, the embedded model
on ONNX Runtime. Requests go through tritonclient's gRPC streaming and the HTTP generate endpoints.

The reference is `runtime/chat.py --json` run as its own process on the same export (the runtime is
checked against transformers in test_runtime.py): greedy float32 tokens must be identical.
"""
import json
import queue
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from runtime.text import TextCodec
from tests.cli import chat_outputs
from runtime.config import EngineConfig
from runtime.serving.triton_repo import config_text, model_config, write_repository
from runtime.serving.triton_server import LocalServer, installed

N_NEW = 12
ID_PROMPTS = [[1, 5, 9], [7], [200, 31, 4, 4, 18, 90, 33, 512, 6, 2, 77, 101, 3, 44, 19, 250, 8]]
TEXT_PROMPTS = ["Hello! What is 2 + 3?"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    """One server, three models: the export referenced in place (TP=1), copied in, and TP=2."""
    if not installed():
        pytest.fail("no tritonserver: run `python -m runtime.serving.triton_server --install` (`make triton-server` does)")
    tmp = tmp_path_factory.mktemp("triton")
    man = exported("tiny", 1)
    kw = dict(config=EngineConfig(kv_cache_gb=0.05, max_num_seqs=32))
    write_repository(man.root, tmp / "repo", "minimax_m2", **kw)
    write_repository(man.root, tmp / "repo", "minimax_m2_copy", copy=True, **kw)
    write_repository(exported("tiny", 2).root, tmp / "repo", "minimax_m2_tp2", **kw)
    server = LocalServer(tmp / "repo", log=tmp / "tritonserver.log")
    with server:
        yield server, man


def chat_cli(man, ids=(), texts=(), n=N_NEW) -> list[list[int]]:
    return chat_outputs(man.root, ids, texts, n)


def expected_text(codec, prompt_ids, output) -> tuple[str, str]:
    """(reasoning, answer) of an output, worked out here: it starts in thinking when the prompt's last
    <think> comes after its last </think>; the think tokens switch channels and are not text."""
    opens = [i for i, t in enumerate(prompt_ids) if t == codec.think_start]
    closes = [i for i, t in enumerate(prompt_ids) if t == codec.think_end]
    channel = "r" if opens and (not closes or opens[-1] > closes[-1]) else "a"
    ids = {"r": [], "a": []}
    for t in output:
        if t in (codec.think_start, codec.think_end):
            channel = "r" if t == codec.think_start else "a"
        else:
            ids[channel].append(t)
    return codec.decode(ids["r"]), codec.decode(ids["a"])


def grpc_inputs(prompt, **extra):
    import tritonclient.grpc as grpc

    values = {"input_ids": np.array(prompt, np.int64)} if isinstance(prompt, list) else \
        {"text_input": np.array([prompt.encode()], np.object_)}
    values |= {"max_tokens": np.array([N_NEW], np.int32), "temperature": np.array([0], np.float32)}
    for k, v in extra.items():
        values[k] = v
    inputs = []
    for k, v in values.items():
        dtype = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32",
                 np.dtype(np.object_): "BYTES", np.dtype(np.bool_): "BOOL"}[v.dtype]
        t = grpc.InferInput(k, list(v.shape), dtype)
        t.set_data_from_numpy(v)
        inputs.append(t)
    return inputs


class Stream:
    """One gRPC stream; many requests on it, responses collected per request id."""

    def __init__(self, url):
        import tritonclient.grpc as grpc

        self.client = grpc.InferenceServerClient(url)
        self.q = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.q.put((result, error)))

    def send(self, model, rid, inputs):
        self.client.async_stream_infer(model, inputs, request_id=rid)

    def collect(self, n_requests, timeout=120):
        """{request id: {"ids", "text", "reason", "batch", "error"}} once every request has ended."""
        got, done = {}, 0
        while done < n_requests:
            result, error = self.q.get(timeout=timeout)
            if error is not None:
                # an error answer carries no request id over gRPC; keep them in order
                got.setdefault("errors", []).append(str(error))
                done += 1
                continue
            resp = result.get_response()
            r = got.setdefault(resp.id, {"ids": [], "text": "", "reasoning": "", "reason": "", "batch": [], "calls": []})
            r["ids"] += result.as_numpy("output_ids").tolist()
            r["text"] += result.as_numpy("text_output")[0].decode()
            r["reasoning"] += result.as_numpy("reasoning_output")[0].decode()
            r["calls"] += json.loads(result.as_numpy("tool_calls_output")[0].decode())
            r["batch"].append(int(result.as_numpy("batch_size")[0]))
            reason = result.as_numpy("finish_reason")[0].decode()
            if reason:
                r["reason"] = reason
                done += 1
        return got

    def close(self):
        self.client.stop_stream()
        self.client.close()


def http(url, model, endpoint, body):
    req = urllib.request.Request(f"http://{url}/v2/models/{model}/{endpoint}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read().decode()
    except urllib.error.HTTPError as e:
        raw = e.read().decode()
    if endpoint == "generate" or not raw.startswith("data: "):  # one JSON object (an error, for a stream)
        return [json.loads(raw)]
    return [json.loads(line[len("data: "):]) for line in raw.splitlines() if line.startswith("data: ")]


def test_config_is_triton_schema_and_served_as_written(served):
    import tritonclient.grpc as grpc
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    server, man = served
    text = (server.repo / "minimax_m2" / "config.pbtxt").read_text()
    ours = text_format.Parse(text, mc.ModelConfig())
    live = grpc.InferenceServerClient(server.grpc_url).get_model_config("minimax_m2").config
    assert live.model_transaction_policy.decoupled
    assert {i.name: (i.data_type, list(i.dims)) for i in live.input} == \
        {i.name: (i.data_type, list(i.dims)) for i in ours.input}
    assert {o.name for o in live.output} == {o.name for o in ours.output}
    with pytest.raises(text_format.ParseError):  # the round-trip check is a real schema check
        text_format.Parse(text + "\nnot_a_field: 1\n", mc.ModelConfig())
    assert config_text(model_config("m", {"model": "x"}))


def test_grpc_stream_and_http_give_chat_cli_tokens(served):
    server, man = served
    want = chat_cli(man, ID_PROMPTS, TEXT_PROMPTS)
    prompts = ID_PROMPTS + TEXT_PROMPTS
    codec = TextCodec(man.root)
    s = Stream(server.grpc_url)
    try:
        for i, p in enumerate(prompts):
            s.send("minimax_m2", f"r{i}", grpc_inputs(p))
        got = s.collect(len(prompts))
    finally:
        s.close()
    assert "errors" not in got
    prompt_ids = ID_PROMPTS + [codec.encode_chat([{"role": "user", "content": t}]) for t in TEXT_PROMPTS]
    assert [codec.in_thinking(p) for p in prompt_ids] == [False] * len(ID_PROMPTS) + [True] * len(TEXT_PROMPTS)
    for i, w in enumerate(want):
        r = got[f"r{i}"]
        assert r["ids"] == w
        assert r["reason"] == ("stop" if w[-1] in man.config.eos_token_ids else "length")
        # streamed pieces add up to the whole decode, split at </think>; the random toy calls no tool
        assert (r["reasoning"], r["text"]) == expected_text(codec, prompt_ids[i], w) and r["calls"] == []
    # HTTP: generate_stream (server-sent events) and generate (one response, stream=false)
    for i, p in enumerate(prompts):
        prompt = {"input_ids": p} if isinstance(p, list) else {"text_input": p}
        body = {"max_tokens": N_NEW, "temperature": 0} | prompt
        events = http(server.http_url, "minimax_m2", "generate_stream", body)
        ids = [e["output_ids"] for e in events]  # one token per event: JSON gives it as a number
        assert ids == want[i] and events[-1]["finish_reason"] and len(events) == len(want[i])
        one = http(server.http_url, "minimax_m2", "generate", body | {"stream": False})
        assert len(one) == 1 and one[0]["output_ids"] == want[i] and one[0]["completion_tokens"] == len(want[i])
        assert (one[0]["reasoning_output"], one[0]["text_output"]) == expected_text(codec, prompt_ids[i], want[i])


def test_copied_and_tp2_models_serve_the_same_tokens(served):
    server, man = served
    want = chat_cli(man, ID_PROMPTS)
    copied = server.repo / "minimax_m2_copy"
    assert (copied / "artifacts" / "onnx" / "manifest.json").is_file()
    from export.manifest import Manifest
    Manifest.load(copied / "artifacts" / "onnx").verify(kinds=("fp32",))  # every file, sha256 checked
    for model in ["minimax_m2_copy", "minimax_m2_tp2"]:
        s = Stream(server.grpc_url)
        try:
            for i, p in enumerate(ID_PROMPTS):
                s.send(model, f"r{i}", grpc_inputs(p))
            got = s.collect(len(ID_PROMPTS))
        finally:
            s.close()
        assert [got[f"r{i}"]["ids"] for i in range(len(ID_PROMPTS))] == want, model


def test_sixteen_concurrent_streams_share_batches(served):
    server, man = served
    g = np.random.default_rng(3)
    prompts = [g.integers(0, man.config.vocab_size, size=int(g.integers(1, 40))).tolist() for _ in range(16)]
    want = chat_cli(man, prompts, n=24)
    results, streams = {}, []

    def one(i):  # each request on its own client and stream, as independent users would send them
        s = Stream(server.grpc_url)
        streams.append(s)
        s.send("minimax_m2", f"c{i}", grpc_inputs(prompts[i], max_tokens=np.array([24], np.int32)))
        results.update(s.collect(1))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for s in streams:
        s.close()
    assert [results[f"c{i}"]["ids"] for i in range(16)] == want
    # Continuous batching: tokens of different requests came out of the same steps.
    batch = max(b for r in results.values() if isinstance(r, dict) for b in r["batch"])
    print(f"largest step shared by {batch} of 16 requests")
    assert batch >= 4


def test_bad_requests_get_errors_while_good_ones_continue(served):
    server, man = served
    want = chat_cli(man, ID_PROMPTS[:2], n=40)
    vocab = man.config.vocab_size
    s = Stream(server.grpc_url)
    try:
        for i, p in enumerate(ID_PROMPTS[:2]):
            s.send("minimax_m2", f"good{i}", grpc_inputs(p, max_tokens=np.array([40], np.int32)))
        bad = {
            "missing input": grpc_inputs([1])[1:],                       # no prompt at all
            "both prompts": grpc_inputs([1]) + grpc_inputs("hi")[:1],
            "max_tokens 0": grpc_inputs([1], max_tokens=np.array([0], np.int32)),
            "too long": grpc_inputs([1] * 5000),                 # context of the toy: 4096
            "out of vocabulary": grpc_inputs([vocab + 3]),
            "top_p 0": grpc_inputs([1], top_p=np.array([0], np.float32)),
        }
        for name, inputs in bad.items():
            s.send("minimax_m2", name, inputs)
        got = s.collect(2 + len(bad))
    finally:
        s.close()
    errors = got.pop("errors")
    assert len(errors) == len(bad)
    for needle in ["exactly one of", "max_tokens must be >= 1", "longer than the context", "outside the vocabulary",
                   "top_p must be in"]:
        assert any(needle in e for e in errors), (needle, errors)
    assert [got[f"good{i}"]["ids"] for i in range(2)] == want
    # A wrong dtype is refused by Triton itself (config.pbtxt declares INT32), over HTTP too.
    from tritonclient import grpc
    wrong = grpc.InferInput("max_tokens", [1], "FP32")
    wrong.set_data_from_numpy(np.array([4.0], np.float32))
    s = Stream(server.grpc_url)
    try:
        s.send("minimax_m2", "wrong dtype", grpc_inputs([1])[:1] + [wrong])
        assert "expects 'INT32'" in s.collect(1)["errors"][0]
    finally:
        s.close()
    ev = http(server.http_url, "minimax_m2", "generate_stream", {"input_ids": [1, 2], "max_tokens": 2.5})
    assert "error" in ev[-1] and "output_ids" not in ev[-1]
    ev = http(server.http_url, "minimax_m2", "generate_stream", {"input_ids": [1, 2], "max_tokens": -2})
    assert "max_tokens must be >= 1" in ev[-1]["error"]
    # and the model still serves
    s = Stream(server.grpc_url)
    try:
        s.send("minimax_m2", "after", grpc_inputs(ID_PROMPTS[0]))
        assert s.collect(1)["after"]["ids"] == chat_cli(man, ID_PROMPTS[:1])[0]
    finally:
        s.close()


def test_stop_strings_end_the_text_and_are_not_shown(served):
    server, man = served
    codec = TextCodec(man.root)
    full = chat_cli(man, [ID_PROMPTS[2]], n=N_NEW)[0]
    text = expected_text(codec, ID_PROMPTS[2], full)[1]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip() and stop in text
    cut = text.index(stop)
    s = Stream(server.grpc_url)
    try:
        s.send("minimax_m2", "s", grpc_inputs(ID_PROMPTS[2], stop=np.array([stop.encode()], np.object_)))
        r = s.collect(1)["s"]
    finally:
        s.close()
    assert r["reason"] == "stop" and r["text"] == text[:cut]
    assert r["ids"] == full[:len(r["ids"])] and len(r["ids"]) < len(full)


def test_repository_writer_refuses_what_cannot_serve(exported, tmp_path):
    """Without engines there is no TensorRT model; without FP32 twins no ONNX Runtime one; the torch
    backend reads the checkpoint, so it cannot be copied in. Nothing is left behind by a refusal."""
    from runtime.serving.triton_repo import RepoError

    man = exported("tiny", 1)
    with pytest.raises(RepoError, match="no engines.json"):
        write_repository(man.root, tmp_path / "repo", backend="trt")
    with pytest.raises(RepoError, match="reads the checkpoint"):
        write_repository(man.root, tmp_path / "repo", backend="torch", copy=True)
    assert not any(tmp_path.iterdir())  # refused before writing anything
    # a rewrite replaces the model folder whole and keeps the other models
    write_repository(man.root, tmp_path / "repo", "a", config=EngineConfig(kv_cache_gb=0.05))
    write_repository(man.root, tmp_path / "repo", "b", config=EngineConfig(kv_cache_gb=0.05))
    write_repository(man.root, tmp_path / "repo", "a", config=EngineConfig(kv_cache_gb=0.1))
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["a", "b"]
    assert 'string_value: "0.1"' in (tmp_path / "repo" / "a" / "config.pbtxt").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no staging folder left beside it


def test_a_dead_rank_shuts_the_server_down_for_its_supervisor(exported, tmp_path):
    """Triton 2.51 keeps a Python model "ready" after its stub dies, answering errors for good; so the
    model ends the server itself: a killed rank 1 of a TP=2 model makes tritonserver exit within seconds,
    an open stream getting an error first, and no rank is left behind."""
    import os
    import signal
    import subprocess
    import time

    write_repository(exported("tiny", 2).root, tmp_path / "repo", "minimax_m2_tp2",
                     config=EngineConfig(kv_cache_gb=0.05, max_num_seqs=4))
    server = LocalServer(tmp_path / "repo", log=tmp_path / "tritonserver.log")
    with server:
        # this server's ranks only (tritonserver leads its own session; other tests' servers may run ranks too)
        out = subprocess.run(["pgrep", "-s", str(server.proc.pid), "-f", "runtime.distributed --worker"],
                             capture_output=True, text=True).stdout
        workers = [int(x) for x in out.split()]
        assert len(workers) == 1
        s = Stream(server.grpc_url)
        try:
            s.send("minimax_m2_tp2", "long", grpc_inputs([1, 2, 3], max_tokens=np.array([3000], dtype=np.int32),
                                                          ignore_eos=np.array([True])))
            time.sleep(2)
            os.kill(workers[0], signal.SIGKILL)
            t0 = time.time()
            code = server.proc.wait(timeout=60)
            took = time.time() - t0
            got = s.collect(1, timeout=5)
        finally:
            s.close()
        assert took < 15, took
        assert got.get("errors"), got  # the open request ended with an error
        log = (tmp_path / "tritonserver.log").read_text()
        assert "rank 1" in log and "shutting tritonserver down" in log, log[-3000:]
    left = subprocess.run(["pgrep", "-s", str(server.proc.pid), "-f", "runtime.distributed --worker"],
                          capture_output=True, text=True).stdout
    assert not left.strip()
def test_tools_input_is_rendered_and_checked(served):
    """The optional `tools` input reaches the chat template (the prompt counts the rendered tools, as
    TextCodec renders them here) and is checked as the OpenAI server checks it."""
    server, man = served
    codec = TextCodec(man.root)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"days": {"type": "integer"}}}}}]
    want = len(codec.encode_chat([{"role": "user", "content": TEXT_PROMPTS[0]}], tools=tools))
    s = Stream(server.grpc_url)
    try:
        s.send("minimax_m2", "t", grpc_inputs(TEXT_PROMPTS[0], max_tokens=np.array([2], np.int32),
                                              tools=np.array([json.dumps(tools).encode()], np.object_)))
        for bad in (b"[{", json.dumps([{"type": "function", "function": {"name": "bad name"}}]).encode()):
            s.send("minimax_m2", "bad", grpc_inputs(TEXT_PROMPTS[0], tools=np.array([bad], np.object_)))
        got = s.collect(3)
    finally:
        s.close()
    assert got["t"]["reason"] and not got["t"]["calls"]
    assert any("JSON list" in e for e in got["errors"]) and any("function.name" in e for e in got["errors"])
    ev = http(server.http_url, "minimax_m2", "generate", {"text_input": TEXT_PROMPTS[0], "max_tokens": 1,
                                                          "tools": json.dumps(tools)})
    assert ev[-1]["prompt_tokens"] == want
