"""SamplingParams: how one request is decoded, checked in full when it is made.

Names and meanings follow vLLM's so that the OpenAI server maps request fields one to one.
Processing order for a sampled token: repetition/frequency/presence penalties, temperature, top-k,
top-p, min-p (transformers' order); temperature 0 is greedy (argmax after the penalties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from seekforge.errors import ConfigError

if TYPE_CHECKING:
    from seekforge.engine.constraint import Constraint
    from seekforge.engine.insertion import Inserter


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]; 1 = off
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0  # in [0, 1]; 0 = off
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer); not part of the text
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens, kept in token_ids
    ignore_eos: bool = False
    seed: int | None = None  # the key of the request's draws (seekforge.ops.rng): the same seed, the same completions
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL-style, over prompt and generated tokens; 1 = off
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob plus the top k
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's logprob plus the top k
    skip_special_tokens: bool = True
    # which tokens each sequence may take next (structured output, forced tool calls; seekforge.engine.constraint)
    constraint: Constraint | None = None
    # tokens a rule inserts into each sequence as it generates (in-chain tools; seekforge.engine.insertion)
    inserter: Inserter | None = None
    # the fewest routed experts a token of this request may run with when the engine's adaptive expert activation
    # lowers them under load (seekforge.engine.adaptive_topk); None: no minimum; the model's k or more: never lowered
    min_experts: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"sampling: {name} must be an integer >= {low}, got {value!r}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"sampling: {name} must be a finite number, got {value!r}")
            return float(value)

        integer("n", 1)
        integer("max_tokens", 1)
        integer("top_k", 0)
        if number("temperature") < 0:
            raise ConfigError(f"sampling: temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < number("top_p") <= 1:
            raise ConfigError(f"sampling: top_p must be in (0, 1], got {self.top_p}; use 1 to turn it off")
        if not 0 <= number("min_p") <= 1:
            raise ConfigError(f"sampling: min_p must be in [0, 1], got {self.min_p}; use 0 to turn it off")
        if number("repetition_penalty") <= 0:
            raise ConfigError(f"sampling: repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise ConfigError(f"sampling: {name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ConfigError(f"sampling: seed must be an integer or None, got {self.seed!r}")
        if self.logprobs is not None:
            integer("logprobs", 0)
        if self.prompt_logprobs is not None:
            integer("prompt_logprobs", 0)
        if self.min_experts is not None:
            integer("min_experts", 1)
        if self.constraint is not None and not callable(getattr(self.constraint, "start", None)):
            raise ConfigError(f"sampling: constraint must have a start() method giving each sequence its state "
                              f"(seekforge.engine.constraint), got {type(self.constraint).__name__}")
        if self.inserter is not None and not callable(getattr(self.inserter, "start", None)):
            raise ConfigError(f"sampling: inserter must have a start() method giving each sequence its state "
                              f"(seekforge.engine.insertion), got {type(self.inserter).__name__}")
        if self.inserter is not None and self.constraint is not None:
            raise ConfigError("sampling: an inserter and a constraint cannot share a request (inserted tokens "
                              "would bypass the constraint's grammar); use one of them")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"sampling: stop must be non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ConfigError(f"sampling: stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
