"""Grammar constraints for the engine (seekforge.engine.constraint) backed by xgrammar: JSON Schemas, any
JSON value, and xgrammar's structural tags (the tool-call format). xgrammar is an optional dependency
(`pip install 'seekforge[grammar]'`), imported on first use.

    grammars = Grammars(llm.tokenizer, llm.cfg.vocab_size, llm.eos_ids)   # one per served model
    params = SamplingParams(constraint=grammars.json_schema({"type": "object", ...}))

Compiling takes milliseconds to seconds for a large schema, so callers compile off their event loop;
compiled grammars are cached by xgrammar. Each sequence matches with its own GrammarMatcher, which fills
its row of the step's bitmask and advances with each token the sequence emits.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from seekforge.errors import ConfigError


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ConfigError("structured output and forced tool calls need xgrammar: pip install "
                          "'seekforge[grammar]' (or pip install xgrammar)") from None
    return xgrammar


class GrammarConstraint:
    """A compiled grammar; `start()` gives each sequence its matcher."""

    def __init__(self, compiled):
        self.compiled = compiled

    def start(self) -> GrammarState:
        return GrammarState(_xgrammar().GrammarMatcher(self.compiled))


class GrammarState:
    def __init__(self, matcher):
        self.matcher = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)

    @property
    def finished(self) -> bool:
        return self.matcher.is_terminated()


class Grammars:
    """Compiles grammars for one tokenizer and vocabulary (thread-safe: a lock guards the compiler's
    creation; xgrammar's compiler is safe to share)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self._compiler = None
        self._lock = threading.Lock()

    @property
    def compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()
                if self.tokenizer is None:
                    raise ConfigError("constrained decoding needs the checkpoint's tokenizer.json")
                from transformers import PreTrainedTokenizerFast

                hf = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer.hf)
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
            return self._compiler

    def json_schema(self, schema: dict[str, Any]) -> GrammarConstraint:
        """Output that is one JSON value matching `schema` (JSON Schema), written compactly."""
        try:
            compiled = self.compiler.compile_json_schema(json.dumps(_strict_strings(schema)), any_whitespace=False)
        except (RuntimeError, ValueError) as err:  # xgrammar names what it cannot handle
            raise ConfigError(f"the JSON schema cannot be compiled into a grammar ({_first_line(err)}): "
                              f"simplify the schema") from None
        return GrammarConstraint(compiled)

    def json_object(self) -> GrammarConstraint:
        """Output that is one JSON object."""
        return self.json_schema({"type": "object"})

    def structural_tag(self, tag: dict[str, Any]) -> GrammarConstraint:
        """Output in the shape an xgrammar structural tag describes ({"type": "structural_tag", "format": ...})."""
        try:
            compiled = self.compiler.compile_structural_tag(json.dumps(tag))
        except (RuntimeError, ValueError) as err:
            raise ConfigError(f"the tools' parameters cannot be compiled into a grammar ({_first_line(err)}): "
                              f"simplify their JSON schemas") from None
        return GrammarConstraint(compiled)


# xgrammar writes a string with minLength/maxLength as any characters but quote, backslash and newlines, raw
# control characters included, which JSON forbids; as a pattern of plain characters it stays valid JSON. The
# surrogates are left out too: xgrammar takes their three-byte encodings for characters, which are not UTF-8 (the
# decoded text would hold three U+FFFD for each, and break maxLength).
_PLAIN = '[^\\x00-\\x1f"\\\\\\ud800-\\udfff]'


def _strict_strings(schema):
    """`schema` with each length-bounded string (no pattern or format of its own) written as a pattern of
    characters that JSON allows unescaped, which keeps the bounds."""
    if isinstance(schema, list):
        return [_strict_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict_strings(v) for k, v in schema.items()}
    if (out.get("type") == "string" and ("minLength" in out or "maxLength" in out)
            and "pattern" not in out and "format" not in out):
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^{_PLAIN}{{{low},{high}}}$"
    return out


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
