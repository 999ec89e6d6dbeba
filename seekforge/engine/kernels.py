"""The engine's kernels behind one small interface: attention over the paged latent cache, routed experts.

The cache of one layer is a tensor [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]: per token
the normalised KV latent followed by the rotary key (the only things absorbed MLA reads). The functions
below are the PyTorch reference; on CUDA, `paged_mla_decode` runs the Triton kernel of
`seekforge.kernels.mla_decode` behind the same signature, and `moe_forward` the Triton router and fused MoE
kernels of `seekforge.kernels.route` and `.moe` for decode (SEEKFORGE_TRITON=0 keeps the references). For the
few rows of small decode steps, the projections run as GEMVs (`FewRowLinears`, `head_matmul`) and what the
compiled block ran as several kernels runs as one: `normed_projections`, `latent_query`, `store_new_latents`
(the last two in one launch: `store_and_query`), `residual_norm` (each with its PyTorch composition where no
kernel applies); the sampler's greedy `argmax` too.
Everything here is free of host synchronisation and, given a plan built from fixed-size tensors, of
data-dependent shapes, so a decode step that calls them can be captured as a CUDA graph.

Shapes: b sequences, s queries per sequence, h heads, c kv_lora_rank, r rope dim, T context slots.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from seekforge.model.mla import attend_latents, dot_product_attention
from seekforge.model.moe import MoE, tokens_per_expert
from seekforge.model.rope import apply_rotary


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


def store_latents(cache: torch.Tensor, slot_mapping: torch.Tensor, latents: torch.Tensor) -> None:
    """Write the latents [n, c + r] (kv then k_pe) of n new tokens into their slots [n] of one layer's cache."""
    cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, latents.to(cache.dtype))


def store_new_latents(attn, cache: torch.Tensor, slot_mapping: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, store=store_latents) -> None:
    """New tokens' latents into their cache slots [n] from wkv_a's output kv_a [n, c + r]: what `MLA.latent` makes
    of it (the normalised latent, the rotary key turned by cos/sin [n, r / 2]). On CUDA one Triton launch
    (`seekforge.kernels.latents`); otherwise the model's latents through `store` (`store_latents` or its op)."""
    if _fused_store_takes(attn, cache, kv_a):
        _triton("latents", "store_new_latents")(cache, slot_mapping, kv_a, attn.kv_norm.weight, attn.kv_norm.eps,
                                                cos, sin)
        return
    kv, k_pe = attn.latent(kv_a.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0))
    store(cache, slot_mapping, torch.cat([kv[0], k_pe[0]], dim=-1))


def _fused_store_takes(attn, cache: torch.Tensor, kv_a: torch.Tensor) -> bool:
    """Where the Triton cache store applies: wkv_a's output, the cache and kv_norm's weight of one dtype."""
    return (triton_runs_on(cache.device) and _triton("latents", "store_new_latents") is not None
            and kv_a.dtype == cache.dtype == attn.kv_norm.weight.dtype)


def gather_latents(cache: torch.Tensor, plan: PagedAttentionPlan) -> torch.Tensor:
    """The context of every sequence in the plan as a dense [b, T, c + r] tensor."""
    return cache.view(-1, cache.shape[-1])[plan.slots]


def paged_mla_decode(q: torch.Tensor, cache: torch.Tensor, plan: PagedAttentionPlan, softmax_scale: float,
                     kv_lora_rank: int) -> torch.Tensor:
    """Absorbed MLA over the paged cache. q [b, s, h, c + r] is the latent query (q_nope @ W_UK) followed
    by the rotated q_pe; returns the attention-weighted latent [b, s, h, c] (W_UV is applied after)."""
    triton_decode = _triton("mla_decode", "paged_mla_decode_triton") if triton_runs_on(q.device) else None
    if triton_decode is not None:  # q may come out of autocast narrower than the cache: the kernel wants one dtype
        return triton_decode(q.to(cache.dtype), cache, plan.block_tables, plan.query_positions, softmax_scale,
                             kv_lora_rank)
    return paged_mla_decode_reference(q, cache, plan, softmax_scale, kv_lora_rank)


# The two cache kernels as ops opaque to torch.compile, for the compiled decode step: it cannot trace a Triton
# launch, and a graph break there (torch.compiler.disable) cut each block into pieces the compiler could not fuse
# across. Eager callers use the plain functions (a custom op costs some microseconds of dispatch).
@torch.library.custom_op("seekforge::store_latents", mutates_args=("cache",))
def store_latents_op(cache: torch.Tensor, slot_mapping: torch.Tensor, latents: torch.Tensor) -> None:
    store_latents(cache, slot_mapping, latents)


