"""Tile tuning for the few-row kernels (the GEMVs, the latent query, the MoE's GEMV form): the candidate tiles,
their timing on a shape's first launch, and the choice between two implementations timed as a captured step runs
them.

No one tile is best: the winners of `bench/gemv.py --sweep` range from (2 rows, 2048 wide, 4 warps) for wkv_a to
(4, 256, 1) for the dense MLP's [10944, 2048], and a tile chosen for one row loses to cuBLAS at four (each program
then walks K in more, latency-bound, slices). So on the GPU each shape times the candidate tiles on its first launch
(`tuned`: `triton.autotune`, L2 flushed between runs), and where a kernel has a library counterpart the fastest tile
is timed beside it, both replayed from CUDA graphs (`choose`), as torch.compile's max-autotune weighs its templates
against the library's GEMM. The engine makes that first launch while warming up, before any CUDA graph is captured;
a shape first met inside a capture runs the untimed tile, and under Triton's interpreter the first candidate runs,
untimed.

What was chosen, and how choosing times, is one `Tuning` per process (`current()`); `tuning(...)` swaps in another
with fresh choices for a block of code: tests stand in clocks or force a form there, a benchmark may re-time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

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
# e4m3 weights (one byte each, K contiguous: `fp8_gemv`, the FP8 MoE's GEMV form): the 16-bit winners with twice the
# weight elements a program, so that a slice keeps the bytes in flight of the 16-bit tile it mirrors (2 x 2048 x 2
# bytes -> 4 x 2048 x 1 or 2 x 4096 x 1). block_n divides 128: a program's rows share one row of block scales.
FP8_TILES = [GemvConfig(4, 2048, 4), GemvConfig(4, 2048, 2), GemvConfig(2, 4096, 2), GemvConfig(2, 2048, 2),
             GemvConfig(8, 2048, 4), GemvConfig(4, 4096, 4), GemvConfig(2, 4096, 4), GemvConfig(8, 1024, 4),
             GemvConfig(4, 1024, 2), GemvConfig(4, 512, 1), GemvConfig(2, 1024, 1), GemvConfig(8, 512, 2)]


def candidate_tiles(weight: torch.Tensor) -> list[GemvConfig]:
    """The tiles a GEMV over this weight times: for its layout, whole rows of K-contiguous weights, a few a program
    (the projections; more of them for e4m3); where N is the contiguous dim (MLA's W_UK applied to the query),
    column tiles that read whole lines."""
    if weight.element_size() == 1:
        return FP8_TILES
    return K_CONTIGUOUS_TILES if weight.stride(-1) == 1 else N_CONTIGUOUS_TILES


def default_config(weight: torch.Tensor) -> GemvConfig:
    """The untimed tile for this weight: the first of its `candidate_tiles`."""
    return candidate_tiles(weight)[0]


def _fitting_tiles(named_args, weight: str):
    """The candidates of the weight's (named_args[weight]'s) dtype and layout, no wider than the weight's K
    (N-contiguous: N) needs."""
    k_rows = named_args.get("stride_wk", 1) == 1
    tiles, seen = [], set()
    for cfg in candidate_tiles(named_args[weight]):
        block_n, block_k = cfg.block_n, min(cfg.block_k, triton.next_power_of_2(named_args["K"]))
        if not k_rows:
            block_n = min(block_n, triton.next_power_of_2(named_args["N"]))
        if (block_n, block_k, cfg.num_warps) not in seen:
            seen.add((block_n, block_k, cfg.num_warps))
            tiles.append(triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=cfg.num_warps))
    return tiles


def tuned(kernel, key: list[str], restore_value: tuple[str, ...] = (), weight: str = "w_ptr"):
    """`kernel` choosing BLOCK_N, BLOCK_K and warps among the fitting tiles of its argument `weight` (the matrix it
    streams; e4m3 ones have tiles of their own) on each key's first launch, each timed for ~20 ms with L2 flushed
    between runs (`Tuning.tile_clock`): well under a second a shape, once per process. (Triton's key holds every
    tensor argument's dtype, so a kernel tunes 16-bit and e4m3 weights apart.) `restore_value` names the arguments a
    run accumulates into (atomic counts): each timed run gets them back as they were, so the launch that tunes
    counts once, as every later launch does."""
    name = kernel.__name__.lstrip("_")

    def prune(configs, named_args, **kwargs):
        tiles = _fitting_tiles(named_args, weight)
        pick = current().prune
        return tiles if pick is None else pick(name, tuple({**named_args, **kwargs}[k] for k in key), tiles)

    autotuner = triton.autotune(
        configs=[triton.Config({"BLOCK_N": c.block_n, "BLOCK_K": c.block_k}, num_warps=c.num_warps)
                 for c in K_CONTIGUOUS_TILES + N_CONTIGUOUS_TILES],
        key=key, prune_configs_by={"early_config_prune": prune}, restore_value=list(restore_value),
        do_bench=lambda fn, quantiles: current().tile_clock(fn, quantiles),
    )(kernel)
    _AUTOTUNERS.append(autotuner)
    return autotuner


_AUTOTUNERS: list = []  # every `tuned` kernel: their per-key picks belong to the Tuning that made them


def bench_tile(fn, quantiles) -> list[float]:
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tile_of(config: GemvConfig, k: int) -> list[int]:
    return [config.block_n, min(config.block_k, triton.next_power_of_2(k)), config.num_warps]


def launch_tiled(kernel, tuned, grid, args: tuple, meta: dict, tile: list[int] | None, key: tuple,
                  untimed: list[int]) -> None:
    """Launch `kernel` with `tile` ([BLOCK_N, BLOCK_K, warps]), or for None `tuned`, its autotuned form, with the
    shape's tuned tile: timed on the shape's (`key`'s) first launch, except where nothing is timed (the interpreter,
    a graph being captured), where the `untimed` tile runs. grid(BLOCK_N) -> the launch grid."""
    state = current()
    if tile is None and key not in state.tuned:
        if not state.timed or state.capturing():
            tile = untimed
        else:
            state.tuned.add(key)
    meta = {**meta, **launch_options(args[0].device)}
    if tile is None:
        tuned[lambda m: grid(m["BLOCK_N"])](*args, **meta)
    else:
        block_n, block_k, num_warps = tile
        kernel[grid(block_n)](*args, **meta, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)


def choose(table: str, key: tuple, candidates: Callable[[], dict], untimed: str) -> str:
    """Which implementation a shape (`key`) of `table` runs: on its first call the fastest of `candidates()` (name ->
    a call of no arguments; the first listed wins a tie), each called once (which tunes its tiles), then timed
    replayed from a CUDA graph, as a captured step runs it (`Tuning.clock`): timed call by call, launch overheads
    that a graph does not pay would decide the choice. The choice is kept (`chosen`). Where nothing may be timed
    (the interpreter, a graph being captured) `untimed` runs and nothing is kept; a form `Tuning.forced` names for
    the table is kept untimed."""
    state = current()
    made = state.choices.setdefault(table, {})
    if key not in made:
        if table in state.forced:
            made[key] = state.forced[table]
        elif not state.timed or state.capturing():
            return untimed
        else:
            runs = candidates()
            for run in runs.values():
                run()
            us = {name: state.clock(run) for name, run in runs.items()}
            made[key] = min(us, key=us.get)
    return made[key]


def chosen(table: str, key: tuple) -> str | None:
    """What `choose` keeps for this shape of `table`; None before its first timed (or forced) call."""
    return current().choices.get(table, {}).get(key)


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


INTERPRETED = triton.knobs.runtime.interpret  # Triton's interpreter runs the kernels: nothing to time


@dataclass
class Tuning:
    """How the kernels choose tiles and implementations, and what they chose (the module doc)."""

    timed: bool = not INTERPRETED  # time on a shape's first call; False: the first candidate tile, untimed
    tile_clock: Callable = bench_tile  # (call, quantiles) -> ms at each quantile: one candidate tile
    clock: Callable = replayed_us  # (call) -> microseconds: one implementation, as a graph replays it
    copies: Callable = weight_copies  # weight -> copies a timed GEMV cycles through (no weight left in L2)
    capturing: Callable = capturing  # () -> whether a CUDA graph is being captured (nothing may be timed)
    prune: Callable | None = None  # (kernel, key values, fitting tiles) -> the tiles its tuner may time
    forced: dict = field(default_factory=dict)  # table -> the implementation every shape of it runs, untimed
    tuned: set = field(default_factory=set)  # launch keys whose tile the autotuner has picked
    choices: dict = field(default_factory=dict)  # table -> {shape key: implementation}


_CURRENT = Tuning()


def current() -> Tuning:
    return _CURRENT


@contextlib.contextmanager
def tuning(**settings) -> Iterator[Tuning]:
    """Run a block of code under a fresh Tuning (no tile or implementation chosen yet, the autotuners' picks
    cleared), with `settings` (Tuning's fields) changed; the previous Tuning and its picks come back afterwards."""
    global _CURRENT
    previous, caches = _CURRENT, [dict(t.cache) for t in _AUTOTUNERS]
    _CURRENT = replace(Tuning(), **settings)
    for t in _AUTOTUNERS:
        t.cache.clear()
    try:
        yield _CURRENT
    finally:
        _CURRENT = previous
        for t, cache in zip(_AUTOTUNERS, caches):
            t.cache.clear()
            t.cache.update(cache)
