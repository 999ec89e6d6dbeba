"""Checkpoints' own Jinja chat templates, rendered and encoded exactly as transformers' `apply_chat_template`
does: a template in DeepSeek-R1's style (its generation prompt opens <think>), a multi-line template that uses
the whole environment (trim/lstrip of blocks, loop controls, tojson, generation blocks, strftime_now,
raise_exception), system prompts and multi-turn history, the places a checkpoint keeps its template, and
the sandbox."""

from __future__ import annotations

import json

import pytest
from chat_templates import R1_STYLE, TOOL_CHAT, TOOLS

from seekforge.errors import ConfigError
from seekforge.reasoning import prompt_opens_reasoning
from seekforge.tokenizer import ASSISTANT, BOS, EOS, USER, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [f"The quick brown fox {i} asks: what is {i} + {2 * i}? Think, then answer." for i in range(100)]

# A multi-line ChatML-style template: indentation and newlines around blocks matter (trim_blocks,
# lstrip_blocks), and it uses loop controls, tojson, a generation block, strftime_now and raise_exception.
CHATML_STYLE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system = 'You are a helpful assistant. It is ' + strftime_now('%Y-%m') + '.' %}
    {%- set turns = messages %}
{%- endif %}
<|im_start|>system
{{ system }}
{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}meta {{ m | tojson }}
{% endfor %}
<|im_end|>
{% for message in turns %}
    {% if (message['role'] == 'user') != loop.index0 is even %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
<|im_start|>{{ message['role'] }}
    {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] | trim }}{% endgeneration %}<|im_end|>
    {% else %}
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

CHATS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "Be brief <b>&'ü\"</b>."}, {"role": "user", "content": "Hi 你好"}],
    [{"role": "system", "content": "You solve sums."}, {"role": "user", "content": "u1"},
     {"role": "assistant", "content": "<think>\nsecret steps\n</think>\n\n five "}, {"role": "user", "content": "u2"},
     {"role": "assistant", "content": "<think>more</think>seven"}, {"role": "user", "content": "u3"}],
    [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "plain"}, {"role": "user", "content": "u2"}],
]


@pytest.fixture(scope="module")
def base():
    return Tokenizer.train(TEXTS, vocab_size=300)


def save_with(base: Tokenizer, path, **config):
    """`base`'s files in `path`, tokenizer_config.json updated with `config` (None deletes a key)."""
    base.save_pretrained(path)
    config_path = path / "tokenizer_config.json"
    data = json.loads(config_path.read_text(encoding="utf-8"))
    data.update(config)
    data = {k: v for k, v in data.items() if v is not None}
    config_path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=[R1_STYLE, CHATML_STYLE], ids=["r1", "chatml"])
def pair(request, base, tmp_path_factory):
    """(seekforge's tokenizer, transformers' AutoTokenizer) of one checkpoint directory with the template."""
    path = save_with(base, tmp_path_factory.mktemp("tok"), chat_template=request.param)
    return Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("msgs", CHATS, ids=["one-turn", "system", "system-multi-turn", "multi-turn"])
@pytest.mark.parametrize("gen", [True, False], ids=["generation-prompt", "no-generation-prompt"])
def test_checkpoint_template_renders_and_encodes_as_transformers(pair, msgs, gen):
    ours, theirs = pair
    text = theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == text
    # transformers encodes a rendered chat without special tokens: BOS is the template's, once
    ids = theirs.apply_chat_template(msgs, add_generation_prompt=gen, return_dict=False)
    assert ours.encode_chat(msgs, add_generation_prompt=gen) == ids
    assert ids[0] == ours.bos_id and ids[1] != ours.bos_id


def test_r1_template_opens_reasoning_and_drops_earlier_reasoning(base, tmp_path):
    tok = Tokenizer.from_pretrained(save_with(base, tmp_path, chat_template=R1_STYLE))
    text = tok.apply_chat_template(CHATS[2])
    assert text == (BOS + "You solve sums." + USER + "u1" + ASSISTANT + "\n\n five " + EOS + USER + "u2" + ASSISTANT
                    + "seven" + EOS + USER + "u3" + ASSISTANT + "<think>\n")
    assert prompt_opens_reasoning(text)


