"""OpenAPI fuzzing: schemathesis generates requests from the server's own schema (valid ones and, in its
negative phases, invalid ones) against a real `seekforge serve` process, with MTP speculative decoding on.
No answer may be a 5xx, invalid input must be refused with a 4xx, every answer must match the schema,
and the process must still be alive and serving correctly at the end."""

from __future__ import annotations

import zlib

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, ignored_auth, negative_data_rejection, response_schema_conformance,
    status_code_conformance,
)

from server_harness import KEY, NAME, Server, build_checkpoint  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "tiny-chain"
    build_checkpoint(path)
    srv = Server(path, "--served-model-name", NAME, "--api-key", KEY, "--max-model-len", "48",
                 "--max-num-seqs", "8", "--max-waiting", "16", "--speculative-tokens", "1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    schema.hook(map_case)  # this schema's hook, not a process-wide one
    return schema


def map_case(context, case):
    """Steer three valid bodies in four towards what the server can run, so that the fuzzer reaches
    generation (with random sampling parameters) instead of stopping at the model or context check: name
    the served model, keep max_tokens and n small. Invalid (negative) bodies are left as generated."""
    body = case.body
    if (case.meta is None or case.meta.generation.mode.is_negative or not isinstance(body, dict)
            or not zlib.crc32(repr(sorted(map(str, body))).encode()) % 4):
        return case
    body = {**body, "model": NAME}
    for name, limit in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2)):
        if type(body.get(name)) is int and body[name] > limit:
            body[name] = body[name] % limit + 1
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 4
    case.body = body
    return case


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
def test_fuzz(case, fuzz_server):
    case.call_and_validate(base_url=fuzz_server.url, headers=AUTH, timeout=60, checks=[
        not_a_server_error, negative_data_rejection, status_code_conformance, content_type_conformance,
        response_schema_conformance, ignored_auth])


def test_fuzzed_server_still_serves(fuzz_server):
    assert fuzz_server.proc.poll() is None
    assert httpx.get(fuzz_server.url + "/health", timeout=30).status_code == 200
    r = httpx.post(fuzz_server.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                   json={"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": 0})
    msg = r.json()["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == ("\n quick fox", " lazy dog")
    m = fuzz_server.metric
    assert m("seekforge_requests_total", status="500") == 0 and m("seekforge_engine_errors_total") == 0
    # the fuzzer got past validation into generation, sampling parameters and all, on both endpoints
    assert m("seekforge_requests_total", endpoint="/v1/chat/completions", status="200") >= 20
    assert m("seekforge_requests_total", endpoint="/v1/completions", status="200") >= 10
    assert m("seekforge_request_finished_total", finish_reason="error") == 0
    assert m("seekforge_spec_decode_tokens_per_step") >= 1.0  # speculative decoding ran (MTP drafts verified)
