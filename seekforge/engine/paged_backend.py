"""The engine's backend for the model's blocks (`seekforge.model.backend.Backend`): the blocks' own forward, run
over the paged latent cache with the engine's kernels.

Each layer first writes its new latents into the cache, then attends, so a chunk sees its own tokens and
everything computed before. Two backends, one a layer and step:

- `StepBackend`, for any packed step (prefill, mixed, a decode step not replayed from a graph): the attention
  groups of the step (`AttentionGroup`): short chunks (decode, draft verification) run the absorbed form over
  the cache blocks (`ops.paged_mla_decode`), longer ones (prefill) `MLA.attend` over their context padded to
  one batch, a fresh prefill over its own new latents. The dispatch over groups is plain Python; the work around
  it (`Stages`: the block's input norm, projections, query and latents; each group's explicit attention; the
  second half) is what `compile=True` compiles.
- `DecodeBackend`, for a step of a fixed number of queries a sequence (plain decode: one; draft verification and
  the drafter's catch-up: 1 + drafts, padded), what a captured CUDA graph runs: one group, no host work, so the
  whole block compiles into one graph.

The fused kernels they use: the input norm and MLA's two input projections in one launch
(`ops.normed_projections`); in decode, the new latents stored from wkv_a's output inside W_UK's launch
(`ops.store_and_query`); the residual add, the FFN's norm and the router's logits in one launch
(`ops.residual_norm`); the MoE through `ops.moe_forward` (Triton routing and fused experts for few rows an
expert, the residual added in their last kernel). Each falls back to the model's own modules where no kernel
applies, so every hook computes what the default backend computes.

With dynamic sparse heads (`keep_heads`, the engine's `sparse_heads`) the absorbed groups pass each query's kept
heads (`MLA.kept_heads`) to `absorbed_attention`: only those reach the decode kernel. Prefill's explicit attention
keeps every head.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from seekforge import ops
from seekforge.model.backend import Backend
from seekforge.model.block import Block
from seekforge.model.mla import MLA
from seekforge.model.mlp import MLP
from seekforge.model.moe import MoE


@dataclass
class AttentionGroup:
    start: int  # packed token range [start, end)
    end: int
    absorbed: bool
    batch: int
    query_len: int  # padded length S
    plan: ops.PagedAttentionPlan | None  # None: a fresh prefill that attends to its own latents
    index: torch.Tensor | None = None  # [b, S] packed token index (padding repeats a chunk's last token)
    valid: torch.Tensor | None = None  # [b, S] bool, None = no padding
    fresh_mask: torch.Tensor | None = None  # causal mask of a padded fresh prefill; None = plain causal


@dataclass
class Stages:
    """The functions a `StepBackend` runs around its dispatch: `attention_inputs`, `second_half`,
    `explicit_attention` (compiled ones with `compile=True`), and `pad_values` as `ops.dense_attention`
    takes it."""

    inputs: Callable
    second_half: Callable
    explicit: Callable
    pad_values: bool


class StepBackend(Backend):
    """One layer of a packed step: tokens h [1, N, dim]; the layer's cache; each token's cache slot [N]; the step's
    attention groups, in packed order."""

    def __init__(self, cache: torch.Tensor, slot_mapping: torch.Tensor, groups: list[AttentionGroup],
                 stages: Stages, topk: int | None = None, keep_heads: int | None = None):
        self.cache, self.slot_mapping, self.groups, self.stages = cache, slot_mapping, groups, stages
        self.topk, self.keep_heads = topk, keep_heads

    def attend(self, mla, norm, x, cos, sin, mask=None) -> torch.Tensor:
        q_nope, q_pe, kv, k_pe = self.stages.inputs(mla, norm, x, cos, sin)
        ops.store_latents(self.cache, self.slot_mapping, torch.cat([kv, k_pe], dim=-1))
        pieces = [self._group(mla, g, q_nope, q_pe, kv, k_pe) for g in self.groups]
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).unsqueeze(0)

    def _group(self, mla: MLA, g: AttentionGroup, q_nope, q_pe, kv, k_pe) -> torch.Tensor:
        """Group g's attention [n, h * d_v] from every token's rotated query and latents."""
        qn, qp = q_nope[g.start:g.end], q_pe[g.start:g.end]
        if g.absorbed:
            q = ops.latent_query(qn, qp, mla.absorbed_weights()[0])
            heads = None if self.keep_heads is None else mla.kept_heads(qn, self.keep_heads)
            return absorbed_attention(mla, self.cache, q, g.plan, g.query_len, heads=heads)
        if g.index is None:
            qn, qp = qn.unsqueeze(0), qp.unsqueeze(0)
        else:
            qn, qp = q_nope[g.index], q_pe[g.index]
        if g.plan is None:  # fresh prefill: the context is the chunk itself
            if g.index is None:
                ctx_kv, ctx_pe, mask = kv[g.start:g.end].unsqueeze(0), k_pe[g.start:g.end].unsqueeze(0), None
            else:
                ctx_kv, ctx_pe, mask = kv[g.index], k_pe[g.index], g.fresh_mask
        else:
            ctx = ops.gather_latents(self.cache, g.plan)
            ctx_kv, ctx_pe, mask = ctx[..., :mla.kv_lora_rank], ctx[..., mla.kv_lora_rank:], g.plan.mask
        out = self.stages.explicit(mla, qn, qp, ctx_kv, ctx_pe, mask, self.stages.pad_values)
        return out[0] if g.valid is None else out[g.valid]

    def feed_forward(self, norm, ffn, x, delta):
        return self.stages.second_half(norm, ffn, x, delta, self.topk)


class DecodeBackend(Backend):
    """One layer of a step of `query_len` queries per sequence (tokens h [1, b * query_len, dim], a sequence's
    queries adjacent; the paged kernel masks them causally by position): the layer's cache, each token's cache
    slot [b * query_len], the step's plan; `store` and `decode` the cache kernels (under torch.compile their
    opaque ops, `ops.store_latents_op` and `ops.paged_mla_decode_op`). Absorbed attention reads only the
    cache, so the new latents go from wkv_a's output straight into it, beside the latent query's W_UK product and
    rotation (`ops.store_and_query`). With sparse heads (`keep_heads`), the kept heads' latent queries alone
    reach the decode kernel."""

    def __init__(self, cache: torch.Tensor, slot_mapping: torch.Tensor, plan: ops.PagedAttentionPlan,
                 store=ops.store_latents, decode=ops.paged_mla_decode, topk: int | None = None,
                 keep_heads: int | None = None, query_len: int = 1):
        self.cache, self.slot_mapping, self.plan, self.store, self.decode = cache, slot_mapping, plan, store, decode
        self.topk, self.keep_heads, self.query_len = topk, keep_heads, query_len

    def attend(self, mla, norm, x, cos, sin, mask=None) -> torch.Tensor:
        q, kv_a = normed_projections(mla, norm, x)
        q_nope, q_pe = mla.query_heads(q)
        heads = None if self.keep_heads is None else mla.kept_heads(q_nope[0], self.keep_heads)
        q = ops.store_and_query(mla, self.cache, self.slot_mapping, kv_a[0], q_nope[0], q_pe[0], cos[0], sin[0],
                                    self.store)
        return absorbed_attention(mla, self.cache, q, self.plan, self.query_len, self.decode, heads).unsqueeze(0)

    def feed_forward(self, norm, ffn, x, delta):
        return second_half(norm, ffn, x, delta, self.topk)


def run_block(block: Block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              backend: Backend) -> tuple[torch.Tensor, tuple | None]:
    """The model's block over h with `backend`: what the engine compiles for the captured decode step."""
    return block(h, cos, sin, None, backend)