# A template that reads `tools`, assistant `tool_calls` and tool results (content may be absent or None on a
# turn that only calls tools, so transformers and seekforge render it alike)
TOOLS_STYLE = (
    "{{ bos_token }}{% if tools %}TOOLS:{% for t in tools %} {{ t['function']['name'] }}={{ t['function']['parameters']"
    " | tojson }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] or '' }}"
    "{% if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %}<call {{ c['function']['name'] }} "
    "{{ c['function']['arguments'] }}>{% endfor %}{% endif %}"
    "{% if m['role'] == 'tool' %}<for {{ m['tool_call_id'] }}>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_checkpoint_template_receives_tools_as_transformers_passes_them(base, tmp_path):
    path = save_with(base, tmp_path, chat_template=TOOLS_STYLE)
    ours, theirs = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    text = theirs.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(TOOL_CHAT, tools=TOOLS) == text
    assert "get_weather=" in text and "<call get_weather" in text and "<for c1>" in text
    assert ours.apply_chat_template(TOOL_CHAT) == theirs.apply_chat_template(TOOL_CHAT, tokenize=False,
                                                                            add_generation_prompt=True)


def test_a_turn_that_only_calls_tools_has_content_none(base, tmp_path):
    """DeepSeek-V3's template tells a turn that calls tools by `content is none`: the field stays, as None."""
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' and m['content'] is none %}CALLS"
                "{% elif m['role'] == 'assistant' %}TEXT{% endif %}{% endfor %}")
    tok = Tokenizer.from_pretrained(save_with(base, tmp_path, chat_template=template))
    assert tok.apply_chat_template(TOOL_CHAT + [{"role": "assistant", "content": "ok"}],
                                   add_generation_prompt=False) == "CALLSTEXT"


def test_raise_exception_is_a_config_error(base, tmp_path):
    path = save_with(base, tmp_path, chat_template=CHATML_STYLE)
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="roles must alternate"):
        transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(msgs, tokenize=False)
    with pytest.raises(ConfigError, match="roles must alternate"):
        Tokenizer.from_pretrained(path).apply_chat_template(msgs)


def test_where_a_checkpoint_keeps_its_template(base, tmp_path):
    msgs = CHATS[1]
    named = [{"name": "tool_use", "template": "tools {{ messages[0]['content'] }}"},
             {"name": "default", "template": "named default {{ messages[-1]['content'] }}"}]
    path = save_with(base, tmp_path / "named", chat_template=named)
    want = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(msgs, tokenize=False)
    assert want == "named default Hi 你好" and Tokenizer.from_pretrained(path).apply_chat_template(msgs) == want
    # template files take precedence over the config's entry
    path = save_with(base, tmp_path / "files", chat_template="from the config")
    (path / "chat_template.jinja").write_text("from the file {{ messages | length }}", encoding="utf-8")
    (path / "additional_chat_templates").mkdir()
    (path / "additional_chat_templates" / "rag.jinja").write_text("rag", encoding="utf-8")
    want = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(msgs, tokenize=False)
    assert want == "from the file 2" and Tokenizer.from_pretrained(path).apply_chat_template(msgs) == want
    # none: seekforge's built-in DeepSeek template
    path = save_with(base, tmp_path / "none", chat_template=None)
    assert Tokenizer.from_pretrained(path).apply_chat_template(msgs) == \
        BOS + "Be brief <b>&'ü\"</b>." + USER + "Hi 你好" + ASSISTANT
    path = save_with(base, tmp_path / "no-default", chat_template=named[:1])
    with pytest.raises(ConfigError, match="none named 'default'"):
        Tokenizer.from_pretrained(path)


def test_a_saved_template_round_trips_and_a_stale_template_file_is_replaced(base, tmp_path):
    tok = Tokenizer.from_pretrained(save_with(base, tmp_path / "a", chat_template=R1_STYLE))
    out = tmp_path / "b"
    out.mkdir()
    (out / "chat_template.jinja").write_text("stale", encoding="utf-8")
    tok.save_pretrained(out)
    assert transformers.AutoTokenizer.from_pretrained(out).apply_chat_template(CHATS[0], tokenize=False) == \
        tok.apply_chat_template(CHATS[0], add_generation_prompt=False)


def test_broken_and_unsafe_templates(base, tmp_path):
    with pytest.raises(ConfigError, match="does not compile"):
        Tokenizer.from_pretrained(save_with(base, tmp_path / "syntax", chat_template="{% if %}"))
    for template in ("{{ ''.__class__.__mro__ }}", "{% set ns = namespace(_x=1) %}{{ ns }}",
                     "{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns }}", "{{ messages.append(1) }}"):
        tok = Tokenizer.from_pretrained(save_with(base, tmp_path / "unsafe", chat_template=template))
        with pytest.raises(ConfigError, match="chat template"):
            tok.apply_chat_template(CHATS[0])
