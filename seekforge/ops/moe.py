"""An MoE block's routing and experts for the engine: `moe_forward`, and `residual_norm` before it.

The module is the model's MoE taken by its attributes (`gate`, `experts`, `shared_experts`), so this file needs
nothing of seekforge.model. Where the backend takes Triton, decode's few rows an expert run the Triton router
(`seekforge.ops.triton.route`, op "route") and the fused experts (`seekforge.ops.triton.moe`, op "moe"), which
choose from the router's logits themselves and add the shared experts and the block's residual in the same pass,
over 16-bit or FP8 expert weights (`seekforge.model.fp8_weights`: e4m3 with their block scales, which the kernels
read as they are); otherwise the gate and the model's grouped matmuls (always where some experts are deep,
`Experts.n_deep`).
"""

from __future__ import annotations

import torch

from seekforge.ops.dispatch import TritonOp
from seekforge.ops.quant import BLOCK, FP8


def _load_moe():
    from seekforge.ops.triton import moe

    return moe


def _load_route():
    from seekforge.ops.triton import route

    return route


MOE = TritonOp("moe", _load_moe)
ROUTE = TritonOp("route", _load_route)


def tokens_per_expert(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """indices [n, k] of chosen experts -> how many (token, slot) pairs each expert got, [experts] int32."""
    flat = indices.flatten().to(torch.int64)
    return torch.zeros(n_experts, device=indices.device, dtype=torch.int32).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))


