"""Random tokens and top-k routing for the MoE kernel tests: the routed experts' inputs, drawn the one way both the
16-bit and the FP8 kernel tests use."""

from __future__ import annotations

import torch


def random_routing(n: int, k: int, experts: int, dim: int, g: torch.Generator,
                   skew: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [n, dim], gate weights [n, k], expert indices [n, k]) on the CPU in fp32; `skew` sends most tokens to
    expert 0, so its rows fill more than one block."""
    x = torch.randn(n, dim, generator=g)
    logits = torch.randn(n, experts, generator=g)
    if skew:
        logits[:, 0] += 10
    indices = logits.topk(k, dim=-1).indices
    weights = torch.rand(n, k, generator=g)
    return x, weights, indices
