"""The paged latent cache's writes, and absorbed MLA's latent query.

`store_latents` writes finished latents into their slots; `store_new_latents` makes them from wkv_a's output first
(the model's `MLA.latent`); `latent_query` is the query absorbed MLA reads the cache with; `store_and_query`
does the last two for a decode step. Where the backend takes Triton (`seekforge.ops.triton.latents`) and the inputs
fit, each is one launch, and for a few tokens both are one; otherwise their PyTorch composition runs.
"""

from __future__ import annotations

import torch

from seekforge.ops.dispatch import TritonOp
from seekforge.ops.gemv import fits_gemv, head_matmul
from seekforge.ops.rotary import apply_rotary


def _load():
    from seekforge.ops.triton import latents

    return latents


LATENTS = TritonOp("latents", _load)


def store_latents(cache: torch.Tensor, slot_mapping: torch.Tensor, latents: torch.Tensor) -> None:
    """Write the latents [n, c + r] (kv then k_pe) of n new tokens into their slots [n] of one layer's cache."""
    cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, latents.to(cache.dtype))


# `store_latents` as an op opaque to torch.compile, for the compiled decode step (see `paged_mla_decode_op`): written
# in place into the cache, which the graph never copies.
@torch.library.custom_op("seekforge::store_latents", mutates_args=("cache",))
def store_latents_op(cache: torch.Tensor, slot_mapping: torch.Tensor, latents: torch.Tensor) -> None:
    store_latents(cache, slot_mapping, latents)


@store_latents_op.register_fake
def _(cache, slot_mapping, latents) -> None:
    return None


def store_new_latents(attn, cache: torch.Tensor, slot_mapping: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, store=store_latents) -> None:
    """New tokens' latents into their cache slots [n] from wkv_a's output kv_a [n, c + r]: what `MLA.latent`
    makes of it (the normalised latent, the rotary key turned by cos/sin [n, r / 2]). `attn` is the layer's MLA
    (its `kv_norm` and `latent`). With Triton one launch (`store_new_latents_kernel`); otherwise the model's
    latents through `store` (`store_latents` or its op)."""
    kernel = _fused_store(attn, cache, kv_a)
    if kernel is not None:
        kernel.store_new_latents_kernel(cache, slot_mapping, kv_a, attn.kv_norm.weight, attn.kv_norm.eps, cos, sin)
        return
    kv, k_pe = attn.latent(kv_a.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0))
    store(cache, slot_mapping, torch.cat([kv[0], k_pe[0]], dim=-1))


def _fused_store(attn, cache: torch.Tensor, kv_a: torch.Tensor):
    """The Triton module where its cache store applies: wkv_a's output, the cache and kv_norm's weight of one dtype."""
    kernel = LATENTS.on(cache.device)
    return kernel if kernel is not None and kv_a.dtype == cache.dtype == attn.kv_norm.weight.dtype else None


def latent_query(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA's query over the latent cache, [n, h, c + r]: q_nope [n, h, d] through W_UK (w_uk [h, d, c]),
    then q_pe [n, h, r], rotated here by cos/sin [n, r / 2] when they are given. With Triton, for up to GEMV_ROWS
    rows of one 16-bit dtype with the rotation to do, one launch (`latent_query_kernel`)."""
    kernel = _fused_query(q_nope, q_pe, w_uk) if cos is not None else None
    if kernel is not None:
        return kernel.latent_query_kernel(q_nope, q_pe, w_uk.transpose(1, 2), cos, sin)
    if cos is not None:
        q_pe = apply_rotary(q_pe.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0))[0]
    return torch.cat([head_matmul(q_nope, w_uk.transpose(1, 2)), q_pe], dim=-1)


def store_and_query(attn, cache: torch.Tensor, slot_mapping: torch.Tensor, kv_a: torch.Tensor, q_nope: torch.Tensor,
                    q_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, store=store_latents) -> torch.Tensor:
    """A decode step's new latents into the cache (`store_new_latents`) and its latent query (`latent_query`) from
    the input projections: kv_a [n, c + r], q_nope [n, h, d], q_pe [n, h, r]. With Triton, for up to
    STORE_IN_QUERY_TOKENS tokens of one 16-bit dtype, both in one launch, one fewer in the chain of small
    kernels of a batch-1 step."""
    w_uk = attn.absorbed_weights()[0]
    kernel = _fused_query(q_nope, q_pe, w_uk) if q_nope.shape[0] <= STORE_IN_QUERY_TOKENS else None
    if kernel is not None and _fused_store(attn, cache, kv_a) is not None:
        return kernel.latent_query_kernel(q_nope, q_pe, w_uk.transpose(1, 2), cos, sin,
                                          (cache, slot_mapping, kv_a, attn.kv_norm.weight, attn.kv_norm.eps))
    store_new_latents(attn, cache, slot_mapping, kv_a, cos, sin, store)
    return latent_query(q_nope, q_pe, w_uk, cos, sin)


# Tokens up to which the store joins the query's launch: past two, two launches measured faster (bench/gemv.py,
# "latent query + store").
STORE_IN_QUERY_TOKENS = 2


def _fused_query(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor):
    """The Triton module where its latent query applies: up to GEMV_ROWS rows of one 16-bit dtype."""
    kernel = LATENTS.on(q_nope.device)
    if (kernel is not None and fits_gemv(q_nope, w_uk, q_nope.shape[0], kernel.GEMV_ROWS)
            and q_pe.dtype == q_nope.dtype):
        return kernel
    return None