def normed_projections(mla: MLA, norm: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`MLA.project(norm(h))` over h [1, N, dim], in one launch for few rows (`ops.normed_projections`), FP8 weights
    (`seekforge.model.fp8_weights`: their block scales beside them) too; other projections apply themselves."""
    first, wkv_a = mla.input_projections
    scales = tuple(getattr(p, "weight_scale_inv", None) for p in (first, wkv_a))
    if all(s is not None for s in scales):
        return ops.normed_projections(h, norm, first.weight, wkv_a.weight, scales=scales,
                                      padded=(first.gemm_operands, wkv_a.gemm_operands))
    if not (isinstance(first, nn.Linear) and isinstance(wkv_a, nn.Linear)):
        return mla.project(norm(h))
    return ops.normed_projections(h, norm, first.weight, wkv_a.weight)


def attention_inputs(mla: MLA, norm: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """A block's work before attention over h [1, N, dim]: (q_nope, q_pe, kv, k_pe), each [N, ...], as the default
    backend computes them."""
    q, kv_a = normed_projections(mla, norm, h)
    q_nope, q_pe = mla.query(q, cos, sin)
    kv, k_pe = mla.latent(kv_a, cos, sin)
    return q_nope[0], q_pe[0], kv[0], k_pe[0]


def second_half(norm: nn.Module, ffn: MoE | MLP, h: torch.Tensor, delta: torch.Tensor,
                topk: int | None = None) -> tuple[torch.Tensor, tuple | None]:
    """`Backend.feed_forward` with the engine's kernels: the residual add and the FFN's norm in the Triton router's
    first kernel where it runs (`ops.residual_norm`), then `feed_forward` (`topk` routed experts a token; None: the
    config's)."""
    h, x, routing = ops.residual_norm(ffn, norm, h, delta, topk)
    return feed_forward(ffn, x, routing, residual=h, topk=topk)


def feed_forward(ffn: MoE | MLP, x: torch.Tensor, routing: tuple | None = None,
                 residual: torch.Tensor | None = None, topk: int | None = None) -> tuple[torch.Tensor, tuple | None]:
    """The block's FFN at inference, plus `residual` (the block's stream, x's shape) where given: an MoE runs
    through `ops.moe_forward` (Triton routing and fused experts for decode's few rows per expert, the residual
    added in their last kernel; `routing` where `ops.residual_norm` made it). Returns the output and, for an
    MoE, its choice: (experts [n, k] of each of the n tokens, tokens per expert [experts] fp32); None for an MLP."""
    if not isinstance(ffn, MoE):
        return (ffn(x) if residual is None else residual + ffn(x)), None
    flat = x.reshape(-1, x.shape[-1])
    y, indices, load = ops.moe_forward(ffn, flat, routing,
                                           None if residual is None else residual.reshape(flat.shape), topk)
    return y.view(x.shape), (indices, load)


def explicit_attention(mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, ctx_kv: torch.Tensor,
                       ctx_pe: torch.Tensor, mask: torch.Tensor | None, pad_values: bool) -> torch.Tensor:
    """`MLA.attend` for prefill over the context latents ctx_kv [b, t, c] and rotary keys ctx_pe [b, t, r], its
    attention through `ops.dense_attention` (`pad_values` as that takes it). Returns [b, s, h * d_v]."""
    return mla.attend(q_nope, q_pe, ctx_kv, ctx_pe, mask, partial(ops.dense_attention, pad_values=pad_values))


def absorbed_attention(mla: MLA, cache: torch.Tensor, q: torch.Tensor, plan: ops.PagedAttentionPlan,
                       query_len: int, decode=ops.paged_mla_decode,
                       heads: torch.Tensor | None = None) -> torch.Tensor:
    """`MLA.attend_absorbed` of b sequences' query_len queries each over the paged cache, from their latent query
    q [b * s, h, c + r] (`ops.latent_query`: W_UK folded in): `attend_latents` over the cache blocks
    (`decode`), then W_UV. `heads` [b * s, k]: dynamic sparse heads, the heads each query keeps
    (`MLA.kept_heads`); only they go through `decode` (which takes any head count), the others' latents are zero
    before W_UV. Returns [b * s, h * d_v]."""
    if heads is not None:
        q = mla.select_heads(q, heads)
    q = q.view(-1, query_len, q.shape[-2], q.shape[-1])
    latent = decode(q, cache, plan, mla.softmax_scale, mla.kv_lora_rank).flatten(0, 1)  # [b * s, h or k, c]
    if heads is not None:
        latent = mla.place_heads(latent, heads)
    return ops.head_matmul(latent, mla.absorbed_weights()[1]).flatten(1)
