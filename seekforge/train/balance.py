"""Auxiliary-loss-free load balancing (DeepSeek-V3): after each optimizer step every MoE layer's
routing bias moves by gamma * sign(mean load - expert load): overloaded experts become less
attractive, underloaded ones more. The bias only affects which experts are chosen, never the
gate weights, and no optimizer touches it."""

from __future__ import annotations

import torch

from seekforge.model.moe import MoE


@torch.no_grad()
def update_expert_bias(moe_layers: list[MoE], loads: list[torch.Tensor], gamma: float) -> None:
    """loads: tokens per expert for each layer, summed over the step's micro-batches (and ranks)."""
    if not gamma:
        return
    for moe, load in zip(moe_layers, loads, strict=True):
        load = load.float()
        moe.gate.bias.add_(gamma * torch.sign(load.mean() - load))