@store_latents_op.register_fake
def _(cache, slot_mapping, latents) -> None:
    return None


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
    """`paged_mla_decode` as one opaque op (see store_latents_op)."""
    return _paged_mla_decode_op(q, cache, plan.block_tables, plan.query_positions, plan.block_size,
                                plan.max_context, softmax_scale, kv_lora_rank)


def paged_mla_decode_reference(q: torch.Tensor, cache: torch.Tensor, plan: PagedAttentionPlan,
                               softmax_scale: float, kv_lora_rank: int) -> torch.Tensor:
    """`paged_mla_decode` in PyTorch: the context gathered densely, then the model's `attend_latents` over it."""
    ctx = gather_latents(cache, plan)  # [b, T, c + r]
    return attend_latents(q[..., :kv_lora_rank], q[..., kv_lora_rank:], ctx[..., :kv_lora_rank],
                          ctx[..., kv_lora_rank:], plan.mask, softmax_scale)


def _triton(module: str, name: str):
    """A Triton kernel of `seekforge.kernels`, or None where Triton is missing or turned off
    (SEEKFORGE_TRITON=0). Loaded once into a plain dict, which torch.compile reads without a graph break
    (`load_triton_kernels` fills it before anything is traced)."""
    key = (module, name)
    if key not in _TRITON:
        kernel = None
        if os.environ.get("SEEKFORGE_TRITON", "1") != "0":
            try:
                kernel = getattr(importlib.import_module(f"seekforge.kernels.{module}"), name)
            except ImportError:
                pass
        _TRITON[key] = kernel
    return _TRITON[key]


_TRITON: dict[tuple[str, str], object] = {}
# Triton kernels run on CUDA; tests set this (under Triton's interpreter) to run the engine's CUDA paths on the CPU.
TRITON_ON_CPU = False


def triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and TRITON_ON_CPU)


def load_triton_kernels() -> None:
    _triton("mla_decode", "paged_mla_decode_triton")
    _triton("moe", "fused_experts")
    _triton("route", "router_logits")
    _triton("route", "residual_logits")
    _triton("gemv", "gemv")
    _triton("gemv", "head_gemv")
    _triton("gemv", "norm_gemv")
    _triton("gemv", "latent_query")
    _triton("latents", "store_new_latents")
    _triton("gemv", "GEMV_ROWS")
    _triton("argmax", "argmax")


def argmax(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, V] -> [R] int64: torch.argmax(x, dim=-1), the first index of each row's maximum (rows without NaN),
    written into `out` [R] where given.
    On CUDA the Triton kernel of `seekforge.kernels.argmax` (torch's took 23 us for one row of the 16b model's
    vocabulary on an H200, on the critical path of a batch-1 step)."""
    fused = _triton("argmax", "argmax") if triton_runs_on(x.device) else None
    if fused is not None and x.dim() == 2 and x.shape[1] and x.stride(-1) == 1 and x.is_floating_point():
        return fused(x, out)
    return x.argmax(dim=-1) if out is None else torch.argmax(x, dim=-1, out=out)


def moe_forward(moe, x: torch.Tensor, routing: tuple | None = None,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An MoE block (`seekforge.model.moe.MoE`) over x [n, dim]: (output [n, dim], plus `residual` [n, dim] where
    given; the chosen experts [n, k]; tokens per routed expert [experts] as fp32), as `MoE.forward` computes them
    (its routing's indices and load). On CUDA, with weights
    stored in x's dtype and at most FUSED_MOE_ROWS rows per expert on average (decode): the Triton router's
    logits (`seekforge.kernels.route`, where it makes the gate's choice; `routing`, its logits of x, when
    `residual_norm` computed them already) and the fused kernels of `seekforge.kernels.moe`, which choose from them,
    also take the shared experts in the same pass for up to FUSED_SHARED_TOKENS tokens (one row block each) and add
    the residual in their last kernel; otherwise `MoE.forward` itself."""
    experts, shared, gate = moe.experts, moe.shared_experts, moe.gate
    if _fused_experts_take(moe, x):
        router = _triton_router(moe) if routing is None else None
        if router is not None:
            routing = router(gate, x)
        if routing is not None:
            weights = indices = None
            load = routing.load
        else:
            weights, indices, _ = gate(x)
            load = tokens_per_expert(indices, experts.n_experts).float()
        joined = shared is not None and x.shape[0] <= FUSED_SHARED_TOKENS and shared.w1.weight.dtype == x.dtype
        added = residual is not None and residual.dtype == x.dtype
        y = _triton("moe", "fused_experts")(x, experts.w1, experts.w2, experts.w3, weights, indices, shared=(
            shared.w1.weight, shared.w2.weight, shared.w3.weight) if joined else None,
            residual=residual if added else None, router=routing)
        if shared is not None and not joined:
            y = y + shared(x)
        if routing is not None:  # the fused kernels (or the router's select kernel) filled its choice
            indices = routing.indices
        return (y if residual is None or added else residual + y), indices, load
    y, chosen = moe(x)
    return (y if residual is None else residual + y), chosen.indices, chosen.load


