"""Per-request constraints on decoding (structured output, forced tool calls): which tokens a sequence may
take next, applied as a mask on its row of the sampled batch.

A SamplingParams' `constraint` is shared by the request; each sequence gets its own state from
`constraint.start()`, which the engine advances with every token the sequence emits. The state writes the
tokens it allows into a packed bitmask (bit j of 32-bit word i allows token 32 i + j, the layout of
grammar libraries such as xgrammar), so the engine needs no grammar library itself. Only constrained rows
are masked; the other rows of the batch are left untouched. A state that `finished` (its grammar is
complete) ends its sequence with finish reason "stop".
"""

from __future__ import annotations

from typing import Protocol

import torch


class ConstraintState(Protocol):
    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into bitmask[row] (int32 [ceil(vocab / 32)], CPU; all bits set
        on entry)."""

    def accept(self, token: int) -> None:
        """Advance past `token`, one this state allowed."""

    @property
    def finished(self) -> bool:
        """The constrained text is complete: the sequence stops."""


class Constraint(Protocol):
    def start(self) -> ConstraintState:
        """A fresh state for one sequence."""


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, words] int32 -> [R, vocab_size] bool (True: allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab_size]


def mask_rows(logits: torch.Tensor, rows: list[int], states: list[ConstraintState]) -> torch.Tensor:
    """`logits` [R, vocab] with each of `rows` limited to what its state allows (the others unchanged): a new
    tensor, so that logprobs can still be read from the model's own logits."""
    vocab = logits.shape[-1]
    bitmask = torch.full((len(rows), bitmask_words(vocab)), -1, dtype=torch.int32)
    for i, state in enumerate(states):
        state.fill(bitmask, i)
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), vocab)
    index = torch.tensor(rows, device=logits.device)
    out = logits.clone()
    out[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return out
