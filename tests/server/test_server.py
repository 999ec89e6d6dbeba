"""The OpenAI-compatible server, end to end: a real `seekforge serve` process on 127.0.0.1, driven with the
official `openai` client (and raw httpx where a client would refuse to send the bad input).

The checkpoint is server_harness's tiny random model whose one scripted path gives reasoning and stop strings
known answers ("<think>\\n quick fox</think> lazy dog<EOS>" after the assistant tag). Greedy outputs and
logprobs are checked against a plain full-sequence forward of the same weights (no cache), which shares no
code with the engine's paged path.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import seekforge  # noqa: E402
from server_harness import (ANSWER, CONTEXT, KEY, NAME, REASONING, SCRIPT_TOKENS, Server,  # noqa: E402
                            build_checkpoint, collect_chat)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("server") / "tiny-chain"
    return path, build_checkpoint(path)


@pytest.fixture(scope="module")
def server(ckpt):
    # async scheduling as on a GPU (on a CPU it is off by default): the server's steps lag their tokens by one
    srv = Server(ckpt[0], "--served-model-name", NAME, "--api-key", KEY, "--dtype", "float32",
                 "--max-model-len", str(CONTEXT), "--max-num-seqs", "4", "--max-waiting", "8", "--async-scheduling", "on")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok(ckpt):
    return ckpt[1][0]


@pytest.fixture(scope="module")
def reference(ckpt):
    """Log-probabilities of every next token by one full forward of the same weights in float32 (the
    server runs with --dtype float32), no cache: nothing shared with the engine's paged path."""
    model = ckpt[1][1].float().eval()

    def logprobs(prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
        """[len(generated), vocab]: row i is the distribution generated[i] was drawn from."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the server shares this small CPU
        try:
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + generated]))[0, len(prompt_ids) - 1:-1]
        finally:
            torch.set_num_threads(threads)
        return logits.float().log_softmax(-1)

    return logprobs


def raw(server, path: str, body, key: str | None = KEY, timeout: float = 60) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(server.url + path, json=body, headers=headers, timeout=timeout)
    return httpx.post(server.url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                      timeout=timeout)


def chat(client, **kw):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], **kw)


def assert_serves(client) -> None:
    """The server still answers a chat correctly (after a bad request, a disconnect, a full queue)."""
    msg = chat(client, temperature=0).choices[0].message
    assert (msg.reasoning_content, msg.content) == (REASONING, ANSWER)



# ---------------------------------------------------------------------------------------------- basics

def test_health_models_and_startup(server, client):
    assert server.startup_statuses[0] == 503, "the port opens before the model is ready, answering 503"
    r = httpx.get(server.url + "/health")  # open without the key
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == [NAME] and models[0].max_model_len == CONTEXT


def test_chat_reasoning_split(client, tok):
    r = chat(client, temperature=0.7, seed=1)
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert msg.reasoning_content == REASONING and msg.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), SCRIPT_TOKENS)
    assert r.usage.total_tokens == len(prompt) + SCRIPT_TOKENS
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == NAME


def test_chat_reasoning_when_template_opened_think(client):
    """thinking=True makes the template end with "<think>\\n": the output has no opening tag, yet is split."""
    kw = dict(temperature=0, extra_body={"chat_template_kwargs": {"thinking": True}})
    msg = chat(client, **kw).choices[0].message
    assert (msg.reasoning_content, msg.content) == (" quick fox", ANSWER)
    streamed = collect_chat(chat(client, stream=True, **kw))[0]
    assert (streamed["reasoning"], streamed["content"], streamed["finish"]) == (" quick fox", ANSWER, "stop")


def test_chat_stream_matches_whole_response(client):
    chunks = list(chat(client, temperature=0, stream=True, stream_options={"include_usage": True}))
    first = chunks[0].choices[0].delta
    assert first.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == SCRIPT_TOKENS
    assert all(c.usage is None for c in chunks[:-1])
    got = collect_chat(iter(chunks[:-1]))[0]
    assert (got["reasoning"], got["content"], got["finish"], got["n_after"]) == (REASONING, ANSWER, "stop", 0)
    # without include_usage there is no usage chunk
    assert all(c.choices for c in chat(client, temperature=0, stream=True))


def test_completions_greedy_against_reference(client, tok, reference):
    prompt = "Hello world"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=3,
                                  extra_body={"return_tokens_as_token_ids": True})
    c = r.choices[0]
    want_ids = [int(t.split(":")[1]) for t in c.logprobs.tokens]
    ref = reference([tok.bos_id, *tok.encode(prompt)], want_ids)  # a text prompt: BOS first, as DeepSeek's
    assert ref.argmax(-1).tolist() == want_ids, "greedy: each token is the reference's most likely"
    assert c.logprobs.token_logprobs == pytest.approx(ref.max(-1).values.tolist(), abs=2e-3)
    assert all(len(top) == 3 and max(top.values()) == pytest.approx(lp, abs=1e-5)  # greedy: the chosen is the top
               for top, lp in zip(c.logprobs.top_logprobs, c.logprobs.token_logprobs))
    assert c.text == tok.decode(want_ids, skip_special_tokens=True) and c.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(prompt)) + 1, 12)
    # streamed: the same tokens and text, piece by piece
    pieces = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                            stream=True, extra_body={"return_tokens_as_token_ids": True}))
    assert "".join(p.choices[0].text for p in pieces) == c.text
    streamed_ids = [int(t.split(":")[1]) for p in pieces if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens]
    assert streamed_ids == want_ids
    assert pieces[-1].choices[0].finish_reason == "length"


def test_token_id_prompts(client, tok, reference):
    ids = [tok.bos_id, *tok.encode("What is 12 + 30?")]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, logprobs=0,
                                  extra_body={"return_tokens_as_token_ids": True})
    got = [int(t.split(":")[1]) for t in r.choices[0].logprobs.tokens]
    assert reference(ids, got).argmax(-1).tolist() == got
    assert r.choices[0].text == tok.decode(got, skip_special_tokens=True)


def test_seeds(client):
    def text(seed, stream=False):
        kw = dict(model=NAME, prompt="Hello", max_tokens=16, temperature=1.0, seed=seed)
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        return client.completions.create(**kw).choices[0].text

    a = text(7)
    assert text(7) == a and text(7, stream=True) == a
    assert text(8) != a


def test_n_and_multiple_prompts(client):
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=10, temperature=1.0, n=3, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1, "n samples drawn independently"
    assert r.usage.completion_tokens == 30
    streamed: dict[int, str] = {}
    finishes = {}
    for chunk in client.completions.create(model=NAME, prompt="Hello", max_tokens=10, temperature=1.0, n=3, seed=3,
                                           stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert streamed == {c.index: c.text for c in r.choices} and finishes == {0: "length", 1: "length", 2: "length"}

    r = client.completions.create(model=NAME, prompt=["Hello", "The quick"], max_tokens=4, n=2, temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    texts = {c.index: c.text for c in r.choices}
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: alike per prompt
    assert texts[2].startswith(" fox")  # "The quick" enters the script

    r = chat(client, n=2, temperature=1.0)
    assert [(c.index, c.message.reasoning_content, c.message.content) for c in r.choices] == \
        [(0, REASONING, ANSWER), (1, REASONING, ANSWER)]
    assert r.usage.completion_tokens == 2 * SCRIPT_TOKENS
    got = collect_chat(chat(client, n=2, temperature=1.0, stream=True))
    assert {i: (g["reasoning"], g["content"], g["finish"]) for i, g in got.items()} == \
        {0: (REASONING, ANSWER, "stop"), 1: (REASONING, ANSWER, "stop")}


def test_stop_strings(client):
    r = chat(client, stop=[" dog"], temperature=0)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (" lazy", "stop")
    got = collect_chat(chat(client, stop=" dog", temperature=0, stream=True))[0]
    assert (got["reasoning"], got["content"], got["finish"]) == (REASONING, " lazy", "stop")
    # a completion prompt that enters the script: stop inside the reasoning part, whole and streamed
    kw = dict(model=NAME, prompt="Hi<｜Assistant｜><think>", max_tokens=20, stop=["fox", "zebra"], temperature=1.0)
    r = client.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("\n quick ", "stop")
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw)) == "\n quick "


def test_chat_logprobs(client):
    r = chat(client, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == SCRIPT_TOKENS
    assert "".join(t.token for t in content[:7]) == "<think>" + REASONING + "</think>" + ANSWER
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
        assert t.logprob == pytest.approx(0.0, abs=1e-3)  # the script is near certain
        assert bytes(t.bytes) == t.token.encode()
    streamed = [t.token for c in chat(client, temperature=0, logprobs=True, stream=True)
                for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    assert streamed == [t.token for t in content]
    assert chat(client, temperature=0).choices[0].logprobs is None


# ---------------------------------------------------------------------------------------------- errors

BAD_REQUESTS = [
    # (endpoint, body, status, text the message must contain)
    ("/v1/chat/completions", b'{"model": "tiny-chain", "messages": [', 400, "not valid JSON"),
    ("/v1/chat/completions", b'[1, 2]', 400, "JSON object"),
    ("/v1/chat/completions", b'', 400, "JSON object"),
    ("/v1/chat/completions", {"model": NAME}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "function", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, "tool_call_id"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user"}]}, 400, "content"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "content"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"},
     400, "max_tokens"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2.5},
     400, "max_tokens"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
     400, "max_tokens"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "temperature": -1},
     400, "temperature"),
    ("/v1/chat/completions", b'{"model": "tiny-chain", "messages": [{"role": "user", "content": "x"}], '
                             b'"temperature": NaN}', 400, "temperature"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "top_p": 0},
     400, "top_p"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "n": 9},
     400, "max_waiting"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
     400, "stream"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                              "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                              "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "logprobs"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5,
                              "max_completion_tokens": 6}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "tools[0].function"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                              "functions": [{"name": "f"}]}, 400, "functions"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                              "chat_template_kwargs": {"thinkin": True}}, 400, "thinkin"),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [99999]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"model": NAME, "prompt": ["a", "b", "c"], "n": 3}, 400, "max_waiting"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stop": ""}, 400, "stop"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "echo": True, "stream": True}, 400, "echo"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stop_token_ids": [100000]}, 400, "stop_token_ids"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "gpt-4"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "gpt-4"),
    ("/v1/nowhere", {"model": NAME}, 404, "Not Found"),
]


@pytest.mark.parametrize("endpoint, body, status, needle", BAD_REQUESTS,
                         ids=[f"{i}-{b if isinstance(b, bytes) else json.dumps(b)[:60]}"
                              for i, (_, b, _, _) in enumerate(BAD_REQUESTS)])
def test_bad_request(server, client, endpoint, body, status, needle):
    r = raw(server, endpoint, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"] or needle == err["param"], err
    assert_serves(client)


def test_context_overflow_names_both_numbers(client, tok):
    prompt_len = len(tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}])))
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, max_tokens=CONTEXT)
    msg = info.value.body["message"] if isinstance(info.value.body, dict) else str(info.value)
    assert str(prompt_len) in msg and str(CONTEXT) in msg and str(prompt_len + CONTEXT) in msg
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="x" * 400, max_tokens=1)
    assert_serves(client)


def test_client_errors_through_openai(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        chat(client, temperature="hot")
    for key in ("wrong-key", KEY + "x", ""):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "-", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    r = raw(server, "/v1/chat/completions", b"{not json", key=None)
    assert r.status_code == 401, "the key is checked before the body"
    assert httpx.get(server.url + "/health").status_code == 200
    assert_serves(client)


def test_bad_requests_do_not_disturb_requests_in_flight(server, client):
    kw = dict(model=NAME, prompt="Hello", max_tokens=60, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    want = client.completions.create(**kw).choices[0].text
    got: list[str] = []
    thread = threading.Thread(target=lambda: got.append(
        "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))))
    thread.start()
    for endpoint, body, status, _ in BAD_REQUESTS[::3]:
        assert raw(server, endpoint, body).status_code == status
    thread.join(60)
    assert got == [want]


# ---------------------------------------------------------------------------------------------- load

def wait_for(cond, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_full_queue_503_and_disconnects_free_the_cache(server, client):
    """4 sequences run and 8 wait (--max-num-seqs 4 --max-waiting 8): the 13th request gets 503. Then every
    client hangs up; their requests are aborted and their cache blocks freed."""
    ended_before = server.metric("seekforge_request_finished_total")
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 250, "temperature": 1.0, "stream": True, "ignore_eos": True}
    http = httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                        limits=httpx.Limits(max_connections=32))
    streams = []
    try:
        for _ in range(12):
            cm = http.stream("POST", server.url + "/v1/completions", json=body)
            r = cm.__enter__()
            assert r.status_code == 200
            streams.append(cm)
        assert wait_for(lambda: server.metric("seekforge_requests_waiting") == 8)
        # engine figures are published every few hundred milliseconds, not with each admission
        assert wait_for(lambda: server.metric("seekforge_cache_usage_ratio") > 0)
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=NAME, prompt="Hello", max_tokens=5)
        assert info.value.status_code == 503 and "capacity" in str(info.value)
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503, "health cannot get its token through a full queue"
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)
        http.close()
    # a non-streamed request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        raw(server, "/v1/completions", {**body, "stream": False}, timeout=0.5)
    assert wait_for(lambda: server.metric("seekforge_request_finished_total") == ended_before + 13)
    assert server.metric("seekforge_request_finished_total", finish_reason="abort") >= 9, "hung-up requests abort"
    assert wait_for(lambda: server.metric("seekforge_requests_running") == 0
                    and server.metric("seekforge_requests_waiting") == 0
                    and server.metric("seekforge_cache_usage_ratio") == 0)
    assert_serves(client)


def test_metrics(server, client):
    chat(client, temperature=0)
    m = server.metric
    for status in ("200", "400", "401", "404", "503"):
        assert m("seekforge_requests_total", status=status) > 0, status
    assert m("seekforge_requests_total", endpoint="/v1/chat/completions", status="200") > 0
    assert m("seekforge_prompt_tokens_total") > 0 and m("seekforge_generation_tokens_total") > 0
    assert m("seekforge_time_to_first_token_seconds_count") > 0
    assert m("seekforge_inter_token_latency_seconds_count") > 0
    assert m("seekforge_cache_blocks") > 0
    assert m("seekforge_async_steps") > 0  # the server runs with --async-scheduling on
    names = {n for n, _ in server.metrics()}
    assert {"seekforge_requests_waiting", "seekforge_requests_running", "seekforge_cache_usage_ratio"} <= names
    wait_for(lambda: m("seekforge_expert_tokens_total") > 0, timeout=5)
    cfg = seekforge.ModelConfig.preset("tiny")
    layers = {dict(ls)["layer"] for n, ls in server.metrics() if n == "seekforge_expert_tokens_total"}
    assert layers == {str(i) for i in range(cfg.n_dense_layers, cfg.n_layers)}
    # every routed token goes to n_activated_experts experts
    routed = m("seekforge_expert_tokens_total", layer=str(cfg.n_dense_layers))
    assert routed > 0 and routed % cfg.n_activated_experts == 0


# ---------------------------------------------------------------------------------------------- shutdown (last)

def test_sigterm_finishes_in_flight_requests_then_exits(server, client):
    stream = client.completions.create(model=NAME, prompt="Hello", max_tokens=40, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = [next(stream)]
    server.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: _health_status(server) != 200, timeout=10), "stops admitting"
    chunks += list(stream)
    assert chunks[-1].usage.completion_tokens == 40
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert server.proc.wait(30) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")


def _health_status(server) -> int | None:
    try:
        return httpx.get(server.url + "/health", timeout=5).status_code
    except httpx.TransportError:
        return None

