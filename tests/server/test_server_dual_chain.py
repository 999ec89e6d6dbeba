"""`seekforge serve --dual-chain`: the decision rides in a `dual_chain` field that OpenAI's client parses past
(kept aside in `model_extra`), the rule chain's answer replaces the model's where it answered, and a server
without the dual chain writes no such field."""

from __future__ import annotations

import json

import pytest
from server_harness import ANSWER, IN_PROCESS_NAME, REASONING, build_checkpoint, in_process


@pytest.fixture(scope="module")
def dual(tmp_path_factory):
    openai = pytest.importorskip("openai")
    from seekforge.dual_chain import DualChain, RuleChain
    from seekforge.engine import EngineConfig

    path = tmp_path_factory.mktemp("server") / "tiny-dual"
    build_checkpoint(path)
    engine = EngineConfig(dtype="float32", max_model_len=1024, max_num_seqs=4, kv_cache_memory=16 << 20)
    chain = DualChain(RuleChain(timeout_s=5.0), threshold=0.5)
    with in_process(path, IN_PROCESS_NAME, engine, dual_chain=chain) as http:
        yield http, openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=http, max_retries=0)
    chain.close()


def _chat(client, question, **kwargs):
    return client.chat.completions.create(model=IN_PROCESS_NAME, messages=[{"role": "user", "content": question}],
                                          max_tokens=16, temperature=0, **kwargs)


def test_the_rule_chain_answers_where_the_model_gives_no_answer(dual):
    http, client = dual
    resp = _chat(client, "What is 12 + 30?")  # the scripted model writes no <answer>: confidence 0
    message = resp.choices[0].message
    assert message.content == "42" and message.reasoning_content == REASONING  # the model's reasoning stays
    assert resp.choices[0].logprobs is None  # the dual chain reads logprobs; the client did not ask for them
    extension = resp.model_extra["dual_chain"]
    assert extension["chain"] == "rule" and extension["answer"] == "42" and extension["confidence"] == 0.0
    assert extension["rule"]["derivation"] == "12 + 30 = 42" and extension["rule"]["solver"] == "arithmetic"
    assert resp.usage.completion_tokens > 0  # the rest of the response parsed as usual


def test_where_no_solver_applies_the_model_answers(dual):
    _, client = dual
    resp = _chat(client, "Tell me about foxes", logprobs=True)
    assert resp.choices[0].message.content == ANSWER
    assert resp.choices[0].logprobs is not None  # asked for: given
    assert resp.model_extra["dual_chain"]["chain"] == "generative"
    assert resp.model_extra["dual_chain"]["rule"] is None


def test_streams_end_with_the_decision(dual):
    _, client = dual
    chunks = list(_chat(client, "What is 12 + 30?", stream=True))
    decision = [c.model_extra["dual_chain"] for c in chunks if "dual_chain" in (c.model_extra or {})]
    assert len(decision) == 1 and decision[0]["answer"] == "42" and not chunks[-1].choices
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == ANSWER  # the content streamed as the model wrote it


def test_completions_carry_one_decision_a_prompt(dual):
    http, client = dual
    resp = client.completions.create(model=IN_PROCESS_NAME, prompt=["What is 2 + 3?", "hello"], max_tokens=4,
                                     temperature=0)
    decisions = resp.model_extra["dual_chain"]["prompts"]
    assert [d["chain"] for d in decisions] == ["rule", "generative"] and decisions[0]["answer"] == "5"


def test_no_field_without_the_dual_chain(served):
    _, http, _ = served
    body = http.post("/v1/chat/completions", json={"model": IN_PROCESS_NAME, "max_tokens": 4,
                                                   "messages": [{"role": "user", "content": "What is 12 + 30?"}]})
    assert body.status_code == 200 and "dual_chain" not in json.loads(body.text)