def moe_forward(moe, x: torch.Tensor, routing: tuple | None = None, residual: torch.Tensor | None = None,
                topk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An MoE block (`seekforge.model.moe.MoE`) over x [n, dim]: (output [n, dim], plus `residual` [n, dim] where
    given; the chosen experts [n, k]; tokens per routed expert [experts] as fp32), as `MoE.forward` computes them
    (its routing's indices and load). With Triton, with weights stored in x's dtype (or FP8, e4m3 with 128x128 block
    scales, for a 16-bit x) and at most FUSED_MOE_ROWS rows per expert on average (decode): the Triton router's
    logits (where it makes the gate's choice; `routing`, its logits of x, when `residual_norm` computed them already)
    and the fused kernels, which choose from them, also take the shared experts in the same pass for up to
    FUSED_SHARED_TOKENS tokens (one row block each; FP8 ones where their scales are whole blocks an expert) and add
    the residual in their last kernel; otherwise the gate and the model's grouped matmuls (for FP8 experts, their
    dequantising path). `topk`: routed experts a
    token (None: the gate's); another k than the gate's routes through the gate (the Triton router chooses the
    gate's k), and the fused kernels take its choice."""
    experts, shared, gate = moe.experts, moe.shared_experts, moe.gate
    kernel = _fused_experts(moe, x, topk)
    if kernel is not None:
        router = _router(moe, x, topk) if routing is None else None
        if router is not None:
            routing = router.router_logits(gate, x)
        if routing is not None:
            weights = indices = None
            load = routing.load
        else:
            weights, indices, _ = gate(x, topk)
            load = tokens_per_expert(indices, experts.n_experts).float()
        scales = _expert_scales(experts)
        joined = shared is not None and x.shape[0] <= FUSED_SHARED_TOKENS and _shared_joins(experts, shared)
        shared_weights = shared_scales = None
        if joined:
            linears = (shared.w1, shared.w2, shared.w3)
            shared_weights = tuple(lin.weight for lin in linears)
            shared_scales = None if scales is None else tuple(lin.weight_scale_inv for lin in linears)
        added = residual is not None and residual.dtype == x.dtype
        y = kernel.fused_experts(x, experts.w1, experts.w2, experts.w3, weights, indices, shared=shared_weights,
                                 residual=residual if added else None, router=routing, scales=scales,
                                 shared_scales=shared_scales)
        if shared is not None and not joined:
            y = y + shared(x)
        if routing is not None:  # the fused kernels (or the router's select kernel) filled its choice
            indices = routing.indices
        return (y if residual is None or added else residual + y), indices, load
    y, chosen = moe(x, topk)
    return (y if residual is None else residual + y), chosen.indices, chosen.load


def _fused_experts(moe, x: torch.Tensor, topk: int | None = None):
    """The Triton module of the fused experts where they take x: weights in x's dtype (or FP8 with their block
    scales, `seekforge.model.fp8_weights`, for a 16-bit x), no autocast, decode's rows, every expert one SwiGLU layer
    (the kernels know no deep experts: `Experts.n_deep`)."""
    kernel = MOE.on(x.device)
    k = moe.gate.topk if topk is None else topk
    w1 = moe.experts.w1
    fits = x.dtype == w1.dtype or (w1.dtype == FP8 and x.dtype in (torch.bfloat16, torch.float16)
                                   and hasattr(moe.experts, "w1_scale_inv"))
    if (kernel is not None and not moe.experts.n_deep and fits
            and not torch.is_autocast_enabled("cuda") and x.shape[0] * k <= FUSED_MOE_ROWS * moe.experts.n_experts):
        return kernel
    return None


def _expert_scales(experts) -> tuple | None:
    """The routed experts' block scales (w1, w2, w3), where their weights are FP8; None otherwise. Named as in
    DeepSeek's checkpoints (`w1_scale_inv`, ...), as `seekforge.model.fp8_weights` keeps them."""
    if experts.w1.dtype != FP8:
        return None
    return experts.w1_scale_inv, experts.w2_scale_inv, experts.w3_scale_inv


def _shared_joins(experts, shared) -> bool:
    """Whether the fused kernels take the shared experts (`shared`, an MLP) in their pass: weights of the routed
    experts' dtype, and for FP8 their block scales (`weight_scale_inv`), in whole blocks per shared expert (one
    shared expert, or inter a multiple of the block)."""
    linears = (shared.w1, shared.w2, shared.w3)
    if any(lin.weight.dtype != experts.w1.dtype for lin in linears):
        return False
    inter = experts.w1.shape[1]
    return experts.w1.dtype != FP8 or (all(hasattr(lin, "weight_scale_inv") for lin in linears)
                                       and (shared.w1.weight.shape[0] == inter or inter % BLOCK == 0))


def _router(moe, x: torch.Tensor, topk: int | None = None):
    """The Triton router's module, where it makes this gate's choice (not group-limited, the gate's own k);
    `moe_forward` takes its logits with the fused experts, which choose."""
    if moe.gate.group_limited or topk not in (None, moe.gate.topk):
        return None
    return ROUTE.on(x.device)


def residual_norm(ffn, norm, h: torch.Tensor, delta: torch.Tensor,
                  topk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """A block's residual add and its FFN's input norm (`norm`, an RMSNorm): (h + delta, norm(h + delta), routing).
    Where the FFN is an MoE (it has `experts`) that `moe_forward` routes with the Triton router (at `topk` routed
    experts a token, as `moe_forward` takes it), for up to RESIDUAL_ROUTE_TOKENS tokens, that router's first kernel
    computes both (`residual_logits`), and routing is its logits of x, to pass to `moe_forward`; otherwise None."""
    flat = h.reshape(-1, h.shape[-1])
    if (hasattr(ffn, "experts") and flat.shape[0] <= RESIDUAL_ROUTE_TOKENS
            and _fused_experts(ffn, flat, topk) is not None and (router := _router(ffn, flat, topk)) is not None
            and norm.weight.dtype == h.dtype == delta.dtype):
        h, x, routing = router.residual_logits(ffn.gate, flat, delta.reshape(flat.shape), norm.weight, norm.eps)
        return h.view(delta.shape), x.view(delta.shape), routing
    h = h + delta
    return h, norm(h), None


# Each of the router's programs norms its token's row again (from L2): worth a launch saved for a few tokens only.
RESIDUAL_ROUTE_TOKENS = 4
FUSED_MOE_ROWS = 16  # above it grouped GEMMs win (bench/moe.py)
FUSED_SHARED_TOKENS = 16  # past one 16-row block a shared expert's weights would be read once a block
