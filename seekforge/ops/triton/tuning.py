"""Tile tuning for the few-row kernels (the GEMVs, the latent query, the MoE's GEMV form): the candidate tiles,
their timing on a shape's first launch, and the choice between two implementations timed as a captured step runs
them.

No one tile is best: the winners of `bench/gemv.py --sweep` range from (2 rows, 2048 wide, 4 warps) for wkv_a to
(4, 256, 1) for the dense MLP's [10944, 2048], and a tile chosen for one row loses to cuBLAS at four (each program
then walks K in more, latency-bound, slices). So on the GPU each shape times the candidate tiles on its first launch
(`tuned`: `triton.autotune`, L2 flushed between runs), and where a kernel has a library counterpart the fastest tile
is timed beside it, both replayed from CUDA graphs (`fastest`), as torch.compile's max-autotune weighs its templates
against the library's GEMM. The engine makes that first launch while warming up, before any CUDA graph is captured;
a shape first met inside a capture runs the untimed tile, and under Triton's interpreter the first candidate runs,
untimed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.testing

from seekforge.ops.triton.pdl import launch_options


@dataclass(frozen=True)
class GemvConfig:
    """Weight rows a program (BLOCK_N), the slice of K read at a time (BLOCK_K), warps a program."""
    block_n: int = 2
    block_k: int = 2048
    num_warps: int = 2


# The tiles a shape's first call times: each one of the fastest of bench/gemv.py's sweep for some shape of the 16b
# model at 1, 2 or 4 rows. The first of each list is what runs untimed (the interpreter).
K_CONTIGUOUS_TILES = [GemvConfig(2, 2048, 2), GemvConfig(2, 1024, 2), GemvConfig(2, 512, 1), GemvConfig(2, 256, 1),
                      GemvConfig(4, 256, 1), GemvConfig(2, 2048, 4), GemvConfig(4, 2048, 4), GemvConfig(4, 1024, 4),
                      GemvConfig(4, 512, 4)]
N_CONTIGUOUS_TILES = [GemvConfig(16, 64, 4), GemvConfig(16, 64, 1), GemvConfig(16, 64, 8), GemvConfig(32, 32, 2),
                      GemvConfig(16, 128, 4), GemvConfig(32, 64, 4)]


def default_config(weight: torch.Tensor) -> GemvConfig:
    """The untimed tile for this weight's layout: whole rows of K-contiguous weights, a few a program (the
    projections); where N is the contiguous dim (MLA's W_UK applied to the query), column tiles that read whole
    lines."""
    return (K_CONTIGUOUS_TILES if weight.stride(-1) == 1 else N_CONTIGUOUS_TILES)[0]


def _fitting_tiles(configs, named_args, **kwargs):
    """The candidates of the weight's layout, no wider than the weight's K (N-contiguous: N) needs."""
    k_rows = named_args.get("stride_wk", 1) == 1
    tiles, seen = [], set()
    for cfg in K_CONTIGUOUS_TILES if k_rows else N_CONTIGUOUS_TILES:
        block_n, block_k = cfg.block_n, min(cfg.block_k, triton.next_power_of_2(named_args["K"]))
        if not k_rows:
            block_n = min(block_n, triton.next_power_of_2(named_args["N"]))
        if (block_n, block_k, cfg.num_warps) not in seen:
            seen.add((block_n, block_k, cfg.num_warps))
            tiles.append(triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=cfg.num_warps))
    return tiles


def tuned(kernel, key: list[str], restore_value: tuple[str, ...] = ()):
    """`kernel` choosing BLOCK_N, BLOCK_K and warps among the fitting tiles on each key's first launch, each timed
    for ~20 ms with L2 flushed between runs: well under a second a shape, once per process. `restore_value` names
    the arguments a run accumulates into (atomic counts): each timed run gets them back as they were, so the
    launch that tunes counts once, as every later launch does."""
    return triton.autotune(
        configs=[triton.Config({"BLOCK_N": c.block_n, "BLOCK_K": c.block_k}, num_warps=c.num_warps)
                 for c in K_CONTIGUOUS_TILES + N_CONTIGUOUS_TILES],
        key=key, prune_configs_by={"early_config_prune": _fitting_tiles}, restore_value=list(restore_value),
        do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles),
    )(kernel)


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tile_of(config: GemvConfig, k: int) -> list[int]:
    return [config.block_n, min(config.block_k, triton.next_power_of_2(k)), config.num_warps]


def launch_tiled(kernel, tuned, grid, args: tuple, meta: dict, tile: list[int] | None, key: tuple,
                  untimed: list[int]) -> None:
    """Launch `kernel` with `tile` ([BLOCK_N, BLOCK_K, warps]), or for None `tuned`, its autotuned form, with the
    shape's tuned tile: timed on the shape's (`key`'s) first launch, except inside a graph being captured, where
    nothing may be timed and the `untimed` tile runs. grid(BLOCK_N) -> the launch grid."""
    if tile is None and key not in _TUNED:
        if capturing():
            tile = untimed
        else:
            _TUNED.add(key)
    meta = {**meta, **launch_options(args[0].device)}
    if tile is None:
        tuned[lambda m: grid(m["BLOCK_N"])](*args, **meta)
    else:
        block_n, block_k, num_warps = tile
        kernel[grid(block_n)](*args, **meta, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)


_TUNED: set[tuple] = set()  # (kernel, shape) keys whose tile the autotuner has picked


def fastest(candidates: dict) -> str:
    """The name of the fastest of `candidates` (name -> a call of no arguments; the first listed wins a tie): each
    called once (which tunes its tiles), then timed replayed from a CUDA graph, as a captured step runs it: timed call
    by call (`do_bench`, L2 flushed before each), launch overheads that a graph does not pay decide the choice."""
    for run in candidates.values():
        run()
    us = {name: replayed_us(run) for name, run in candidates.items()}
    return min(us, key=us.get)


def replayed_us(run) -> float:
    return triton.testing.do_bench_cudagraph(run, rep=5) * 1e3


def weight_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """The weight and copies of it (same strides) that together pass twice the L2 cache, as a step's layers do: a
    call cycling through them finds no weight cached."""
    span = 1 + sum((n - 1) * stride for n, stride in zip(weight.shape, weight.stride()))
    l2 = torch.cuda.get_device_properties(weight.device).L2_cache_size
    copies = [weight]
    for _ in range(min(15, -(-2 * l2 // (span * weight.element_size())) - 1)):
        copies.append(weight.new_empty(span).as_strided(weight.shape, weight.stride()).copy_(weight))
    return copies
