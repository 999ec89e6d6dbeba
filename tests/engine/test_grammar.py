"""JSON Schema grammars (seekforge.engine.grammar) over a byte-level tokenizer: a length-bounded string takes
exactly the texts that are valid UTF-8 JSON (Python's own UTF-8 decoder and JSON parser are the reference)."""

from __future__ import annotations

import json

import pytest

xgr = pytest.importorskip("xgrammar")
pytest.importorskip("transformers")
from server_harness import TEXTS  # noqa: E402

from seekforge.engine.grammar import Grammars  # noqa: E402
from seekforge.tokenizer import Tokenizer  # noqa: E402

NAME = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4}}, "required": ["name"],
        "additionalProperties": False}
# what goes between the quotes: UTF-8 bytes, or not
STRINGS = [b"ab", "\u1f3c\u00e9".encode(), "\U0001f600".encode(), b"\xed\xb8\xb3", b"\xed\xa0\x80", b"\xc0\x80",
           b"a\x01", b"a\\", b"\xb3"]


@pytest.fixture(scope="module")
def grammars():
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    return Grammars(tok, tok.vocab_size, [tok.eos_id])


@pytest.mark.parametrize("inner", STRINGS, ids=[s.hex() for s in STRINGS])
def test_bounded_string_takes_what_is_valid_utf8_json(grammars, inner):
    text = b'{"name": "' + inner + b'"}'
    try:
        valid = len(json.loads(text.decode("utf-8"))["name"]) <= 4
    except (UnicodeDecodeError, ValueError):
        valid = False
    matcher = xgr.GrammarMatcher(grammars.json_schema(NAME).compiled)
    assert (matcher.accept_string(text) and matcher.is_completed()) == valid
