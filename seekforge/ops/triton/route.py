"""The MoE router of decode's few tokens, in Triton: logits, top-k, gate weights and the load in two kernels.

`seekforge.model.gate.Gate` at one token is seven small kernels (the weight cast to fp32, a split GEMV,
softmax, top-k, the gather, two for the tokens-per-expert count), each too small to use the GPU, most of their
time spent launching. Here:

- _logits: x W^T in fp32, BLOCK_E experts a program, so the GEMV is spread over the SMs (`_residual_logits`:
  of RMSNorm(h + d), with the block's residual add and the FFN's norm in the same programs);
- _select: one program a token: scores (softmax or sigmoid), each expert's rank in the order of scores + bias,
  the gate weights of the top k from the unbiased scores (normalised, scaled) and the token's count into the load.

For one or two tokens the fused experts (`seekforge.ops.triton.moe`) take the logits instead (`RouterLogits`) and
choose in the programs of their first kernel (`choose`): one launch fewer in the chain of a decode step.

The same choice as `Gate` (ties aside: its fp32 sums run in another order) for greedy routing over one expert
group; DeepSeek-V3's group-limited routing stays with `Gate` (`Gate.group_limited`). No host synchronisation: the
grids depend on the token and expert counts only, so a captured decode step can hold it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from seekforge.ops.triton.gemv import weight_slice
from seekforge.ops.triton.pdl import launch_options, wait_for_inputs


@triton.jit
def _logits(x_ptr, w_ptr, logits_ptr, load_ptr, E, K, stride_xm,
            BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    m = tl.program_id(0)
    experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_E, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + cols, mask=cols < K, other=0.0)
        acc += weight_slice(w_ptr, experts, k0, E, K, K, 1, BLOCK_K).to(tl.float32) * x[None, :].to(tl.float32)
    tl.store(logits_ptr + m * E + experts, tl.sum(acc, axis=1), mask=experts < E)
    if m == 0:  # the load starts at zero here, so _select (next on the stream) only adds
        tl.store(load_ptr + experts, tl.zeros((BLOCK_E,), tl.float32), mask=experts < E)


@triton.jit
def _residual_logits(h_ptr, d_ptr, g_ptr, w_ptr, logits_ptr, load_ptr, h_out_ptr, x_out_ptr, E, K, eps,
                     BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """`_logits` of x = RMSNorm(h + d) (weight g), rounding as the model's residual add and RMSNorm do; the
    programs of the first experts also write h + d and x, which the experts and the residual read next. The
    first slices of the row and of the weights are requested together, before the norm's statistics: with the
    row in one slice the program waits on memory once, and reads the row once."""
    m = tl.program_id(0)
    experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    w_first = weight_slice(w_ptr, experts, 0, E, K, K, 1, BLOCK_K)
    wait_for_inputs(PDL)
    s_first = _residual_sum(h_ptr, d_ptr, m, 0, K, BLOCK_K)
    squares = s_first.to(tl.float32) * s_first.to(tl.float32)
    for k0 in range(BLOCK_K, K, BLOCK_K):  # the row is a few KB: read again from L2 below
        s = _residual_sum(h_ptr, d_ptr, m, k0, K, BLOCK_K).to(tl.float32)
        squares += s * s
    rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    acc = _residual_slice(s_first, g_ptr, h_out_ptr, x_out_ptr, w_first, m, 0, K, rstd, BLOCK_K)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        acc += _residual_slice(_residual_sum(h_ptr, d_ptr, m, k0, K, BLOCK_K), g_ptr, h_out_ptr, x_out_ptr,
                               weight_slice(w_ptr, experts, k0, E, K, K, 1, BLOCK_K), m, k0, K, rstd, BLOCK_K)
    tl.store(logits_ptr + m * E + experts, tl.sum(acc, axis=1), mask=experts < E)
    if m == 0:
        tl.store(load_ptr + experts, tl.zeros((BLOCK_E,), tl.float32), mask=experts < E)


@triton.jit
def _residual_sum(h_ptr, d_ptr, m, k0, K, BLOCK_K: tl.constexpr):
    """h + d over columns k0 .. k0 + BLOCK_K of row m, in their dtype (as the model's residual add rounds)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    return (tl.load(h_ptr + m * K + cols, mask=cols < K, other=0.0)
            + tl.load(d_ptr + m * K + cols, mask=cols < K, other=0.0))


