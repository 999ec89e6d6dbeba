"""Tool calls through the server, with the openai client: tools and tool results reach the chat template,
calls in DeepSeek-V3's format come back as `tool_calls` (whole, and streamed as deltas that the openai
client's stream helper assembles), and tool_choice "required" or a named function makes even a random
model call a tool, with arguments valid under the function's schema.

The app runs in-process over server_harness's tiny checkpoint (the `served` fixture). Where the model must write a given answer, a
logits constraint (the engine's per-request mask) allows only the next token of that answer's encoding.
"""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")
from server_harness import IN_PROCESS_NAME as NAME  # noqa: E402

from seekforge.server.serving import OpenAIServing  # noqa: E402

CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
        "required": ["city"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time", "description": "The time now", "parameters": TIME}}]
ASK = [{"role": "user", "content": "Weather in Paris and Rome?"}]
# DeepSeek-V3's tool-call format, written out by hand
CALLS = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```"
         "<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Rome\"}\n```"
         "<｜tool▁call▁end｜><｜tool▁calls▁end｜>")


class Script:
    """A constraint that allows exactly the tokens of one text, then EOS."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def start(self):
        return ScriptState(self.ids)


class ScriptState:
    def __init__(self, ids):
        self.ids, self.pos = ids, 0

    def fill(self, bitmask, row):
        bitmask[row] = 0
        tok = self.ids[min(self.pos, len(self.ids) - 1)]
        bitmask[row, tok // 32] = 1 << (tok % 32) if tok % 32 < 31 else -(1 << 31)

    def accept(self, token):
        self.pos += 1

    @property
    def finished(self):
        return False  # the script ends with EOS, which stops the sequence


@pytest.fixture
def answer(served, monkeypatch):
    """answer(text): the model's next chat answers are `text` (then EOS)."""
    tok = served[0]
    real = OpenAIServing.chat_constraint

    def scripted(text):
        async def constraint(self, req):
            return await real(self, req) or Script(tok.encode(text) + [tok.eos_id])
        monkeypatch.setattr(OpenAIServing, "chat_constraint", constraint)

    return scripted


def test_tool_calls_whole_and_streamed(served, answer):
    tok, _, client = served
    answer("Let me look." + CALLS)
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("function", "get_weather", {"city": "Paris"}), ("function", "get_weather", {"city": "Rome"})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    # the tools reached the template (the built-in one describes them in the system prompt)
    assert r.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(ASK, tools=TOOLS)))
    assert r.usage.prompt_tokens > len(tok.encode(tok.apply_chat_template(ASK)))

    # streamed: the openai client's helper assembles the deltas into the same message
    with client.chat.completions.stream(model=NAME, messages=ASK, tools=TOOLS, temperature=0) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    got = final.choices[0]
    assert got.finish_reason == "tool_calls" and got.message.content == "Let me look."
    assert [(c.function.name, c.function.arguments) for c in got.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in calls]
    deltas = [d for ch in chunks for c in ch.choices for d in (c.delta.tool_calls or [])]
    firsts = [d for d in deltas if d.id is not None]
    assert [(d.index, d.type, d.function.name) for d in firsts] == [(0, "function", "get_weather"),
                                                                    (1, "function", "get_weather")]
    assert all(d.function.name is None for d in deltas if d.id is None)


def test_multi_turn_round_trip_renders_calls_and_results_in_v3_format(served, answer):
    tok, _, client = served
    tools = TOOLS[:1]  # the tiny tokenizer spells the markers byte by byte: keep within the 1024-token context
    answer(CALLS)
    first = client.chat.completions.create(model=NAME, messages=ASK, tools=tools, temperature=0).choices[0].message
    assert first.content is None and len(first.tool_calls) == 2
    history = ASK + [first.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": result} for c, result in zip(first.tool_calls, ["sunny", "rain"])]
    answer("Sunny in Paris, rain in Rome.")
    r = client.chat.completions.create(model=NAME, messages=history, tools=tools, temperature=0)
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls, r.choices[0].finish_reason) == \
        ("Sunny in Paris, rain in Rome.", None, "stop")
    # the prompt the server rendered: V3's format, written out by hand (tools described in the system part)
    system = tok.apply_chat_template([], add_generation_prompt=False, tools=tools)
    want = (system + "<｜User｜>Weather in Paris and Rome?<｜Assistant｜>" + CALLS + "<｜end▁of▁sentence｜>"
            "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>\n"
            "<｜tool▁output▁begin｜>rain<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
    assert system.startswith("<｜begin▁of▁sentence｜>## Tools") and '"enum": ["Paris", "Rome", "Oslo"]' in system
    assert tok.apply_chat_template(history, tools=tools) == want
    assert r.usage.prompt_tokens == len(tok.encode(want))


def test_tool_choice_none_leaves_the_text_alone(served, answer):
    _, _, client = served
    answer(CALLS)
    msg = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice="none",
                                         temperature=0).choices[0].message
    assert msg.tool_calls is None and msg.content == CALLS


@pytest.mark.parametrize("choice, parallel, names", [
    ("required", False, {"get_weather", "get_time"}),
    ("required", True, {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, True, {"get_time"}),
], ids=["required", "required-parallel", "named"])
def test_forced_calls_from_a_random_model_are_valid(served, choice, parallel, names):
    """No script: the grammar alone makes the random model call the tools, with valid arguments."""
    _, _, client = served
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(2):
        kw = dict(model=NAME, messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel,
                  temperature=1.0, seed=seed, max_tokens=380)
        r = client.chat.completions.create(**kw)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
        assert calls and (parallel or len(calls) == 1)
        for call in calls:
            assert call.function.name in names
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        with client.chat.completions.stream(**kw) as stream:
            streamed = stream.get_final_completion().choices[0].message.tool_calls
        assert [(c.function.name, c.function.arguments) for c in streamed] == \
            [(c.function.name, c.function.arguments) for c in calls]


@pytest.mark.parametrize("body, needle", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1]}, "same function name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"messages": ASK + [{"role": "tool", "content": "x"}]}, "tool_call_id"),
])
def test_bad_tool_requests(served, body, needle):
    _, http, _ = served
    r = http.post("/v1/chat/completions", json={"model": NAME, "messages": ASK, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] or needle == err["param"], err
