"""DeepSeekMoE: fine-grained routed experts plus always-on shared experts.

Routed experts run without a Python loop over experts and without a host synchronisation: the
(token, slot) pairs are sorted by expert and every expert's SwiGLU runs as one grouped matmul over
contiguous segments (torch._grouped_mm), with an exact gather-and-bmm fallback where grouped matmul
is unavailable for the device or dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from seekforge.model.config import ModelConfig
from seekforge.model.gate import Gate
from seekforge.model.mlp import MLP
from seekforge.ops.moe import tokens_per_expert


def _grouped_mm_works(x: torch.Tensor, w: torch.Tensor) -> bool:
    key = (x.device.type, x.dtype)
    if key not in _GROUPED_MM_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                a = torch.zeros(16, 16, device=x.device, dtype=x.dtype)
                b = torch.zeros(2, 16, 16, device=x.device, dtype=x.dtype)
                torch._grouped_mm(a, b.transpose(-2, -1), offs=torch.tensor([8, 16], device=x.device, dtype=torch.int32))
            except (RuntimeError, NotImplementedError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


_GROUPED_MM_OK: dict = {}


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
    """Rows of x [m, in] sorted by expert; w [experts, out, in]; offsets [experts] = cumulative row counts
    (int32). Row i is multiplied by w[expert_of_row[i]]^T. Returns [m, out]."""
    # torch.compile's shape rule for grouped matmul accepts bf16 only, though eager CPU kernels take fp32 too
    if _grouped_mm_works(x, w) and (x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    return looped_linear(x, w, expert_of_row)


def looped_linear(x: torch.Tensor, w: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
    """`grouped_linear` where torch._grouped_mm is missing or refuses the dtype: one small matmul a row, each
    with its expert's gathered weight. Returns [m, out]."""
    return torch.bmm(x.unsqueeze(1), w[expert_of_row].transpose(-2, -1)).squeeze(1)


def add_load(totals: dict[int, torch.Tensor], loads: dict[int, torch.Tensor]) -> None:
    """Adds each layer's tokens per expert (`loads`, by layer id) into `totals`. `totals` owns its tensors: the
    first load of a layer is copied, since a load may be a buffer its producer overwrites (a CUDA graph's output)."""
    for layer, load in loads.items():
        if layer in totals:
            totals[layer].add_(load.detach())
        else:
            totals[layer] = load.detach().clone()


def _to_rows(x: torch.Tensor, token_of_row: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, token_of_row)


def _to_pairs(rows: torch.Tensor, row_of_pair: torch.Tensor, k: int) -> torch.Tensor:
    return rows.index_select(0, row_of_pair).view(-1, k, rows.shape[-1]).sum(dim=1)


class _SortedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_of_row, row_of_pair, k):
        ctx.save_for_backward(row_of_pair)
        ctx.k = k
        return _to_rows(x, token_of_row)

    @staticmethod
    def backward(ctx, grad):
        return _to_pairs(grad, ctx.saved_tensors[0], ctx.k), None, None, None


class _PairSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, token_of_row, row_of_pair, k):
        ctx.save_for_backward(token_of_row)
        return _to_pairs(rows, row_of_pair, k)

    @staticmethod
    def backward(ctx, grad):
        return _to_rows(grad, ctx.saved_tensors[0]), None, None, None