@triton.jit
def _residual_slice(s, g_ptr, h_out_ptr, x_out_ptr, w, m, k0, K, rstd, BLOCK_K: tl.constexpr):
    """Columns k0 .. k0 + BLOCK_K of x = RMSNorm(s) (s = h + d) times the experts' slice w: [BLOCK_E, BLOCK_K] in
    fp32 (and s, x written there by the programs of the first experts)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    normed = (s.to(tl.float32) * rstd).to(s.dtype)
    x = (normed.to(tl.float32) * tl.load(g_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)).to(s.dtype)
    if tl.program_id(1) == 0:
        tl.store(h_out_ptr + m * K + cols, s, mask=cols < K)
        tl.store(x_out_ptr + m * K + cols, x, mask=cols < K)
    return w.to(tl.float32) * x[None, :].to(tl.float32)


@triton.jit
def choose(logits_ptr, bias_ptr, m, E, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr):
    """Token m's choice among the E logits of its row: (each expert's rank in the order of score + bias, the lower
    index first among ties, as k rounds of max would pick them; each expert's unbiased score), [BLOCK_E] each. The
    ranks come from one all-pairs comparison: one reduction where k rounds of max take 2k, so a kernel can choose
    before its first load."""
    experts = tl.arange(0, BLOCK_E)
    valid = experts < E
    logits = tl.load(logits_ptr + m * E + experts, mask=valid, other=float("-inf"))
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        e = tl.where(valid, tl.exp(logits - tl.max(logits, axis=0)), 0.0)
        scores = e / tl.sum(e, axis=0)
    choice = scores + tl.load(bias_ptr + experts, mask=valid, other=0.0)
    # NaN (a broken hidden state) ranks as -inf: the ranks stay a permutation, so the k chosen are real experts
    choice = tl.where(valid & (choice == choice), choice, float("-inf"))
    other, own = choice[None, :], choice[:, None]
    ahead = (other > own) | ((other == own) & (experts[None, :] < experts[:, None]))
    return tl.sum(ahead.to(tl.int32), axis=1), scores


@triton.jit
def gate_weights(rank, scores, E, k, route_scale, BLOCK_E: tl.constexpr, NORMALISE: tl.constexpr):
    """`choose`'s k chosen experts' gate weights from their unbiased scores, normalised over the k (NORMALISE) and
    scaled; 0 for the others. [BLOCK_E]."""
    weights = tl.where((rank < k) & (tl.arange(0, BLOCK_E) < E), scores, 0.0)
    if NORMALISE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    return weights * route_scale


@triton.jit
def _select(logits_ptr, bias_ptr, weights_ptr, indices_ptr, load_ptr, E, route_scale,
            TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr,
            NORMALISE: tl.constexpr, PDL: tl.constexpr):
    """One program a token: its k experts (slot j: the expert ranked j) and gate weights, its count into the load."""
    wait_for_inputs(PDL)
    m = tl.program_id(0)
    rank, scores = choose(logits_ptr, bias_ptr, m, E, BLOCK_E, SIGMOID)
    weights = gate_weights(rank, scores, E, TOPK, route_scale, BLOCK_E, NORMALISE)
    experts = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, TOPK_PAD)
    ranked = rank[None, :] == slots[:, None]  # [TOPK_PAD, BLOCK_E]
    tl.store(weights_ptr + m * TOPK + slots, tl.sum(tl.where(ranked, weights[None, :], 0.0), axis=1),
             mask=slots < TOPK)
    tl.store(indices_ptr + m * TOPK + slots, tl.sum(tl.where(ranked, experts[None, :], 0), axis=1).to(tl.int64),
             mask=slots < TOPK)
    tl.atomic_add(load_ptr + experts, tl.full((BLOCK_E,), 1.0, tl.float32), mask=(rank < TOPK) & (experts < E))


class RouterLogits(NamedTuple):
    """A router's logits for n tokens whose top-k is still to be chosen, by `select` or inside the first kernel of
    the fused experts (`seekforge.ops.triton.moe`), whose programs then choose before their first weight load: the
    buffers the choice fills and the gate's settings."""

    logits: torch.Tensor  # [n, experts] fp32
    bias: torch.Tensor  # [experts], added to the scores for the choice only
    weights: torch.Tensor  # [n, k] fp32: gate weights, filled by the choice
    indices: torch.Tensor  # [n, k] int64: experts, filled by the choice
    load: torch.Tensor  # [experts] fp32: zeroed with the logits, the choice counts the tokens in
    sigmoid: bool
    normalise: bool
    route_scale: float


