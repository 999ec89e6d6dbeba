"""Gradient clipping over parameters that may be DTensors on several meshes (FSDP2's shards, experts on their
own mesh) or plain tensors, and may be split over pipeline ranks: one global L2 norm, the same on every rank."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, group: dist.ProcessGroup | None = None,
                    device: torch.device | None = None) -> float:
    """Scale the gradients so that their global L2 norm is at most `max_norm`; returns the norm before clipping
    (non-finite where a gradient is). Each mesh's gradients are normed together (a DTensor norm reduces over its
    mesh), then the groups combine; without DTensors this is torch.nn.utils.clip_grad_norm_. `group`: the ranks
    that hold different parameters (the pipeline ranks, each its stages'; every one of them calls this, on
    `device`): their squared norms are summed."""
    groups: dict[object, list[torch.Tensor]] = {}  # parameters with a gradient, by their gradient's mesh
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if group is not None:
        square = sum(n.double().square() for n in norms) if norms else torch.zeros((), dtype=torch.float64,
                                                                                    device=device)
        dist.all_reduce(square, group=group)
        norms = [square.sqrt().float()]
    if not groups:
        return float(norms[0]) if norms else 0.0
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), 2.0)
    for params in groups.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)
