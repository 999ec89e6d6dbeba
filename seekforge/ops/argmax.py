"""Greedy decoding's argmax over the vocabulary: torch.argmax, or where the backend takes Triton the kernel of
`seekforge.ops.triton.argmax`, which spreads a row over many programs (torch's runs a row on few, on the critical
path of a batch-1 step)."""

from __future__ import annotations

import torch

from seekforge.ops.dispatch import TritonOp


def _load():
    from seekforge.ops.triton import argmax

    return argmax


ARGMAX = TritonOp("argmax", _load)


def argmax(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, V] -> [R] int64: torch.argmax(x, dim=-1), the first index of each row's maximum (rows without NaN),
    written into `out` [R] where given."""
    kernel = ARGMAX.on(x.device)
    if kernel is not None and x.dim() == 2 and x.shape[1] and x.stride(-1) == 1 and x.is_floating_point():
        return kernel.argmax(x, out)
    return x.argmax(dim=-1) if out is None else torch.argmax(x, dim=-1, out=out)