def route(gate, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gate` (a `seekforge.model.gate.Gate` without `group_limited` routing) over x [n, dim] -> gate weights
    [n, k] fp32, expert indices [n, k] int64 and tokens per expert [experts] fp32, as Gate.forward and
    `seekforge.ops.tokens_per_expert` give them."""
    return select(router_logits(gate, x))


def router_logits(gate, x: torch.Tensor) -> RouterLogits:
    """`route`'s first kernel alone: the logits, the choice left to `select` or to the fused experts."""
    router = _empty_router_logits(gate, x)
    if x.shape[0]:
        launch_logits(x.contiguous(), gate.weight, router.logits, router.load)
    else:
        router.load.zero_()
    return router


def residual_route(gate, h: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float):
    """`route` of x = RMSNorm(h + delta) (`seekforge.model.norm.RMSNorm`, norm_weight, eps) for h, delta [n, dim] of
    one dtype, with the residual add and the norm in the router's first kernel (where a block ran them as a kernel
    of their own): (h + delta, x, gate weights, expert indices, tokens per expert)."""
    h_out, x, router = residual_logits(gate, h, delta, norm_weight, eps)
    return h_out, x, *select(router)


def residual_logits(gate, h: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, RouterLogits]:
    """`residual_route`'s first kernel alone: (h + delta, x, the logits of x), the choice left to `select` or to
    the fused experts."""
    h, delta = h.contiguous(), delta.contiguous()  # the kernel reads and writes rows dim apart
    router = _empty_router_logits(gate, h)
    h_out, x = torch.empty_like(h), torch.empty_like(h)
    if h.shape[0]:
        launch_residual_logits(h, delta, norm_weight, eps, gate.weight, h_out, x, router.logits, router.load)
    else:
        router.load.zero_()
    return h_out, x, router


def select(router: RouterLogits) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k of `router_logits` or `residual_logits`: (gate weights, expert indices, tokens per expert)."""
    if router.logits.shape[0]:
        launch_select(router.logits, router.bias, router.weights, router.indices, router.load, router.sigmoid,
                      router.normalise, router.route_scale)
    return router.weights, router.indices, router.load


def _empty_router_logits(gate, x: torch.Tensor) -> RouterLogits:
    n, k, num_experts = x.shape[0], gate.topk, gate.weight.shape[0]
    return RouterLogits(torch.empty(n, num_experts, device=x.device, dtype=torch.float32), gate.bias,
                        torch.empty(n, k, device=x.device, dtype=torch.float32),
                        torch.empty(n, k, device=x.device, dtype=torch.int64),
                        torch.empty(num_experts, device=x.device, dtype=torch.float32),
                        gate.score_func == "sigmoid", gate.norm_topk_prob, float(gate.route_scale))


RESIDUAL_SLICE = 2048  # columns a step of `_residual_logits`: a 16b row (2048) at once
BLOCK_E = 2  # 32 programs a token at 64 experts: the GEMV's 256 KB (bf16) read across the SMs


# Opaque ops to torch.compile, as the fused MoE launch is (seekforge.ops.triton.moe): the step stays one graph.
@torch.library.custom_op("seekforge::router_logits", mutates_args=("logits", "load"))
def launch_logits(x: torch.Tensor, gate_weight: torch.Tensor, logits: torch.Tensor, load: torch.Tensor) -> None:
    n, dim = x.shape
    num_experts = gate_weight.shape[0]
    _logits[(n, triton.cdiv(num_experts, BLOCK_E))](
        x, gate_weight.contiguous(), logits, load, num_experts, dim, x.stride(0),
        BLOCK_E=BLOCK_E, BLOCK_K=min(512, triton.next_power_of_2(dim)), num_warps=4, **launch_options(x.device))


@torch.library.custom_op("seekforge::residual_logits", mutates_args=("h_out", "x", "logits", "load"))
def launch_residual_logits(h: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                           gate_weight: torch.Tensor, h_out: torch.Tensor, x: torch.Tensor, logits: torch.Tensor,
                           load: torch.Tensor) -> None:
    n, dim = h.shape
    num_experts = gate_weight.shape[0]
    _residual_logits[(n, triton.cdiv(num_experts, BLOCK_E))](
        h, delta, norm_weight, gate_weight.contiguous(), logits, load, h_out, x, num_experts, dim, eps,
        BLOCK_E=BLOCK_E, BLOCK_K=min(RESIDUAL_SLICE, triton.next_power_of_2(dim)), num_warps=4,
        **launch_options(h.device))


@torch.library.custom_op("seekforge::select", mutates_args=("weights", "indices", "load"))
def launch_select(logits: torch.Tensor, bias: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                  load: torch.Tensor, sigmoid: bool, normalise: bool, route_scale: float) -> None:
    n, num_experts = logits.shape
    k = indices.shape[1]
    _select[(n,)](logits, bias, weights, indices, load, num_experts, route_scale,
                  TOPK=k, TOPK_PAD=triton.next_power_of_2(k), BLOCK_E=triton.next_power_of_2(num_experts),
                  SIGMOID=sigmoid, NORMALISE=normalise, num_warps=1, **launch_options(logits.device))


@launch_logits.register_fake
def _(x, gate_weight, logits, load) -> None:
    return None


@launch_residual_logits.register_fake
def _(h, delta, norm_weight, eps, gate_weight, h_out, x, logits, load) -> None:
    return None


@launch_select.register_fake
def _(logits, bias, weights, indices, load, sigmoid, normalise, route_scale) -> None:
    return None


__all__ = ["RouterLogits", "choose", "gate_weights", "residual_logits", "residual_route", "route", "router_logits", "select"]