def sorted_rows(x: torch.Tensor, token_of_row: torch.Tensor, row_of_pair: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens x [n, dim] -> the rows of their n * k (token, slot) pairs in sorted order, x[token_of_row], where
    row_of_pair [n * k] places pair p (= token * k + slot) at its sorted row. This gather (`_to_rows`) and
    `pair_sums`'s (`_to_pairs`) are each other's gradients, so backward gathers too, where indexing's gradient
    scatter-adds into a zeroed copy (atomics on the GPU)."""
    return _SortedRows.apply(x, token_of_row, row_of_pair, k)


def pair_sums(rows: torch.Tensor, token_of_row: torch.Tensor, row_of_pair: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted pair rows [n * k, dim] -> each token's sum over its k pairs, [n, dim]: `sorted_rows`'s adjoint."""
    return _PairSums.apply(rows, token_of_row, row_of_pair, k)


class SortedPairs(NamedTuple):
    """The (token, slot) pairs of a routing sorted by expert (stably), as `sort_pairs` returns them."""

    order: torch.Tensor  # [n * k] sorted row -> pair (= token * k + slot)
    row_of_pair: torch.Tensor  # [n * k] pair -> sorted row
    token_of_row: torch.Tensor  # [n * k]
    expert_of_row: torch.Tensor  # [n * k]
    counts: torch.Tensor  # [experts] int32: pairs per expert
    offsets: torch.Tensor  # [experts] int32: cumulative counts, grouped matmul's segment ends


def sort_pairs(indices: torch.Tensor, n_experts: int) -> SortedPairs:
    """indices [n, k] of chosen experts -> their pairs sorted by expert, without a host synchronisation."""
    k = indices.shape[-1]
    flat = indices.flatten()
    # narrow keys make the GPU's radix sort one pass instead of eight
    order = (flat.to(torch.uint8) if n_experts <= 256 else flat).argsort(stable=True)
    row_of_pair = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    counts = tokens_per_expert(indices, n_experts)
    return SortedPairs(order, row_of_pair, order // k, flat[order], counts, counts.cumsum(0, dtype=torch.int32))


def swiglu(matmul, rows: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, offsets: torch.Tensor,
           expert_of_row: torch.Tensor, gate_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Every routed expert's SwiGLU over its segment of `rows` [m, dim] (sorted by expert, segment ends
    `offsets`), through `matmul` (`Experts.matmul`'s signature: w1 and w3 in one call, as they read the same rows);
    `gate_weight` [m, 1], where given, scales each row's SwiGLU output before the (linear) down projection: the
    narrower tensor. Returns [m, dim]."""
    gate, up = matmul(rows, (w1, w3), offsets, expert_of_row)
    h = F.silu(gate) * up
    if gate_weight is not None:
        h = (h * gate_weight).to(h.dtype)
    return matmul(h, (w2,), offsets, expert_of_row)[0]


def autocast_operands(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x and the expert weights in autocast's dtype where autocast is on (it does not cover grouped matmul)."""
    if not torch.is_autocast_enabled(x.device.type):
        return (x, *weights)
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) for t in (x, *weights))


class Experts(nn.Module):
    """All routed experts' SwiGLU weights stacked: w1/w3 [experts, inter, dim], w2 [experts, dim, inter].

    Heterogeneous depth (`n_deep` experts, `is_deep`; 0, the default, is off): a deep expert splits its inter
    units into two SwiGLU layers of half the width, a (the first half of w1/w2/w3's inter units) and b (the
    second half), stacked with a residual: deep(x) = h + b(h), h = a(x). A one-layer expert is the same sum run
    side by side, a(x) + b(x), which is its SwiGLU of full width. So both kinds hold the same parameters and
    cost the same per token, and every expert runs as two grouped passes over all rows:
    a(x) + b(deep ? a(x) : x). The residual makes a deep expert start as a half-width one-layer expert (b's
    output is small at initialisation) and gives layer a a gradient path that does not pass through layer b."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, n_deep: int = 0, n_groups: int = 1):
        super().__init__()
        self.n_experts = n_experts
        self.n_deep, self.n_groups = n_deep, n_groups
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # gate_proj
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # down_proj
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # up_proj

    def is_deep(self, expert: torch.Tensor) -> torch.Tensor:
        """Whether each expert id in `expert` is deep: the last n_deep / n_groups experts of every expert group,
        so that group-limited routing reaches both kinds in every group. Arithmetic on the ids, so it needs no
        buffer and no host synchronisation."""
        per_group = self.n_experts // self.n_groups
        return expert % per_group >= per_group - self.n_deep // self.n_groups

    def matmul(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], offsets: torch.Tensor,
               expert_of_row: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The grouped matmuls (`grouped_linear`) of x by each of `weights`, projections that read it (w1 and w3, or
        w2); the FP8 converters replace it."""
        return tuple(grouped_linear(x, w, offsets, expert_of_row) for w in weights)

    def stacked(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1, w2, w3 as a forward over x of `dtype` multiplies them: the parameters themselves; FP8 weights
        (`seekforge.model.fp8_weights`) dequantise here."""
        return self.w1, self.w2, self.w3

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                shared: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, dim], weights/indices [n, k] -> (output [n, dim], tokens per expert [experts] as fp32). The
        output includes `shared(x)` where given (the always-on experts): taken here so that an expert-parallel
        version (`seekforge.parallel.expert`) can run them while the routed tokens are in flight."""
        k = indices.shape[-1]
        xc, w1, w2, w3 = autocast_operands(x, *self.stacked(x.dtype))
        pairs = sort_pairs(indices, self.n_experts)
        rows = sorted_rows(xc, pairs.token_of_row, pairs.row_of_pair, k)
        gate_weight = weights.flatten()[pairs.order].unsqueeze(-1)
        if not self.n_deep:
            out_sorted = swiglu(self.matmul, rows, w1, w2, w3, pairs.offsets, pairs.expert_of_row, gate_weight)
        else:
            out_sorted = self._mixed_depth(rows, w1, w2, w3, pairs, gate_weight)
        # each pair's row gathered back and summed over its k slots (one fused pass when compiled)
        y = pair_sums(out_sorted, pairs.token_of_row, pairs.row_of_pair, k).to(x.dtype)
        return (y if shared is None else y + shared(x)), pairs.counts.float()

    def _mixed_depth(self, rows: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                     pairs: SortedPairs, gate_weight: torch.Tensor) -> torch.Tensor:
        """The sorted rows' outputs, gate-weighted, where some experts are deep (see the class docstring)."""
        half = w1.shape[1] // 2
        a = (w1[:, :half], w2[:, :, :half], w3[:, :half])
        b = (w1[:, half:], w2[:, :, half:], w3[:, half:])
        h = swiglu(self.matmul, rows, *a, pairs.offsets, pairs.expert_of_row)
        second_in = torch.where(self.is_deep(pairs.expert_of_row).unsqueeze(-1), h, rows)
        out = h + swiglu(self.matmul, second_in, *b, pairs.offsets, pairs.expert_of_row)
        return (out * gate_weight).to(out.dtype)


@dataclass
class Routing:
    """What one MoE forward chose, for the trainer's balancing and its statistics."""

    scores: torch.Tensor  # [..., experts] fp32 affinities (the sequence-wise balance loss's P)
    indices: torch.Tensor  # [..., k] chosen experts
    load: torch.Tensor  # [experts] fp32: tokens per expert


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.n_deep_experts,
                               cfg.n_expert_groups)
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor, topk: int | None = None) -> tuple[torch.Tensor, Routing]:
        """x [..., dim] -> (output [..., dim], this forward's routing, scores and indices in x's leading shape).
        `topk`: routed experts a token for this forward (None: the config's), as `Gate.forward` takes it."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(x, topk)
        y, load = self.experts(x, weights, indices, self.shared_experts)
        return y.view(shape), Routing(scores.view(*shape[:-1], -1), indices.view(*shape[:-1], -1), load)
