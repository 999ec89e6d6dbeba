"""Rendering a checkpoint's Jinja chat template the way transformers' `apply_chat_template` renders it.

Chat templates come with downloaded checkpoints, so they are untrusted code: they run in Jinja's
immutable sandbox, with the environment transformers gives them (trim_blocks, lstrip_blocks, loop
controls, a no-op `{% generation %}` block, the `tojson` filter, `raise_exception` and `strftime_now`)
and the same variables (`messages`, `tools`, `documents`, `add_generation_prompt`, the special tokens
such as `bos_token` and `eos_token`, and any extra keyword such as DeepSeek's `thinking`). A template
that does not compile, or that refuses a conversation (`raise_exception`), is a ConfigError.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from seekforge.errors import ConfigError


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' training masks;
    rendering outputs its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller) -> str:
        return caller()


def _public(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template may not store {name!r} in a namespace: "
                                              "names starting with an underscore reach Python internals")


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, which could reach the object's internals."""

    def __init__(*args, **kwargs):  # Namespace's own signature, so that namespace(self=...) works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _public(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value) -> None:
        _public(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which would change what the model reads.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled in the sandbox (cached: a server renders the same one for every request)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"the chat template does not compile (line {err.lineno}: {err.message}): fix "
                          f"chat_template in tokenizer_config.json (or chat_template.jinja), or remove it to "
                          f"use seekforge's built-in DeepSeek template") from None


def render(source: str, messages: Sequence[Mapping], add_generation_prompt: bool,
           tools: Sequence[Mapping] | None = None, **variables) -> str:
    """`messages` rendered by the template `source`; `tools` are OpenAI tool dicts (None: no tools);
    `variables` are the special tokens and extra keywords."""
    if isinstance(messages, (str, bytes)) or not all(isinstance(m, Mapping) for m in messages):
        raise ConfigError("a conversation is a list of messages, each a dict with 'role' and 'content'")
    # As in transformers, a field that is None is absent (an OpenAI assistant turn may carry content=None),
    # except the content of a turn that calls tools: DeepSeek-V3's template tells such a turn by
    # `content is none`, and an absent field would make it fail.
    messages = [{k: v for k, v in m.items() if v is not None or (k == "content" and m.get("tool_calls"))}
                for m in messages]
    try:
        return compile_template(source).render(messages=messages, tools=list(tools) if tools else None,
                                               documents=None, add_generation_prompt=add_generation_prompt,
                                               **variables)
    except jinja2.TemplateError as err:  # raise_exception, an undefined field, a sandbox refusal
        raise ConfigError(f"the chat template refused the conversation: {err}") from None
    except TypeError as err:  # e.g. it joins a string with content that is a list or a number
        raise ConfigError(f"the chat template failed on the conversation ({err}): check the messages' "
                          f"roles and that each content is a string") from None
