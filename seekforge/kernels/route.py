"""The MoE router of decode's few tokens, in Triton: logits, top-k, gate weights and the load in two kernels.

`seekforge.model.gate.Gate` at one token is seven small kernels (the weight cast to fp32, a split GEMV,
softmax, top-k, the gather, two for the tokens-per-expert count): ~14 us of a 112 us layer of the 16b shape's
batch-1 step on the H200, each too small to use the GPU, most of them time spent launching. Here:

- _logits: x W^T in fp32, BLOCK_E experts a program, so the GEMV is spread over the SMs;
- _select: one program a token: scores (softmax or sigmoid), the top-k of scores + bias by k rounds of max,
  the gate weights from the unbiased scores (normalised, scaled) and the token's count into the load.

The same choice as `Gate` (ties aside: its fp32 sums run in another order) for greedy routing over one expert
group; DeepSeek-V3's group-limited routing stays with `Gate` (`Gate.group_limited`). No host synchronisation: the
grids depend on the token and expert counts only, so a captured decode step can hold it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logits(x_ptr, w_ptr, logits_ptr, load_ptr, E, K, stride_xm,
            BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(0)
    experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_E, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + experts[:, None] * K + cols[None, :], mask=(experts[:, None] < E) & (cols[None, :] < K),
                    other=0.0)
        x = tl.load(x_ptr + m * stride_xm + cols, mask=cols < K, other=0.0)
        acc += w.to(tl.float32) * x[None, :].to(tl.float32)
    tl.store(logits_ptr + m * E + experts, tl.sum(acc, axis=1), mask=experts < E)
    if m == 0:  # the load starts at zero here, so _select (next on the stream) only adds
        tl.store(load_ptr + experts, tl.zeros((BLOCK_E,), tl.float32), mask=experts < E)


@triton.jit
def _select(logits_ptr, bias_ptr, weights_ptr, indices_ptr, load_ptr, E, route_scale,
            TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr,
            NORMALISE: tl.constexpr):
    m = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    valid = experts < E
    logits = tl.load(logits_ptr + m * E + experts, mask=valid, other=float("-inf"))
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        e = tl.where(valid, tl.exp(logits - tl.max(logits, axis=0)), 0.0)
        scores = e / tl.sum(e, axis=0)
    choice = tl.where(valid, scores + tl.load(bias_ptr + experts, mask=valid, other=0.0), float("-inf"))
    slots = tl.arange(0, TOPK_PAD)
    weights = tl.zeros((TOPK_PAD,), tl.float32)
    indices = tl.zeros((TOPK_PAD,), tl.int64)
    for j in tl.static_range(TOPK):
        best = tl.max(choice, axis=0)
        pick = tl.min(tl.where(choice == best, experts, BLOCK_E), axis=0)  # the lowest index among ties
        weights = tl.where(slots == j, tl.sum(tl.where(experts == pick, scores, 0.0), axis=0), weights)
        indices = tl.where(slots == j, pick.to(tl.int64), indices)
        choice = tl.where(experts == pick, float("-inf"), choice)
    if NORMALISE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    tl.store(weights_ptr + m * TOPK + slots, weights * route_scale, mask=slots < TOPK)
    tl.store(indices_ptr + m * TOPK + slots, indices, mask=slots < TOPK)
    tl.atomic_add(load_ptr + indices, tl.full((TOPK_PAD,), 1.0, tl.float32), mask=slots < TOPK)


def route(gate, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gate` (a `seekforge.model.gate.Gate` without `group_limited` routing) over x [n, dim] -> gate weights [n, k] fp32,
    expert indices [n, k] int64 and tokens per expert [experts] fp32, as Gate.forward and
    `seekforge.model.moe.tokens_per_expert` give them."""
    n = x.shape[0]
    num_experts, k = gate.weight.shape[0], gate.topk
    weights = torch.empty(n, k, device=x.device, dtype=torch.float32)
    indices = torch.empty(n, k, device=x.device, dtype=torch.int64)
    load = torch.empty(num_experts, device=x.device, dtype=torch.float32)
    if n:
        launch_route(x.contiguous(), gate.weight, gate.bias, weights, indices, load, k,
                     gate.score_func == "sigmoid", gate.norm_topk_prob, float(gate.route_scale))
    else:
        load.zero_()
    return weights, indices, load


# An opaque op to torch.compile, as the fused MoE launch is (seekforge.kernels.moe): the step stays one graph.
@torch.library.custom_op("seekforge::route", mutates_args=("weights", "indices", "load"))
def launch_route(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor, weights: torch.Tensor,
                 indices: torch.Tensor, load: torch.Tensor, k: int, sigmoid: bool, normalise: bool,
                 route_scale: float) -> None:
    n, dim = x.shape
    num_experts = gate_weight.shape[0]
    logits = torch.empty(n, num_experts, device=x.device, dtype=torch.float32)
    block_e = 2  # 32 programs a token at 64 experts: the GEMV's 256 KB (bf16) read across the SMs
    _logits[(n, triton.cdiv(num_experts, block_e))](
        x, gate_weight.contiguous(), logits, load, num_experts, dim, x.stride(0),
        BLOCK_E=block_e, BLOCK_K=min(512, triton.next_power_of_2(dim)), num_warps=4)
    _select[(n,)](logits, bias, weights, indices, load, num_experts, route_scale,
                  TOPK=k, TOPK_PAD=triton.next_power_of_2(k), BLOCK_E=triton.next_power_of_2(num_experts),
                  SIGMOID=sigmoid, NORMALISE=normalise, num_warps=1)


@launch_route.register_fake
def _(x, gate_weight, bias, weights, indices, load, k, sigmoid, normalise, route_scale) -> None:
    return None


__all__ = ["route"]
