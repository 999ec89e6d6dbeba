"""Auxiliary-loss-free load balancing (DeepSeek-V3): after each optimizer step every MoE layer's
routing bias moves by gamma * sign(mean load - expert load): overloaded experts become less
attractive, underloaded ones more. The bias only affects which experts are chosen, never the
gate weights, and no optimizer touches it."""

from __future__ import annotations

import torch

from seekforge.model.moe import MoE


@torch.no_grad()
def update_expert_bias(moe_layers: dict[int, MoE], loads: dict[int, torch.Tensor], gamma: float) -> None:
    """moe_layers: the model's MoE layers by layer id (`Transformer.moe_layers`); loads: tokens per expert of
    the layers that ran in the step, by the same ids, summed over its micro-batches (and ranks). A layer
    without a load (an MTP block that did not run) keeps its bias."""
    if not gamma:
        return
    unknown = sorted(set(loads) - set(moe_layers))
    if unknown:
        raise ValueError(f"expert loads for layers {unknown}, which hold no MoE (MoE layers: {sorted(moe_layers)})")
    for layer, load in loads.items():
        load = load.float()
        moe_layers[layer].gate.bias.add_(gamma * torch.sign(load.mean() - load))
