"""The optimizer every seekforge trainer uses: AdamW, decay on matrices only."""

from __future__ import annotations

import torch
from torch import nn


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                eps: float = 1e-8) -> torch.optim.AdamW:
    """Weight decay on matrices (2-D and stacked expert weights), none on norms and other vectors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay) or None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 autocast where the device supports it (precision auto/bf16), else full fp32 (None)."""
    if precision == "fp32":
        return None
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" or (precision == "auto" and supported):
        return torch.bfloat16
    return None
