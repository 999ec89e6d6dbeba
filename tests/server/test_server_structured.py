"""Structured output through the server: response_format json_schema and json_object make a tiny random
model's answers parse as JSON and validate against the schema (checked with the jsonschema package),
whole and streamed, while unconstrained requests in the same batches are sampled as before."""

from __future__ import annotations

import json
import threading

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
from server_harness import IN_PROCESS_NAME as NAME  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", None]},
    "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
    "required": ["name", "age", "pet", "tags"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def _schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_answers_validate(served, seed):
    _, _, client = served
    kw = dict(model=NAME, messages=ASK, response_format=_schema_format(SCHEMA), temperature=1.0, seed=seed,
              max_tokens=200)
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == r.choices[0].message.content


def test_json_object_answers_parse(served):
    """Any JSON object: a random model's keys and strings run long, so some answers reach max_tokens first
    (cut off, as OpenAI's are); every answer that ends by itself is one JSON object."""
    _, _, client = served
    r = client.chat.completions.create(model=NAME, messages=ASK, response_format={"type": "json_object"},
                                       temperature=1.0, seed=0, max_tokens=300, n=4)
    ended = [c for c in r.choices if c.finish_reason == "stop"]
    assert ended and all(c.finish_reason == "length" for c in r.choices if c not in ended)
    for c in ended:
        assert isinstance(json.loads(c.message.content), dict)


def test_unconstrained_requests_beside_constrained_ones_are_unchanged(served):
    """A seeded request samples the same text alone and while constrained requests share its batches."""
    _, _, client = served
    kw = dict(model=NAME, prompt="Hello", max_tokens=40, temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    alone = client.completions.create(**kw).choices[0].text
    results = []
    threads = [threading.Thread(target=lambda s=s: results.append(client.chat.completions.create(
        model=NAME, messages=ASK, response_format=_schema_format(SCHEMA), temperature=1.0, seed=s,
        max_tokens=200))) for s in range(2)]
    for t in threads:
        t.start()
    beside = client.completions.create(**kw).choices[0].text
    for t in threads:
        t.join(60)
    assert beside == alone
    for r in results:
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


@pytest.mark.parametrize("fmt, needle", [
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"$ref": "#/definitions/missing"}}}}}, "cannot be compiled"),
    ({"type": "yaml"}, "response_format"),
])
def test_bad_response_formats(served, fmt, needle):
    _, http, _ = served
    r = http.post("/v1/chat/completions", json={"model": NAME, "messages": ASK, "response_format": fmt})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] or needle == err["param"], err
