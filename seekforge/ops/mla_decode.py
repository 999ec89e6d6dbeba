"""Absorbed MLA over the paged latent cache: the plan a step's layers share, and the decode attention.

The cache of one layer is a tensor [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]: per token the
normalised KV latent followed by the rotary key (the only things absorbed MLA reads). `paged_mla_decode` runs the
Triton kernel (`seekforge.ops.triton.mla_decode`) where the backend takes Triton, else its PyTorch reference.
Both are free of host synchronisation and, given a plan built from fixed-size tensors, of data-dependent shapes,
so a decode step that calls them can be captured as a CUDA graph.

Shapes: b sequences, s queries per sequence, h heads, c kv_lora_rank, r rope dim, T context slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from seekforge.ops.dispatch import TritonOp


def _load():
    from seekforge.ops.triton import mla_decode

    return mla_decode


MLA_DECODE = TritonOp("mla_decode", _load)


@dataclass
class PagedAttentionPlan:
    """Per-step attention metadata, built once and read by every layer (FlashMLA's get_mla_metadata).
    Queries at `query_positions` attend causally over positions [0, max_context) of their sequences'
    caches; the dense views below exist for the PyTorch reference and are built on first use only, so the
    Triton path (which reads the block table itself) never pays for them."""

    block_tables: torch.Tensor  # [b, max_blocks] int64, unused entries point at any valid block
    query_positions: torch.Tensor  # [b, s] absolute position of each query; key t is visible iff t <= it
    block_size: int
    max_context: int

    @cached_property
    def slots(self) -> torch.Tensor:
        """[b, T] flat cache slot of context position t."""
        t = torch.arange(self.max_context, device=self.block_tables.device)
        return self.block_tables.index_select(1, t // self.block_size) * self.block_size + t % self.block_size

    @cached_property
    def mask(self) -> torch.Tensor:
        """[b, s, T] bool, True = may attend."""
        t = torch.arange(self.max_context, device=self.block_tables.device)
        return t.view(1, 1, -1) <= self.query_positions.unsqueeze(-1)



def plan_paged_attention(block_tables: torch.Tensor, query_positions: torch.Tensor, block_size: int,
                         max_context: int) -> PagedAttentionPlan:
    """Causal attention of queries at `query_positions` over positions [0, max_context) of their
    sequences' caches. Each sequence's context is every position up to its own last query."""
    return PagedAttentionPlan(block_tables, query_positions, block_size, max_context)


def gather_latents(cache: torch.Tensor, plan: PagedAttentionPlan) -> torch.Tensor:
    """The context of every sequence in the plan as a dense [b, T, c + r] tensor."""
    return cache.view(-1, cache.shape[-1])[plan.slots]


def paged_mla_decode(q: torch.Tensor, cache: torch.Tensor, plan: PagedAttentionPlan, softmax_scale: float,
                     kv_lora_rank: int) -> torch.Tensor:
    """Absorbed MLA over the paged cache. q [b, s, h, c + r] is the latent query (q_nope @ W_UK) followed
    by the rotated q_pe; returns the attention-weighted latent [b, s, h, c] (W_UV is applied after)."""
    kernel = MLA_DECODE.on(q.device)
    if kernel is not None:  # q may come out of autocast narrower than the cache: the kernel wants one dtype
        return kernel.paged_mla_decode_triton(q.to(cache.dtype), cache, plan.block_tables, plan.query_positions,
                                              softmax_scale, kv_lora_rank)
    return paged_mla_decode_reference(q, cache, plan, softmax_scale, kv_lora_rank)


def paged_mla_decode_reference(q: torch.Tensor, cache: torch.Tensor, plan: PagedAttentionPlan,
                               softmax_scale: float, kv_lora_rank: int) -> torch.Tensor:
    """`paged_mla_decode` in PyTorch: the context gathered densely, then `attend_latents` over it."""
    ctx = gather_latents(cache, plan)  # [b, T, c + r]
    return attend_latents(q[..., :kv_lora_rank], q[..., kv_lora_rank:], ctx[..., :kv_lora_rank],
                          ctx[..., kv_lora_rank:], plan.mask, softmax_scale)


def attend_latents(q_latent: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                   mask: torch.Tensor | None, softmax_scale: float) -> torch.Tensor:
    """The middle of absorbed MLA: queries q_latent [b, s, h, c] (W_UK folded in) and q_pe [b, s, h, r] over the
    latents kv [b, t, c] and rotary keys k_pe [b, t, r] -> the attention-weighted latent [b, s, h, c] in kv's dtype
    (W_UV is applied after). mask as `MLA.attend` takes it. Scores in fp32, as attention kernels keep them: a
    16-bit einsum rounds each score before the softmax."""
    scores = (torch.einsum("bshc,btc->bsht", q_latent.float(), kv.float())
              + torch.einsum("bshr,btr->bsht", q_pe.float(), k_pe.float())) * softmax_scale
    if mask is None:
        s, t = scores.shape[1], scores.shape[3]
        mask = torch.ones(s, t, dtype=torch.bool, device=scores.device).tril(t - s).unsqueeze(0)
    scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = scores.softmax(dim=-1).to(kv.dtype)
    return torch.einsum("bsht,btc->bshc", probs, kv)


# `paged_mla_decode` as an op opaque to torch.compile, for the compiled decode step: it cannot trace a Triton launch,
# and a graph break there would cut each block into pieces the compiler cannot fuse across. Eager callers use the
# plain function (a custom op costs some microseconds of dispatch).
@torch.library.custom_op("seekforge::paged_mla_decode", mutates_args=())
def _paged_mla_decode_op(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                         query_positions: torch.Tensor, block_size: int, max_context: int, softmax_scale: float,
                         kv_lora_rank: int) -> torch.Tensor:
    plan = PagedAttentionPlan(block_tables, query_positions, block_size, max_context)
    return paged_mla_decode(q, cache, plan, softmax_scale, kv_lora_rank).contiguous()  # as the fake promises


@_paged_mla_decode_op.register_fake
def _(q, cache, block_tables, query_positions, block_size, max_context, softmax_scale, kv_lora_rank):
    return q.new_empty(*q.shape[:-1], kv_lora_rank, dtype=cache.dtype)


def paged_mla_decode_op(q: torch.Tensor, cache: torch.Tensor, plan: PagedAttentionPlan, softmax_scale: float,
                        kv_lora_rank: int) -> torch.Tensor:
    """`paged_mla_decode` as one opaque op (see `_paged_mla_decode_op`)."""
    return _paged_mla_decode_op(q, cache, plan.block_tables, plan.query_positions, plan.block_size,
                                plan.max_context, softmax_scale, kv_lora_rank)
