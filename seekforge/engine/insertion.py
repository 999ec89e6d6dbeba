"""In-chain tools: tokens that a per-request rule inserts into a sequence's generation, inside the batch.

A SamplingParams' `inserter` is shared by the request; each sequence gets its own state from
`inserter.start()`, which the engine hands every token the sequence takes. Where `accept` returns tokens,
they are appended right after that token as if the model had written them (a calculator's exact result
after the expression it closed, say), and the sequence goes on from there: the next step computes the
inserted tokens as a chunk and samples after them. Tokens the same step had drawn after the trigger
(accepted speculative drafts) are dropped, since they were drawn without the insertion. Inserted tokens
count as output (text, max_tokens), with logprob 0.0 (they were certain), and are not fed back for nested
insertions. Other sequences of the batch are untouched: their rows, tokens and cache are their own.
"""

from __future__ import annotations

from typing import Protocol


class InserterState(Protocol):
    def accept(self, token: int) -> list[int]:
        """Take the sequence's next token; return the tokens to insert after it (empty: none)."""


class Inserter(Protocol):
    def start(self) -> InserterState:
        """A fresh state for one sequence."""
