"""Routed (and shared) experts for few tokens per expert, in Triton: the fused MoE of decode steps.

A decode step sends each of its n tokens to k experts, a handful of rows per expert. What bounds it is
reading the chosen experts' weights once; grouped GEMMs built for prefill (`torch._grouped_mm`) tile every
expert in 64- or 128-row blocks and pay for setup and compute that a few rows do not need. Here the
(token, slot) pairs are grouped by expert with each expert's rows padded to BLOCK_M, and one program per
(row block, column block) reads its expert's weight tile once for all its rows. Two kernels:

- gate_up: h = silu(x W1^T) * (x W3^T) per padded row, both weights' tiles in the same program;
- down: out[pair] = gate weight * (h W2^T), written at the pair's own row; then each token's k rows are summed,
  with the block's residual where given (in the GEMV form below by the last program of each column slice to
  finish, `seekforge.ops.triton.arrivals`; after the MMA tiles by a small kernel, `_pair_sums`).

With one or two tokens the grouping itself is skipped (one row block per pair, the routing read as it is), and
the shared experts can join as extra experts of weight 1 (slices of the shared MLP's matrices), so one pass
reads every weight the token needs. There a pair is one row, and an MMA tile of 16 rows computes 15 of padding:
the same two kernels as GEMVs (`_gate_up_rows`, `_down_rows`: a program per pair and a few weight rows, each
row's whole K at once, as `seekforge.ops.triton.gemv` reads the dense projections) spread the read over ten times
the programs. Which of the two forms a shape runs is timed on its first call, both replayed from CUDA graphs,
as the GEMV weighs itself against cuBLAS (`seekforge.ops.triton.tuning`).

FP8 weights (`scales=`: e4m3 with one fp32 scale per 128x128 block of each matrix, DeepSeek's checkpoint layout)
run through the same kernels and grids, which then read one byte a weight and its block scales, never a
dequantised copy; products and sums stay in fp32. The tiling keeps the scales out of the inner loop's cost:
- MMA tiles: BLOCK_N and BLOCK_K divide 128, so each [BLOCK_K, BLOCK_N] weight tile lies in one scale block; its
  e4m3 values widen exactly to x's dtype for the MMA, and the tile's fp32 product is multiplied by that one scale
  as it joins the accumulator (a scalar load and a multiply a tile).
- GEMV form: a program's BLOCK_N rows (a power of two up to 128) lie in one 128-row block; its K slice is read
  in 8-column chunks, each thread sums its chunks' products and multiplies each sum by the chunk's block scale
  (a scale load and a multiply a chunk, not one a weight: `seekforge.ops.triton.gemv.fp8_times_row`, as the FP8
  GEMV reads the dense projections), with tiles timed among e4m3 ones (`tuning.FP8_TILES`: twice the weights a
  program of the 16-bit tiles, the same bytes in flight).
- A shared expert j's scales are the rows (gate/up) or columns (down) j * inter / 128 .. of the shared MLP's, found
  as its matrices are (`_expert_matrix`); several shared experts join only where inter is whole blocks.

No host synchronisation: the grid depends only on n, k and the expert count (row blocks are bounded by
pairs / BLOCK_M + min(experts, pairs); blocks past the real ones return at once), so a decode step that
calls this can be captured as a CUDA graph, and the grouping (a few tensor ops) compiles with the step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from seekforge.errors import ConfigError
from seekforge.ops.triton.arrivals import arrive, counters
from seekforge.ops.quant import cdiv
from seekforge.ops.triton.gemv import (FP8_BLOCK, SCALE_BLOCK, fp8_chunk_scales, fp8_chunks, fp8_slice, fp8_times_row,
                                      row_major)
from seekforge.ops.triton import tuning
from seekforge.ops.triton.tuning import launch_tiled, tile_of, tuned
from seekforge.ops.triton.pdl import wait_for_inputs
from seekforge.ops.triton.route import RouterLogits, choose, gate_weights, launch_select, select


@triton.jit
def _row_block(block, ids_ptr, expert_ptr, idx_ptr, num_pairs, num_routed, k_routed,
               TOPK: tl.constexpr, BLOCK_M: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """Row block `block` -> (its expert, its rows, the pair of each row: num_pairs for padding). ONE_BLOCK:
    block p holds pair p = token * TOPK + slot alone, its expert read from the routed indices [n, k_routed]
    (slots past k_routed: the shared experts), so no layout is built before the launch."""
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    if ONE_BLOCK:
        expert = _pair_expert(block, idx_ptr, num_routed, k_routed, TOPK)
        pair = tl.where(tl.arange(0, BLOCK_M) == 0, block, num_pairs)
    else:
        expert = tl.load(expert_ptr + block).to(tl.int64)
        pair = tl.load(ids_ptr + rows)
    return expert, rows, pair


@triton.jit
def _pair_expert(pair, idx_ptr, num_routed, k_routed, TOPK: tl.constexpr):
    """Pair p = token * TOPK + slot -> its expert: the routed index [n, k_routed] for slots < k_routed, the shared
    experts (num_routed, num_routed + 1, ...) for the slots past them."""
    slot = pair % TOPK
    routed = tl.load(idx_ptr + (pair // TOPK) * k_routed + tl.minimum(slot, k_routed - 1)).to(tl.int64)
    return tl.where(slot < k_routed, routed, num_routed + slot - k_routed)


@triton.jit
def _expert_matrix(expert, routed_ptr, shared_ptr, num_routed, stride_we, stride_wn, stride_se, stride_sn):
    """(Where expert `expert`'s matrix starts, its row stride): a routed expert's own, or for expert num_routed + j
    slice j of the shared experts' MLP matrix (gate/up: rows j * inter ..; down: columns j * inter ..)."""
    if expert < num_routed:
        at = routed_ptr + expert * stride_we
        row_stride = stride_wn
    else:
        at = shared_ptr + (expert - num_routed) * stride_se
        row_stride = stride_sn
    return at, row_stride


@triton.jit
def _pair_gate(pair, gate_ptr, k_routed, TOPK: tl.constexpr):
    """The routed weight [n, k_routed] of pair p's slot; 1 for a shared expert's."""
    slot = pair % TOPK
    weight = tl.load(gate_ptr + (pair // TOPK) * k_routed + tl.minimum(slot, k_routed - 1))
    return tl.where(slot < k_routed, weight, 1.0)


@triton.jit
def _mma_step(acc, a, w, scale_at, scale_stride, n0, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              PRECISION: tl.constexpr, FP8: tl.constexpr):
    """acc + a @ w for one K step (w [BLOCK_K, BLOCK_N] of W^T). FP8: w's e4m3 values widened to a's dtype (exactly)
    for the MMA, and its fp32 product times the one scale of the 128x128 block the whole tile lies in."""
    if FP8:
        tl.static_assert(SCALE_BLOCK % BLOCK_N == 0)
        tl.static_assert(SCALE_BLOCK % BLOCK_K == 0)
        scale = tl.load(scale_at + (n0 // SCALE_BLOCK) * scale_stride + k0 // SCALE_BLOCK)
        acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION) * scale
    else:
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _gate_up(x_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, w1s_ptr, w3s_ptr, s1s_ptr, s3s_ptr, h_ptr, ids_ptr, expert_ptr,
             idx_ptr, num_pairs, num_routed, num_experts, k_routed, K, N,
             stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_hm,
             stride_wse, stride_wsn, stride_sse, stride_ssn,
             TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr, ONE_BLOCK: tl.constexpr, FP8: tl.constexpr):
    block = tl.program_id(0)
    expert, rows, pair = _row_block(block, ids_ptr, expert_ptr, idx_ptr, num_pairs, num_routed, k_routed,
                                    TOPK, BLOCK_M, ONE_BLOCK)
    if expert >= num_experts:  # past the last real row block
        return
    w1_at, row_stride = _expert_matrix(expert, w1_ptr, s1_ptr, num_routed, stride_we, stride_wn, stride_se, stride_sn)
    w3_at, _ = _expert_matrix(expert, w3_ptr, s3_ptr, num_routed, stride_we, stride_wn, stride_se, stride_sn)
    # FP8: the expert's block scales, found as its matrices are (not read for 16-bit weights)
    w1s_at, scale_stride = _expert_matrix(expert, w1s_ptr, s1s_ptr, num_routed, stride_wse, stride_wsn, stride_sse,
                                          stride_ssn)
    w3s_at, _ = _expert_matrix(expert, w3s_ptr, s3s_ptr, num_routed, stride_wse, stride_wsn, stride_sse, stride_ssn)
    n0 = tl.program_id(1) * BLOCK_N
    row_ok = pair < num_pairs
    token = (pair // TOPK).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_at = x_ptr + token[:, None] * stride_xm + offs_k[None, :]
    w_off = offs_n[None, :] * row_stride + offs_k[:, None]  # [BLOCK_K, BLOCK_N] of W^T
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_at + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w1 = tl.load(w1_at + w_off + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        w3 = tl.load(w3_at + w_off + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc1 = _mma_step(acc1, x, w1, w1s_at, scale_stride, n0, k0, BLOCK_N, BLOCK_K, PRECISION, FP8)
        acc3 = _mma_step(acc3, x, w3, w3s_at, scale_stride, n0, k0, BLOCK_N, BLOCK_K, PRECISION, FP8)
    h = acc1 * tl.sigmoid(acc1) * acc3
    tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down(h_ptr, w2_ptr, s2_ptr, w2s_ptr, s2s_ptr, out_ptr, ids_ptr, expert_ptr, idx_ptr, gate_ptr,
          num_pairs, num_routed, num_experts, k_routed, K, N,
          stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_om,
          stride_wse, stride_wsn, stride_sse, stride_ssn,
          TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          PRECISION: tl.constexpr, ONE_BLOCK: tl.constexpr, FP8: tl.constexpr):
    block = tl.program_id(0)
    expert, rows, pair = _row_block(block, ids_ptr, expert_ptr, idx_ptr, num_pairs, num_routed, k_routed,
                                    TOPK, BLOCK_M, ONE_BLOCK)
    if expert >= num_experts:
        return
    w2_at, row_stride = _expert_matrix(expert, w2_ptr, s2_ptr, num_routed, stride_we, stride_wn, stride_se, stride_sn)
    w2s_at, scale_stride = _expert_matrix(expert, w2s_ptr, s2s_ptr, num_routed, stride_wse, stride_wsn, stride_sse,
                                          stride_ssn)
    row_ok = pair < num_pairs
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    h_at = h_ptr + rows[:, None].to(tl.int64) * stride_hm + offs_k[None, :]
    w_off = offs_n[None, :] * row_stride + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        h = tl.load(h_at + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w2 = tl.load(w2_at + w_off + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma_step(acc, h, w2, w2s_at, scale_stride, n0, k0, BLOCK_N, BLOCK_K, PRECISION, FP8)
    if ONE_BLOCK:  # gate_ptr: the routed weights [n, k_routed]; a shared expert's weight is 1
        gate = tl.where(row_ok, _pair_gate(block, gate_ptr, k_routed, TOPK), 0.0)
    else:  # gate_ptr: every pair's weight
        gate = tl.load(gate_ptr + pair, mask=row_ok, other=0.0)
    tl.store(out_ptr + pair[:, None].to(tl.int64) * stride_om + offs_n[None, :], acc * gate[:, None],
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _gate_up_rows(x_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, w1s_ptr, w3s_ptr, s1s_ptr, s3s_ptr, h_ptr, idx_ptr,
                  num_routed, k_routed, K, N, stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_hm,
                  stride_wse, stride_wsn, stride_sse, stride_ssn,
                  logits_ptr, bias_ptr, gate_ptr, load_ptr, route_scale,
                  TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHOOSE: tl.constexpr,
                  BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr, NORMALISE: tl.constexpr, FP8: tl.constexpr,
                  PDL: tl.constexpr):
    """`_gate_up` for one row a pair, as a GEMV: program (j, p) computes h[p, j * BLOCK_N ...] from BLOCK_N rows of
    its expert's W1 and W3, both read in the same slices of K. CHOOSE: the routing is still the router's logits
    (`seekforge.ops.triton.route.RouterLogits`), and each program of a routed pair chooses its expert itself
    (`_chosen_expert`), where the router's select kernel ran before this one."""
    wait_for_inputs(PDL)
    pair = tl.program_id(1)
    if CHOOSE:
        expert = _chosen_expert(pair, logits_ptr, bias_ptr, idx_ptr, gate_ptr, load_ptr, num_routed, k_routed,
                                route_scale, TOPK, BLOCK_E, SIGMOID, NORMALISE)
    else:
        expert = _pair_expert(pair, idx_ptr, num_routed, k_routed, TOPK)
    w1_at, row_stride = _expert_matrix(expert, w1_ptr, s1_ptr, num_routed, stride_we, stride_wn, stride_se, stride_sn)
    w3_at, _ = _expert_matrix(expert, w3_ptr, s3_ptr, num_routed, stride_we, stride_wn, stride_se, stride_sn)
    w1s_at, scale_stride = _expert_matrix(expert, w1s_ptr, s1s_ptr, num_routed, stride_wse, stride_wsn, stride_sse,
                                          stride_ssn)
    w3s_at, _ = _expert_matrix(expert, w3s_ptr, s3s_ptr, num_routed, stride_wse, stride_wsn, stride_sse, stride_ssn)
    n0 = tl.program_id(0) * BLOCK_N
    rows = n0 + tl.arange(0, BLOCK_N)
    x_at = x_ptr + (pair // TOPK).to(tl.int64) * stride_xm
    acc1 = tl.zeros((BLOCK_N,), tl.float32)
    acc3 = tl.zeros((BLOCK_N,), tl.float32)
    if FP8:  # the weights in 16-byte-aligned chunks, each chunk's sum times its block scale (`gemv.fp8_times_row`)
        tl.static_assert(SCALE_BLOCK % BLOCK_N == 0)
        s1_at = w1s_at + (n0 // SCALE_BLOCK) * scale_stride
        s3_at = w3s_at + (n0 // SCALE_BLOCK) * scale_stride
        for k0 in range(0, K, BLOCK_K):
            ks = fp8_chunks(k0, BLOCK_K)
            x = tl.load(x_at + ks, mask=ks < K, other=0.0).to(tl.float32)
            acc1 += fp8_times_row(fp8_slice(w1_at, rows, k0, N, K, row_stride, BLOCK_K),
                                  fp8_chunk_scales(s1_at, k0, K, BLOCK_K), x)
            acc3 += fp8_times_row(fp8_slice(w3_at, rows, k0, N, K, row_stride, BLOCK_K),
                                  fp8_chunk_scales(s3_at, k0, K, BLOCK_K), x)
    else:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            ok = (rows[:, None] < N) & (ks[None, :] < K)
            w1 = tl.load(w1_at + rows[:, None] * row_stride + ks[None, :], mask=ok, other=0.0)
            w3 = tl.load(w3_at + rows[:, None] * row_stride + ks[None, :], mask=ok, other=0.0)
            x = tl.load(x_at + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :]
            acc1 += tl.sum(w1.to(tl.float32) * x, axis=1)
            acc3 += tl.sum(w3.to(tl.float32) * x, axis=1)
    h = acc1 * tl.sigmoid(acc1) * acc3
    tl.store(h_ptr + pair * stride_hm + rows, h.to(h_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _chosen_expert(pair, logits_ptr, bias_ptr, idx_ptr, gate_ptr, load_ptr, num_routed, k_routed, route_scale,
                   TOPK: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr, NORMALISE: tl.constexpr):
    """`_pair_expert` from the router's logits [n, num_routed]: slot j of a token takes the expert ranked j
    (`seekforge.ops.triton.route.choose`); the first program of each routed pair writes the choice where the down
    kernel reads it (indices, gate weights [n, k_routed]) and counts it into the load. A shared expert's programs
    choose nothing and start reading at once."""
    token = pair // TOPK
    slot = pair % TOPK
    expert = (num_routed + slot - k_routed).to(tl.int64)
    if slot < k_routed:
        rank, scores = choose(logits_ptr, bias_ptr, token, num_routed, BLOCK_E, SIGMOID)
        mine = rank == slot
        expert = tl.sum(tl.where(mine, tl.arange(0, BLOCK_E), 0), axis=0).to(tl.int64)
        if tl.program_id(0) == 0:  # the gate weights in this program only: the others need the expert alone
            weights = gate_weights(rank, scores, num_routed, k_routed, route_scale, BLOCK_E, NORMALISE)
            tl.store(idx_ptr + token * k_routed + slot, expert)
            tl.store(gate_ptr + token * k_routed + slot, tl.sum(tl.where(mine, weights, 0.0), axis=0))
            tl.atomic_add(load_ptr + expert, 1.0)
    return expert


@triton.jit
def _down_rows(h_ptr, w2_ptr, s2_ptr, w2s_ptr, s2s_ptr, out_ptr, idx_ptr, gate_ptr, summed_ptr, residual_ptr,
               counter_ptr, num_routed, k_routed, K, N, stride_hm, stride_we, stride_wn, stride_se, stride_sn,
               stride_om, stride_wse, stride_wsn, stride_sse, stride_ssn,
               TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RESIDUAL: tl.constexpr,
               FP8: tl.constexpr, PDL: tl.constexpr):
    """`_down` for one row a pair, as a GEMV: out[p, j * BLOCK_N ...] = gate weight * (h[p] W2^T) for BLOCK_N rows
    of its expert's W2; the last program of these rows to finish sums them over each token's pairs (`_sum_pairs`):
    one launch fewer than a kernel of its own after them."""
    wait_for_inputs(PDL)
    pair = tl.program_id(1)
    expert = _pair_expert(pair, idx_ptr, num_routed, k_routed, TOPK)
    w2_at, row_stride = _expert_matrix(expert, w2_ptr, s2_ptr, num_routed, stride_we, stride_wn, stride_se, stride_sn)
    w2s_at, scale_stride = _expert_matrix(expert, w2s_ptr, s2s_ptr, num_routed, stride_wse, stride_wsn, stride_sse,
                                          stride_ssn)
    n0 = tl.program_id(0) * BLOCK_N
    rows = n0 + tl.arange(0, BLOCK_N)
    h_at = h_ptr + pair * stride_hm
    acc = tl.zeros((BLOCK_N,), tl.float32)
    if FP8:  # as in `_gate_up_rows`
        tl.static_assert(SCALE_BLOCK % BLOCK_N == 0)
        s2_at = w2s_at + (n0 // SCALE_BLOCK) * scale_stride
        for k0 in range(0, K, BLOCK_K):
            ks = fp8_chunks(k0, BLOCK_K)
            h = tl.load(h_at + ks, mask=ks < K, other=0.0).to(tl.float32)
            acc += fp8_times_row(fp8_slice(w2_at, rows, k0, N, K, row_stride, BLOCK_K),
                                 fp8_chunk_scales(s2_at, k0, K, BLOCK_K), h)
    else:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w2 = tl.load(w2_at + rows[:, None] * row_stride + ks[None, :],
                         mask=(rows[:, None] < N) & (ks[None, :] < K), other=0.0)
            h = tl.load(h_at + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :]
            acc += tl.sum(w2.to(tl.float32) * h, axis=1)
    gate = _pair_gate(pair, gate_ptr, k_routed, TOPK)
    tl.store(out_ptr + pair * stride_om + rows, acc * gate, mask=rows < N)
    if arrive(counter_ptr + tl.program_id(0), tl.num_programs(1)):
        for token in range(0, tl.num_programs(1) // TOPK):
            _sum_pairs(out_ptr, summed_ptr, residual_ptr, token, rows, N, stride_om, TOPK, RESIDUAL)


@triton.jit
def _sum_pairs(out_ptr, summed_ptr, residual_ptr, token, rows, N, stride_om, TOPK: tl.constexpr,
               RESIDUAL: tl.constexpr):
    """summed[token, rows] = residual[token, rows] (RESIDUAL) + the token's TOPK pair rows of out, in fp32, rounded
    once; summed and residual are [tokens, N], contiguous."""
    acc = tl.zeros(rows.shape, tl.float32)
    if RESIDUAL:
        acc += tl.load(residual_ptr + token * N + rows, mask=rows < N, other=0.0).to(tl.float32)
    for j in tl.static_range(TOPK):
        acc += tl.load(out_ptr + (token * TOPK + j) * stride_om + rows, mask=rows < N, other=0.0, cache_modifier=".cg")
    tl.store(summed_ptr + token * N + rows, acc.to(summed_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _pair_sums(out_ptr, summed_ptr, residual_ptr, N, stride_om, TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
               RESIDUAL: tl.constexpr):
    """`_sum_pairs` as a kernel of its own, after the MMA tiles: a program a (column slice, token)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    _sum_pairs(out_ptr, summed_ptr, residual_ptr, tl.program_id(1), rows, N, stride_om, TOPK, RESIDUAL)


_gate_up_rows_tuned = tuned(_gate_up_rows, ["K", "N", "TOPK"], restore_value=("load_ptr",),  # the choice counts load
                            weight="w1_ptr")
_down_rows_tuned = tuned(_down_rows, ["K", "N", "TOPK"], weight="w2_ptr")


@dataclass(frozen=True)
class MoEConfig:
    """Tiles of both kernels: `block_m` rows (token slots) of one expert, `block_n` output columns and
    `block_k` of the reduction per loop step."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def default_config(num_pairs: int, num_experts: int, element_size: int = 2,
                   weight_size: int | None = None) -> MoEConfig:
    """16 rows (the smallest MMA tile) while experts hold a few rows each, wider blocks once they hold more
    (so each weight tile serves more rows), and as many pipeline stages as fit in shared memory (fp32 takes
    twice the room of bf16; `weight_size`: bytes a weight element where not element_size, 1 for FP8)."""
    per_expert = num_pairs / num_experts
    if num_pairs <= ONE_BLOCK_PER_PAIR:  # one or two tokens: the narrower tile measured faster (bench/moe.py --sweep)
        cfg = MoEConfig(16, 32, 128, num_warps=4, num_stages=3)
    elif per_expert <= 16:
        cfg = MoEConfig(16, 64, 128, num_warps=4, num_stages=5)
    elif per_expert <= 64:
        cfg = MoEConfig(32, 64, 128, num_warps=4, num_stages=4)
    else:
        cfg = MoEConfig(64, 128, 64, num_warps=8, num_stages=3)
    stage_bytes = (cfg.block_m * element_size + 2 * cfg.block_n * (weight_size or element_size)) * cfg.block_k
    return replace(cfg, num_stages=max(1, min(cfg.num_stages, _SHARED_MEMORY // stage_bytes)))


_SHARED_MEMORY = 192 * 1024  # of an H100/H200 SM's 227 KB, with room for the epilogue


def group_by_expert(indices: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """indices [n, k] -> (pair ids [blocks * block_m] int32, expert of each row block [blocks] int32).
    Pairs p = token * k + slot are laid out expert by expert, each expert's rows padded to whole blocks;
    padding rows hold n * k. `blocks` is the bound pairs // block_m + min(experts, pairs), a function of
    the shapes alone; blocks past the real ones belong to expert `num_experts` (none)."""
    flat = indices.flatten()
    pairs = flat.numel()
    blocks = pairs // block_m + min(num_experts, pairs)
    one_hot = F.one_hot(flat, num_experts)  # [pairs, experts]
    rank = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # earlier pairs of the same expert
    per_expert = (one_hot.sum(0) + block_m - 1) // block_m  # row blocks of each expert
    block_end = per_expert.cumsum(0)
    dest = (block_end - per_expert)[flat] * block_m + rank
    pair_ids = torch.full((blocks * block_m,), pairs, dtype=torch.int32, device=flat.device)
    pair_ids.scatter_(0, dest, torch.arange(pairs, dtype=torch.int32, device=flat.device))
    first_block = torch.arange(blocks, device=flat.device).unsqueeze(1)
    block_expert = (first_block >= block_end.unsqueeze(0)).sum(1).to(torch.int32)
    return pair_ids, block_expert


ONE_BLOCK_PER_PAIR = 16  # pairs up to which row block p holds pair p (two tokens at k = 6 with 2 shared experts)
# The pairs of one token never share an expert, so at one token nothing is read twice; the kernels then read the
# routing as the router wrote it, and the grouping's small kernels (a fair share of a batch-1 step) are saved.


def fused_experts(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                  weights: torch.Tensor | None, indices: torch.Tensor | None, config: MoEConfig | None = None,
                  shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  rows: bool | None = None, residual: torch.Tensor | None = None,
                  router: RouterLogits | None = None,
                  scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  shared_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [n, dim]; w1/w3 [experts, inter, dim], w2 [experts, dim, inter] (the model's `Experts`); weights
    [n, k] gate weights, indices [n, k] chosen experts -> sum over k of weight * SwiGLU_expert(x), [n, dim]
    in x's dtype, plus `residual` [n, dim] (x's dtype) where given: summed in fp32 and rounded once. `shared` =
    the shared experts' MLP weights (gate [S * inter, dim], down [dim, S * inter], up [S * inter, dim]), added to
    the sum as S more experts of weight 1 that every token takes: one pass over the weights for routed and shared
    alike. `scales`: the weights are float8_e4m3fn with one fp32 scale per 128x128 block of each matrix (DeepSeek's
    weight_scale_inv: w1/w3 [experts, ceil(inter / 128), ceil(dim / 128)], w2 [experts, ceil(dim / 128),
    ceil(inter / 128)]; `shared_scales` those of `shared`, which are then FP8 too, and several shared experts need
    inter a multiple of 128); None: the weights are in x's dtype. `config` replaces the tile heuristic (benchmarks).
    `rows`: for one or two tokens, the GEMV form (True) or the MMA tiles (False); None: the faster on the GPU (timed
    on the shape's first call), the MMA tiles under the interpreter and wherever `config` is given. `router`: the
    router's logits (`seekforge.ops.triton.route.RouterLogits`), weights and indices None: the choice fills its
    buffers, made in the GEMV form's first kernel (one launch fewer), else by the router's select kernel first."""
    if router is not None:
        weights, indices = router.weights, router.indices
    n, dim = x.shape
    num_routed, inter, _ = w1.shape
    if (w1.shape != w3.shape or w2.shape != (num_routed, dim, inter) or w1.shape[2] != dim
            or weights.shape != indices.shape or indices.shape[0] != n):
        raise ConfigError(f"fused experts want x [n, dim], w1/w3 [experts, inter, dim], w2 [experts, dim, inter], "
                          f"weights and indices [n, k]; got x {tuple(x.shape)}, w1 {tuple(w1.shape)}, "
                          f"w2 {tuple(w2.shape)}, w3 {tuple(w3.shape)}, weights {tuple(weights.shape)}, "
                          f"indices {tuple(indices.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ConfigError(f"the residual must be x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
                          f"{tuple(residual.shape)} {residual.dtype}")
    weight_dtype = x.dtype if scales is None else torch.float8_e4m3fn
    tensors = (w1, w2, w3, *(shared or ()))
    if any(t.dtype != weight_dtype for t in tensors):
        raise ConfigError(f"the expert weights must be of x's dtype ({x.dtype}), or float8_e4m3fn where scales are "
                          f"given, all of one dtype; got {[t.dtype for t in tensors]}"
                          f"{'' if scales is None else ' with scales'}")
    if any(w.stride(-1) != 1 for w in tensors) or w1.stride() != w3.stride():
        raise ConfigError("expert weights must be contiguous in their last dim (and w1, w3 alike)")
    num_shared = 0
    if shared is not None:
        s1, s2, s3 = shared
        num_shared = s1.shape[0] // inter
        if (s1.shape != s3.shape or s1.shape != (num_shared * inter, dim) or s2.shape != (dim, num_shared * inter)
                or s1.stride() != s3.stride()):
            raise ConfigError(f"shared experts want gate/up [S * {inter}, {dim}] and down [{dim}, S * {inter}], got "
                              f"{tuple(s1.shape)}, {tuple(s2.shape)}, {tuple(s3.shape)}")
    k_routed = indices.shape[1]
    k = k_routed + num_shared
    pairs = n * k
    num_experts = num_routed + num_shared
    cfg = config or default_config(pairs, num_experts, x.element_size(), w1.element_size())
    block_scales = [] if scales is None else _block_scales(x, w1, scales, shared, shared_scales, cfg)
    if pairs == 0:
        return x.new_zeros(n, dim) if residual is None else residual.clone()
    x = x.contiguous()
    routed_indices, weights = indices.contiguous(), weights.float().contiguous()
    one_block = pairs <= ONE_BLOCK_PER_PAIR
    if router is not None and not one_block:  # the grouping reads the choice
        select(router)
        router = None
    if one_block:  # the kernels read the routing as it is: row block p holds pair p
        pair_ids = block_expert = routed_indices  # not read
        blocks = pairs
    else:
        if shared is not None:  # the shared experts as S more experts of weight 1 that every token takes
            always = torch.arange(num_routed, num_experts, device=indices.device).expand(n, num_shared)
            indices = torch.cat([indices, always], dim=1)
            weights = torch.cat([weights, weights.new_ones(n, num_shared)], dim=1)
        pair_ids, block_expert = group_by_expert(indices, num_experts, cfg.block_m)
        blocks = block_expert.shape[0]
    out = torch.empty(pairs, dim, device=x.device, dtype=torch.float32)
    summed = torch.empty_like(x)
    s1, s2, s3 = shared or (w1, w2, w3)  # without shared experts no block reads these
    launch_fused_moe(x, w1, w2, w3, s1, s2, s3, block_scales, weights, pair_ids, block_expert, routed_indices, out,
                     summed, None if residual is None else residual.contiguous(), k, blocks, num_experts, one_block,
                     cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages,
                     False if config is not None and rows is None else rows,
                     *((None, None, None, False, False, 1.0) if router is None else (
                         router.logits, router.bias, router.load, router.sigmoid, router.normalise, router.route_scale)))
    return summed


def _block_scales(x: torch.Tensor, w1: torch.Tensor, scales: tuple, shared: tuple | None,
                  shared_scales: tuple | None, cfg: MoEConfig) -> list[torch.Tensor]:
    """The scales of FP8 expert weights as `launch_fused_moe` takes them (w1, w2, w3, then the shared experts' or
    stand-ins), rows contiguous, once their shapes, the shared experts' blocks and the MMA tile are checked."""
    num_routed, inter, dim = w1.shape
    up, down = (cdiv(inter, FP8_BLOCK), cdiv(dim, FP8_BLOCK)), (cdiv(dim, FP8_BLOCK), cdiv(inter, FP8_BLOCK))
    want = [(num_routed, *up), (num_routed, *down), (num_routed, *up)]
    given = list(scales)
    if shared is not None:
        if shared_scales is None:
            raise ConfigError("FP8 expert weights with shared experts: give shared_scales, the shared experts' block "
                              "scales, too")
        rows = shared[0].shape[0]
        if rows != inter and inter % FP8_BLOCK:
            raise ConfigError(f"several FP8 shared experts join the routed ones only where inter ({inter}) is a "
                              f"multiple of {FP8_BLOCK} (each expert's scales whole blocks); add them apart")
        want += [(cdiv(rows, FP8_BLOCK), down[0]), (down[0], cdiv(rows, FP8_BLOCK)), (cdiv(rows, FP8_BLOCK), down[0])]
        given += list(shared_scales)
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or len(given) != len(want) or any(
            s.dtype != torch.float32 or tuple(s.shape) != shape for s, shape in zip(given, want)):
        raise ConfigError(f"FP8 experts want x bf16, fp16 or fp32 and fp32 block scales of shapes {want}; got x "
                          f"{x.dtype}, scales {[(tuple(s.shape), s.dtype) for s in given]}")
    if FP8_BLOCK % cfg.block_n or FP8_BLOCK % cfg.block_k:
        raise ConfigError(f"FP8 experts want MMA tiles within one {FP8_BLOCK}x{FP8_BLOCK} block (block_n and block_k "
                          f"dividing {FP8_BLOCK}), got {cfg}")
    given = [row_major(s) for s in given]
    return given if shared is not None else given + given  # without shared experts no block reads the stand-ins


# An opaque op to torch.compile (it cannot trace launches with dynamic strides), which still compiles the grouping
# around it into the same graph. A graph break here instead (torch.compiler.disable) split every block that calls
# it, and dynamo keeps those split variants on the shared code objects, where prefill's compiled blocks found them.
@torch.library.custom_op("seekforge::fused_moe", mutates_args=("out", "summed", "weights", "routed_indices", "load"))
def launch_fused_moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, s1: torch.Tensor,
                     s2: torch.Tensor, s3: torch.Tensor, scales: list[torch.Tensor], weights: torch.Tensor,
                     pair_ids: torch.Tensor,
                     block_expert: torch.Tensor, routed_indices: torch.Tensor, out: torch.Tensor, summed: torch.Tensor,
                     residual: torch.Tensor | None, k: int, blocks: int, num_experts: int, one_block: bool,
                     block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int,
                     rows: bool | None, logits: torch.Tensor | None, bias: torch.Tensor | None,
                     load: torch.Tensor | None, sigmoid: bool, normalise: bool, route_scale: float) -> None:
    """Both kernels over `blocks` row blocks, into out [pairs, dim] fp32, then each token's k pair rows summed (and
    the residual [n, dim] added, where given) into summed [n, dim]; s1/s2/s3 the shared experts' matrices (or any
    tensors when there are none: no row block reads them). `scales`: for FP8 weights their block scales, those of
    w1, w2, w3, s1, s2, s3 (the same stand-ins where there are no shared experts); empty for 16-bit weights.
    `one_block`: row block p holds pair p and the kernels
    read routed_indices [n, k_routed] and weights [n, k_routed] as they are; otherwise the grouped layout
    (pair_ids, block_expert) and every pair's weight; `rows` as `fused_experts` takes it. `logits` (one block a
    pair only): the router's, with bias, load and the gate's settings (`RouterLogits`); weights and routed_indices
    are then filled here, in the GEMV form's first kernel or by the router's select kernel before the tiles."""
    pairs, dim = out.shape
    num_routed, inter, _ = w1.shape
    k_routed = routed_indices.shape[1]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 stays exact; tf32 is ignored for 16 bits
    fp8 = bool(scales)
    w1s, w2s, w3s, s1s, s2s, s3s = scales if fp8 else (w1,) * 6  # 16-bit weights: no program reads these

    # shared expert j: rows j * inter .. of the gate/up matrices, columns j * inter .. of the down matrix; of their
    # scales, rows (columns) j * inter / 128 .. (`fused_experts` joins several shared experts where inter is whole
    # blocks)
    shared_blocks = inter // FP8_BLOCK
    up_scales = (w1s.stride(0), w1s.stride(1), shared_blocks * s1s.stride(0), s1s.stride(0))
    down_scales = (w2s.stride(0), w2s.stride(1), shared_blocks * s2s.stride(1), s2s.stride(0))

    def tiles() -> None:
        if logits is not None:
            launch_select(logits, bias, weights, routed_indices, load, sigmoid, normalise, route_scale)
        h = torch.empty(blocks * block_m, inter, device=x.device, dtype=x.dtype)
        _gate_up[(blocks, triton.cdiv(inter, block_n))](
            x, w1, w3, s1, s3, w1s, w3s, s1s, s3s, h, pair_ids, block_expert, routed_indices, pairs, num_routed,
            num_experts, k_routed, dim, inter, x.stride(0), w1.stride(0), w1.stride(1), inter * s1.stride(0),
            s1.stride(0), h.stride(0), *up_scales, TOPK=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            PRECISION=precision, ONE_BLOCK=one_block, FP8=fp8, num_warps=num_warps, num_stages=num_stages,
        )
        _down[(blocks, triton.cdiv(dim, block_n))](
            h, w2, s2, w2s, s2s, out, pair_ids, block_expert, routed_indices, weights, pairs, num_routed, num_experts,
            k_routed, inter, dim, h.stride(0), w2.stride(0), w2.stride(1), inter * s2.stride(1), s2.stride(0),
            out.stride(0), *down_scales, TOPK=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            PRECISION=precision, ONE_BLOCK=one_block, FP8=fp8, num_warps=num_warps, num_stages=num_stages,
        )
        _pair_sums[(triton.cdiv(dim, _SUM_BLOCK), summed.shape[0])](
            out, summed, out if residual is None else residual, dim, out.stride(0), TOPK=k, BLOCK_N=_SUM_BLOCK,
            RESIDUAL=residual is not None)

    def gemvs() -> None:
        h = torch.empty(pairs, inter, device=x.device, dtype=x.dtype)
        _launch_rows(_gate_up_rows, _gate_up_rows_tuned, inter, pairs, dim, k, (
            x, w1, w3, s1, s3, w1s, w3s, s1s, s3s, h, routed_indices, num_routed, k_routed, dim, inter, x.stride(0),
            w1.stride(0), w1.stride(1), inter * s1.stride(0), s1.stride(0), h.stride(0), *up_scales, *choice),
            CHOOSE=logits is not None, BLOCK_E=triton.next_power_of_2(num_routed), SIGMOID=sigmoid,
            NORMALISE=normalise, FP8=fp8)
        _launch_rows(_down_rows, _down_rows_tuned, dim, pairs, inter, k, (
            h, w2, s2, w2s, s2s, out, routed_indices, weights, summed, out if residual is None else residual,
            counters(x.device, dim), num_routed, k_routed, inter, dim, h.stride(0), w2.stride(0), w2.stride(1),
            inter * s2.stride(1), s2.stride(0), out.stride(0), *down_scales), RESIDUAL=residual is not None, FP8=fp8)

    # without a choice to make the kernel reads none of these
    choice = (logits, bias, weights, load, route_scale) if logits is not None else (x, x, weights, weights, 1.0)
    if one_block and rows is None:
        timed = []

        def forms() -> dict:
            timed.append(True)
            return {"gemvs": gemvs, "tiles": tiles}

        # the GEMV form against the MMA tiles, both replayed from CUDA graphs (the routed experts of one step
        # already pass the L2 cache: no weight copies needed); the tiles where nothing is timed
        rows = tuning.choose("moe_form", _rows_key(x, w1, pairs, k, num_experts), forms, untimed="tiles") == "gemvs"
        if timed and load is not None:  # the timed runs counted their tokens into it
            load.zero_()
    (gemvs if one_block and rows else tiles)()


def _launch_rows(kernel, tuned_kernel, n: int, pairs: int, k_dim: int, topk: int, args: tuple, **meta) -> None:
    """One of the GEMV-form kernels over (n / BLOCK_N, pairs) programs (args[0], args[1]: its input and its routed
    weight), launched as the GEMV's are (`gemv.launch_tiled`): the shape's tuned tile (e4m3 weights among tiles of
    their own), the first candidate under the interpreter or inside a capture."""
    x, weight = args[:2]
    untimed = tile_of(tuning.default_config(weight), k_dim)
    launch_tiled(kernel, tuned_kernel, lambda block_n: (triton.cdiv(n, block_n), pairs), args, {"TOPK": topk, **meta},
                 None, (kernel.__name__, k_dim, n, topk, x.dtype, weight.dtype, x.device), untimed)


_SUM_BLOCK = 512  # columns a program of `_pair_sums`


@launch_fused_moe.register_fake
def _(x, w1, w2, w3, s1, s2, s3, scales, weights, pair_ids, block_expert, routed_indices, out, summed, residual, k,
      blocks, num_experts, one_block, block_m, block_n, block_k, num_warps, num_stages, rows, logits, bias, load,
      sigmoid, normalise, route_scale) -> None:
    return None


def rows_faster(x: torch.Tensor, w1: torch.Tensor, pairs: int, k: int, num_experts: int) -> bool | None:
    """Whether a one-block call (x, the routed w1, `pairs` pairs, k a token over num_experts experts, shared ones
    counted) runs the GEMV form, once its shape's first call has timed it; None before (benchmarks report it)."""
    form = tuning.chosen("moe_form", _rows_key(x, w1, pairs, k, num_experts))
    return None if form is None else form == "gemvs"


def _rows_key(x: torch.Tensor, w1: torch.Tensor, pairs: int, k: int, num_experts: int) -> tuple:
    return pairs, k, num_experts, *w1.shape[1:], x.dtype, w1.dtype, x.device


__all__ = ["MoEConfig", "default_config", "fused_experts", "group_by_expert", "rows_faster"]
