"""Expert parallelism: every MoE layer's routed experts placed across the ranks of an `ep` mesh, tokens sent to
their experts and back with all-to-all (`apply_expert_parallel`).

Each ep rank routes its own tokens with its full copy of the gate and keeps rank r's experts
[r * E / ep, (r + 1) * E / ep) of every layer, as DTensors sharded on dim 0 over the mesh (Shard(0)): state-dict
keys stay those of the model, torch.distributed.checkpoint reshards them, and a full state dict gathers them back
to [E, out, in]. A forward (`ExpertParallel.forward`):
1. sorts the rank's (token, slot) pairs by expert, as the single-process layer does; the sorted rows are then
   grouped by the rank that owns their expert;
2. exchanges the pair counts per (rank, expert) with one small all-to-all and copies the split sizes to the host:
   the one host synchronisation (the size of what arrives is data-dependent);
3. sends the rows to the owners' ranks (all-to-all, asynchronous) and runs the shared experts while they travel;
4. sorts what arrived (grouped by source rank, then expert) by local expert and runs the local experts as one
   grouped matmul;
5. sends the results back in reverse (all-to-all), weights each row by its gate weight where it came from and
   sums every token's k rows.
Output, routing (scores, indices) and load (tokens per expert over this rank's tokens, [E]) are those of the
unsharded layer on the same tokens; the gate weight scales the expert's output instead of its SwiGLU output
(the same math up to rounding). Each all-to-all's backward is the reverse all-to-all.

Gradients. Every ep rank is a data-parallel rank: it computes a loss L_r as the mean over its own tokens, and the
objective is the mean over the D data-parallel ranks, L = (1/D) sum_r L_r. A dense weight's gradient is
(1/D) sum_r dL_r/dw once averaged over the D ranks. An expert's weight is used by the tokens of every rank of its
ep group, and the backward all-to-all brings their gradients to the rank that holds it: summed over the ep
group's ep ranks. The forward therefore divides the expert weights' gradient by ep, so that a rank holds the ep
group's mean, exactly as a dense weight does after averaging over those ep ranks. Hence the rule: reduce expert
gradients like dense ones, as a mean over the data-parallel ranks that hold the same experts (the D / ep ranks of
dp_replicate x dp_shard_mod_ep: FSDP2's default mean over the experts' own mesh), never over the ep mesh, and
with no extra divide factor. Dense gradients (the gate, the shared experts, attention) are averaged over all D
ranks, ep ranks included. This assumes the ep ranks hold different tokens (ep carved out of the data-parallel
ranks), each with a loss averaged over its own tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from seekforge.errors import ConfigError
from seekforge.model.moe import (MoE, autocast_operands, looped_linear, pair_sums, sort_pairs, sorted_rows,
                                  swiglu)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits, launched asynchronously: the caller waits on the work it is handed
    (`all_to_all`) before reading the output. The backward sends the gradient back the reverse way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, works):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        works.append(dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=True))
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> tuple[torch.Tensor, dist.Work]:
    """Rows of x [sum(in_splits), ...] sent to the group's ranks by `in_splits`; returns (the rows received,
    [sum(out_splits), ...], by source rank; the work to wait on before reading them). Differentiable."""
    works = []
    out = _AllToAll.apply(x, out_splits, in_splits, group, works)
    return out, works[0]


class _GradDivide(torch.autograd.Function):
    """Identity whose backward divides the gradient by `divisor`."""

    @staticmethod
    def forward(ctx, x, divisor):
        ctx.divisor = divisor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.divisor, None


def _empty_matmul(x, weights, offsets, expert_of_row):
    # grouped matmul kernels mishandle a total of zero rows (their weight gradient may be left unwritten); the
    # gather-and-bmm form gives the empty output and an exact zero gradient, so every rank's weights get one
    return tuple(looped_linear(x, w, expert_of_row) for w in weights)


class ExpertParallel:
    """Mixed into a model's `Experts` class (`apply_expert_parallel`): the routed experts of this rank, the rest on
    the other ranks of `ep_group`. See the module docstring."""

    ep_group: dist.ProcessGroup
    ep_size: int

    @torch.compiler.disable  # data-dependent sizes and a host synchronisation; compiled blocks run it eagerly
    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                shared: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k, ep, group = indices.shape[-1], self.ep_size, self.ep_group
        local = [_GradDivide.apply(w.to_local(), ep) for w in (self.w1, self.w2, self.w3)]
        xc, w1, w2, w3 = autocast_operands(x, *local)
        n_local = w1.shape[0]
        pairs = sort_pairs(indices, self.n_experts)
        counts_in = torch.empty_like(pairs.counts)  # [ep * n_local]: pairs from each rank for each local expert
        counting = dist.all_to_all_single(counts_in, pairs.counts, group=group, async_op=True)
        rows = sorted_rows(xc, pairs.token_of_row, pairs.row_of_pair, k)
        gate_weight = weights.flatten()[pairs.order].unsqueeze(-1)
        counting.wait()
        send, receive = torch.stack([pairs.counts.view(ep, n_local).sum(1),
                                     counts_in.view(ep, n_local).sum(1)]).tolist()  # the host synchronisation
        received, dispatch = all_to_all(rows, receive, send, group)
        y_shared = shared(x) if shared is not None else None  # runs while the rows travel
        dispatch.wait()
        # what arrived is grouped by source rank, then local expert: sort it by local expert
        expert_of_received = torch.arange(n_local, device=x.device).repeat(ep).repeat_interleave(
            counts_in.long(), output_size=received.shape[0])
        mine = sort_pairs(expert_of_received.unsqueeze(1), n_local)
        out = swiglu(self.matmul if received.shape[0] else _empty_matmul,
                     sorted_rows(received, mine.token_of_row, mine.row_of_pair, 1), w1, w2, w3, mine.offsets,
                     mine.expert_of_row)
        out = pair_sums(out, mine.token_of_row, mine.row_of_pair, 1)  # back in the order it arrived
        back, combine = all_to_all(out, send, receive, group)
        combine.wait()
        y = pair_sums((back * gate_weight).to(back.dtype), pairs.token_of_row, pairs.row_of_pair, k).to(x.dtype)
        return (y if y_shared is None else y + y_shared), pairs.counts.float()


_PARALLEL_CLASSES: dict[type, type] = {}


def _parallel_class(cls: type) -> type:
    """cls with expert parallelism mixed in: the class keeps its own matmul (the FP8 converter's, say)."""
    if cls not in _PARALLEL_CLASSES:
        _PARALLEL_CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (ExpertParallel, cls), {})
    return _PARALLEL_CLASSES[cls]


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> nn.Module:
    """Places the routed experts of every MoE in `model` (a Transformer, a pipeline stage, a bare MoE) across
    the ranks of the 1-D `ep_mesh`, in place; returns the model. Every rank must hold the same weights (or meta
    tensors) when it is called: rank r keeps its slice, as a DTensor sharded on dim 0 over `ep_mesh`. Order:
    after convert_to_fp8 (its Experts subclass keeps its matmul here); then, with FSDP2, `fully_shard` each
    `moe.experts` over the data-parallel ranks that hold the same experts (dp_shard_mod_ep, sliced from the same
    root mesh as `ep_mesh`, default mean) before the blocks that contain them; then the optimizer. Gradients as
    the module docstring says. A mesh of one rank leaves the model as it is. Raises ConfigError where the
    experts do not divide by the mesh's size."""
    if ep_mesh.ndim != 1:
        raise ConfigError(f"expert parallelism needs a 1-D ep mesh, got {ep_mesh.ndim} dimensions: pass the ep "
                          "dimension of the device mesh (mesh['ep'])")
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    if ep == 1:
        return model
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    for name, moe in moes.items():  # every layer checked before any changes
        if isinstance(moe.experts, ExpertParallel) or isinstance(moe.experts.w1, DTensor):
            raise ConfigError(f"{name + '.' if name else ''}experts are sharded already: apply expert parallelism "
                              "once, before fully_shard")
        if moe.experts.n_deep:
            raise ConfigError(f"{name + '.' if name else ''}experts: expert parallelism runs one-layer experts only; "
                              "train a model with n_deep_experts > 0 without parallel.ep (ep=1)")
        n = moe.experts.n_experts
        if n % ep:
            raise ConfigError(f"parallel.ep={ep} does not divide n_routed_experts={n}: every ep rank holds the same "
                              f"number of experts; choose ep among {[d for d in range(1, n + 1) if n % d == 0]}")
    for moe in moes.values():
        experts = moe.experts
        per_rank = experts.n_experts // ep
        for w in ("w1", "w2", "w3"):
            param = getattr(experts, w)
            mine = param.detach()[rank * per_rank:(rank + 1) * per_rank].clone()  # the full copy is freed
            setattr(experts, w, nn.Parameter(DTensor.from_local(mine, ep_mesh, [Shard(0)], run_check=False),
                                             requires_grad=param.requires_grad))
        experts.__class__ = _parallel_class(type(experts))
        experts.ep_group, experts.ep_size = ep_mesh.get_group(), ep
    return model
