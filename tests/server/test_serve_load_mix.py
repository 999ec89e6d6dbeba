"""bench/serve_load.py --mix at a small size: 40 mixed requests from 8 concurrent clients (plain and aborted
streams, echo logprobs, tool calls, JSON schemas and objects, invalid requests, wrong API keys) against a real
`seekforge serve` process over server_harness's tiny checkpoint, every answer validated; and its validation, on
answers written by hand, names each kind of failure."""

from __future__ import annotations

import collections
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("xgrammar")
pytest.importorskip("jsonschema")
from server_harness import KEY, NAME, TEXTS, Server, build_checkpoint  # noqa: E402

from seekforge.tokenizer import Tokenizer  # noqa: E402

CONTEXT = 1024  # the tools' descriptions alone take ~600 tokens of the tiny tokenizer


def _bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("bench_serve_load", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _bench()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("mix") / "tiny-chain"
    tok, _ = build_checkpoint(path)
    srv = Server(path, "--served-model-name", NAME, "--api-key", KEY, "--dtype", "float32",
                 "--max-model-len", str(CONTEXT), "--max-num-seqs", "8")
    yield srv, tok
    srv.stop()


def test_mixed_load_passes_every_check(server):
    srv, tok = server
    summary, failures = bench.run_mix(srv.url, NAME, tok, TEXTS[:8], requests=40, clients=8, max_model_len=CONTEXT,
                                      api_key=KEY)
    assert failures == [], summary["failures"]
    plan = bench.mix_plan(40, TEXTS[:8], NAME, tok, CONTEXT, KEY)  # the same plan run_mix sent (seeded)
    kinds = collections.Counter(r.kind for r in plan)
    assert set(kinds) == set(bench.MIX_ROUND) and {k: v["requests"] for k, v in summary["kinds"].items()} == kinds
    refused = {"400": sum(kinds[k] for k in ("bad_schema", "bad_tool", "too_long")), "401": kinds["bad_key"]}
    assert summary["statuses"] == {"200": 40 - sum(refused.values()), **refused}
    assert summary["aborted_streams"] == kinds["abort"]
    assert summary["streams_completed"] == sum(n for k, n in kinds.items() if k in ("stream", "tools_auto_stream",
                                               "tools_named_stream", "schema_stream", "json_object_stream"))


# ---------------------------------------------------------------------------------------------- the checks fail

@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=300)


def _request(tok, kind: str):
    (req,) = [r for r in bench.mix_plan(len(bench.MIX_ROUND), TEXTS, NAME, tok, 64, KEY) if r.kind == kind][:1]
    return req


def _chunk(delta: dict, finish=None) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": NAME,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _chat(message: dict, finish: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": NAME,
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _call(name="get_weather", arguments='{"city": "Rome"}', id="call_1") -> dict:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _kinds(req, reply, tok) -> list[str]:
    return [kind for kind, _ in bench.check_mix(req, reply, tok)]


def test_right_answers_pass(tok):
    named = _request(tok, "tools_named")
    assert _kinds(named, bench.MixReply(200, body=_chat({"tool_calls": [_call()]}, "tool_calls")), tok) == []
    stream = [_chunk({"role": "assistant", "content": ""}),
              _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": '}}]}),
              _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}), _chunk({}, "tool_calls")]
    assert _kinds(_request(tok, "tools_named_stream"), bench.MixReply(200, events=stream, done_markers=1), tok) == []
    person = json.dumps({"name": "Al", "age": 3, "pet": None, "tags": []})
    assert _kinds(_request(tok, "schema"), bench.MixReply(200, body=_chat({"content": person}, "stop")), tok) == []
    envelope = {"error": {"message": "no", "type": "invalid_request_error", "param": "tool_choice", "code": None}}
    assert _kinds(_request(tok, "bad_tool"), bench.MixReply(400, body=envelope), tok) == []


def test_each_failure_is_named(tok):
    named, streamed = _request(tok, "tools_named"), _request(tok, "tools_named_stream")
    schema, echo = _request(tok, "schema"), _request(tok, "echo_score")
    no_id = _call()
    del no_id["id"]
    first = _chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                    "function": {"name": "get_weather", "arguments": "{}"}}]})
    renamed = _chunk({"tool_calls": [{"index": 0, "function": {"name": "get_time", "arguments": ""}}]})
    prompt_ids = tok.encode_prompt(echo.body["prompt"])
    n = len(prompt_ids) - 1  # one entry short
    short_echo = {"id": "cmpl-1", "object": "text_completion", "choices": [{
        "index": 0, "text": echo.body["prompt"], "finish_reason": "length", "logprobs": {
            "tokens": [f"token_id:{i}" for i in prompt_ids[:n]], "token_logprobs": [None] + [-1.0] * (n - 1),
            "top_logprobs": [None] + [{"x": -0.5}] * (n - 1), "text_offset": [0] * n}}],
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": 0, "total_tokens": len(prompt_ids)}}
    cases = [
        (named, bench.MixReply(500, body={"error": {}}), "5xx"),
        (named, bench.MixReply(0, error="ReadError"), "no answer"),
        (_request(tok, "bad_schema"), bench.MixReply(200, body=_chat({"content": "{}"}, "stop")), "wrong status"),
        (_request(tok, "bad_key"), bench.MixReply(401, body={"error": "no"}), "error envelope"),
        (streamed, bench.MixReply(200, events=[_chunk({"role": "assistant"})]), "dropped stream"),
        (streamed, bench.MixReply(200, events=[_chunk({"role": "assistant"})], done_markers=2), "stream end"),
        (streamed, bench.MixReply(200, events=[{"error": {"message": "x"}}], done_markers=1), "stream error event"),
        (named, bench.MixReply(200, body=_chat({"tool_calls": [no_id]}, "tool_calls")), "OpenAI schema"),
        (named, bench.MixReply(200, body=_chat({"tool_calls": [_call("get_time", '{"utc": true}')]}, "tool_calls")),
         "tool calls"),
        (named, bench.MixReply(200, body=_chat({"tool_calls": [_call(arguments='{"city": "Lima"}')]}, "tool_calls")),
         "tool calls"),
        (named, bench.MixReply(200, body=_chat({"content": "hi"}, "stop")), "tool calls"),
        (streamed, bench.MixReply(200, events=[_chunk({"role": "assistant"}), first, renamed, _chunk({}, "tool_calls")],
                                  done_markers=1), "tool calls"),
        (schema, bench.MixReply(200, body=_chat({"content": '{"name": "Al"}'}, "stop")), "json schema"),
        (schema, bench.MixReply(200, body=_chat({"content": '{"name": "Al", "age'}, "length")), "json schema"),
        (echo, bench.MixReply(200, body=short_echo), "echo logprobs"),
    ]
    for req, reply, kind in cases:
        assert kind in _kinds(req, reply, tok), (req.kind, reply, bench.check_mix(req, reply, tok))