def _fused_experts_take(moe, x: torch.Tensor) -> bool:
    fused = _triton("moe", "fused_experts") if triton_runs_on(x.device) else None
    return (fused is not None and x.dtype == moe.experts.w1.dtype and not torch.is_autocast_enabled("cuda")
            and x.shape[0] * moe.gate.topk <= FUSED_MOE_ROWS * moe.experts.n_experts)


def _triton_router(moe):
    """The Triton router's logits, where it makes this gate's choice (not group-limited); `moe_forward` takes them
    with the fused experts, which choose."""
    return None if moe.gate.group_limited else _triton("route", "router_logits")


def residual_norm(ffn, norm, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """A block's residual add and its FFN's input norm (`norm`, an RMSNorm): (h + delta, norm(h + delta), routing).
    Where the FFN is an MoE that `moe_forward` routes with the Triton router, for up to RESIDUAL_ROUTE_TOKENS
    tokens, that router's first kernel computes both (`seekforge.kernels.route.residual_logits`), and routing is
    its logits of x, to pass to `moe_forward`; otherwise None."""
    flat = h.reshape(-1, h.shape[-1])
    if (isinstance(ffn, MoE) and flat.shape[0] <= RESIDUAL_ROUTE_TOKENS and _fused_experts_take(ffn, flat)
            and _triton_router(ffn) is not None and norm.weight.dtype == h.dtype == delta.dtype
            and (fused := _triton("route", "residual_logits")) is not None):  # looked up where Triton runs only
        h, x, routing = fused(ffn.gate, flat, delta.reshape(flat.shape), norm.weight, norm.eps)
        return h.view(delta.shape), x.view(delta.shape), routing
    h = h + delta
    return h, norm(h), None


# Each of the router's programs norms its token's row again (from L2): worth a launch saved for a few tokens only.
RESIDUAL_ROUTE_TOKENS = 4
FUSED_MOE_ROWS = 16  # above it grouped GEMMs win (bench/moe.py: 0.74x at 24 rows an expert)
FUSED_SHARED_TOKENS = 16  # past one 16-row block a shared expert's weights would be read once a block


class FewRowLinears(TorchFunctionMode):
    """While active: F.linear without bias over at most GEMV_ROWS rows of a 16-bit tensor on `device` runs the
    Triton GEMV of `seekforge.kernels.gemv` (cuBLAS's GEMMs read a small step's weights at a fraction of the
    bandwidth); every other call as it was. The model's projections (wq, wkv_a, wo, dense MLPs) are plain
    nn.Linear and stay so: the runner enters this around the blocks of the decode steps it captures as CUDA
    graphs, and torch.compile traces the mode into the compiled block. (Under a mode dynamo inlines the
    Python-level Tensor methods, and Tensor.unflatten's call to super() breaks the graph: code on the decode
    path reshapes with view.)"""

    def __init__(self, device: torch.device):
        super().__init__()
        if device.type == "cuda" and device.index is None:  # "cuda" means the current device: x says cuda:0
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.gemv = _triton("gemv", "gemv") if triton_runs_on(device) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is F.linear and self.gemv is not None and not kwargs
                and (len(args) == 2 or (len(args) == 3 and args[2] is None))):
            x, weight = args[0], args[1]
            rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
            if (x.device == self.device and weight.dim() == 2 and _gemv_takes(x, weight, rows)
                    and not torch.is_grad_enabled()):
                return self.gemv(x, weight)
        return func(*args, **kwargs)


def _gemv_takes(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    """Where the Triton GEMV applies: x and weight of one 16-bit dtype, at most GEMV_ROWS rows of x."""
    return (x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and rows <= _triton("gemv", "GEMV_ROWS"))


def normed_projections(h: torch.Tensor, norm, wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(h) wa^T, norm(h) wb^T) for an RMSNorm `norm` (`seekforge.model.norm.RMSNorm`): a block's input norm
    and MLA's two input projections. On CUDA, for up to GEMV_ROWS rows of one 16-bit dtype, one Triton launch
    (`seekforge.kernels.gemv.norm_gemv`) where the compiled block ran three (the norm, then a GEMV per weight)."""
    fused = _triton("gemv", "norm_gemv") if triton_runs_on(h.device) else None
    rows = h.numel() // h.shape[-1] if h.shape[-1] else 0
    if (fused is not None and _gemv_takes(h, wa, rows) and wb.dtype == h.dtype == norm.weight.dtype
            and wa.stride(-1) == wb.stride(-1) == 1 and not torch.is_grad_enabled()):
        return fused(h, norm.weight, norm.eps, wa, wb)
    x = norm(h)
    return F.linear(x, wa), F.linear(x, wb)


def head_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per head: x [n, h, K], weight [h, N, K] (any strides) -> [n, h, N], torch.einsum("nhk,hjk->nhj") (MLA's
    absorbed products). On CUDA, for up to GEMV_ROWS rows of one 16-bit dtype, the Triton GEMV (cuBLAS's
    batched GEMM took 3.2 and 3.6 us for the two 2 MB products of a 16b batch-1 step on the H200)."""
    head_gemv = _triton("gemv", "head_gemv") if triton_runs_on(x.device) else None
    if head_gemv is not None and _gemv_takes(x, weight, x.shape[0]):
        return head_gemv(x, weight)
    return torch.einsum("nhk,hjk->nhj", x, weight)


def latent_query(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA's query over the latent cache, [n, h, c + r]: q_nope [n, h, d] through W_UK (w_uk [h, d, c]),
    then q_pe [n, h, r], rotated here by cos/sin [n, r / 2] when they are given. On CUDA, for up to GEMV_ROWS rows
    of one 16-bit dtype with the rotation to do, one Triton launch (`seekforge.kernels.gemv.latent_query`)."""
    if cos is not None and _fused_query_takes(q_nope, q_pe, w_uk):
        return _triton("gemv", "latent_query")(q_nope, q_pe, w_uk.transpose(1, 2), cos, sin)
    if cos is not None:
        q_pe = apply_rotary(q_pe.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0))[0]
    return torch.cat([head_matmul(q_nope, w_uk.transpose(1, 2)), q_pe], dim=-1)


def store_and_query(attn, cache: torch.Tensor, slot_mapping: torch.Tensor, kv_a: torch.Tensor, q_nope: torch.Tensor,
                    q_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, store=store_latents) -> torch.Tensor:
    """A decode step's new latents into the cache (`store_new_latents`) and its latent query (`latent_query`) from
    the input projections: kv_a [n, c + r], q_nope [n, h, d], q_pe [n, h, r]. On CUDA, for up to
    STORE_IN_QUERY_TOKENS tokens of one 16-bit dtype, both in one Triton launch, one fewer in the chain of small
    kernels of a batch-1 step."""
    w_uk = attn.absorbed_weights()[0]
    if (q_nope.shape[0] <= STORE_IN_QUERY_TOKENS and _fused_query_takes(q_nope, q_pe, w_uk)
            and _fused_store_takes(attn, cache, kv_a)):
        return _triton("gemv", "latent_query")(q_nope, q_pe, w_uk.transpose(1, 2), cos, sin,
                                               (cache, slot_mapping, kv_a, attn.kv_norm.weight, attn.kv_norm.eps))
    store_new_latents(attn, cache, slot_mapping, kv_a, cos, sin, store)
    return latent_query(q_nope, q_pe, w_uk, cos, sin)


# One launch against two on an H200 (bench/gemv.py, "latent query + store"): 3.6 vs 5.5 us at one token, 4.2 vs
# 7.1 at two, 8.1 vs 7.2 at four.
STORE_IN_QUERY_TOKENS = 2


def _fused_query_takes(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor) -> bool:
    """Where the Triton latent query applies: up to GEMV_ROWS rows of one 16-bit dtype."""
    return (triton_runs_on(q_nope.device) and _triton("gemv", "latent_query") is not None
            and _gemv_takes(q_nope, w_uk, q_nope.shape[0]) and q_pe.dtype == q_nope.dtype)


def values_padded_for_sdpa(device: torch.device) -> bool:
    """Whether `dense_attention` should zero-pad MLA's values (v_head_dim < qk_head_dim) to the key width: the
    fused kernel scaled_dot_product_attention picks on the CPU and on GPUs before Hopper is flash attention,
    which wants equal widths (unfused, 5x slower on the CPU at 1k tokens); from Hopper on it picks cuDNN's,
    which takes narrower values: 185 us vs 256 us padded at 1 x 4096 tokens, 16 heads on an H200, and the pad
    and the slice of the output cost two copies more."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    softmax_scale: float, pad_values: bool) -> torch.Tensor:
    """Explicit attention for prefill: q [b, s, h, d], k [b, t, h, d], v [b, t, h, d_v]; mask bool [b, s, t]
    (True = may attend) or None for causal over s == t. Returns [b, s, h, d_v]. `pad_values`: zero-pad v
    to d and cut the padding from the output (`values_padded_for_sdpa` says where that pays)."""
    dv = v.shape[-1]
    if pad_values and q.shape[-1] > dv:
        v = F.pad(v, (0, q.shape[-1] - dv))
    return dot_product_attention(q, k, v, mask, softmax_scale)[..., :dv]
