"""MLA decode attention over the paged latent cache: the Triton kernel and the PyTorch reference, in bytes
per second beside the device-to-device copy bandwidth measured in the same run.

    python bench/mla_decode.py                                 # batch 64, 4096 cached tokens, heads 16 and 128
    python bench/mla_decode.py --sweep --json out.json         # also time the candidate configs

Each call is timed twice: with CUDA events around single calls after an L2 flush (triton's do_bench, which
also counts any gap while the host launches the kernels) and over CUDA-graph replays of back-to-back calls
(triton's do_bench_cudagraph: how the engine's captured decode step runs it). Bytes = every sequence's
cached latents (c + r values a token) read once + q read once + the output written once: the fewest any
implementation must move. FLOPs = 2 * rows * tokens * (c + r + c). The target is bytes / time >=
70% of the copy bandwidth. Inputs are random (never zeros); the cache blocks of each sequence are scattered
at random over the pool, as paging leaves them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import copy_bandwidth, machine  # noqa: E402

from seekforge.ops import paged_mla_decode_reference, plan_paged_attention  # noqa: E402
from seekforge.ops.triton.mla_decode import DecodeConfig, default_config, paged_mla_decode_triton  # noqa: E402

C, R = 512, 64
SCALE = 192 ** -0.5  # DeepSeek-V3: 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)


def problem(batch, context, heads, queries, page, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    blocks = -(-context // page)
    cache = torch.randn(batch * blocks, page, C + R, device=device, dtype=dtype, generator=g)
    tables = torch.randperm(batch * blocks, device=device, generator=g).view(batch, blocks)
    pos = (context - queries + torch.arange(queries, device=device)).expand(batch, queries).contiguous()
    q = torch.randn(batch, queries, heads, C + R, device=device, dtype=dtype, generator=g)
    return q, cache, tables, pos


def candidates(heads: int, queries: int) -> list[DecodeConfig]:
    """Configs worth timing beside the default (each compiles without spills within the shared-memory limit
    for c=512, r=64, checked ahead from the compiler's report). With the indirect block-table load, Triton's
    pipeliner keeps num_stages - 3 cache tiles in flight on the mma.sync path (<= 32 rows) and
    num_stages - 1 on the wgmma path (64 rows)."""
    sq = 1 << (queries - 1).bit_length()
    if heads * sq <= 32:
        bh = max(16, heads * sq) // sq
        w = 4 if bh * sq <= 16 else 8
        return [DecodeConfig(bh, 32, sp, w, st) for st in (2, 6) for sp in (2, 4, 8)] + [
            DecodeConfig(bh, 64, 4, 8, 2), DecodeConfig(bh, 64, 2, 8, 5), DecodeConfig(bh, 64, 4, 8, 5)]
    bh = 64 // sq
    return [DecodeConfig(bh, 64, 1, 8, 2), DecodeConfig(bh, 64, 2, 8, 2), DecodeConfig(bh, 32, 1, 8, 2),
            DecodeConfig(bh, 16, 1, 8, 5)]


def _compile(job) -> str:
    """Worker: compile one config (into Triton's on-disk cache) by running it once on the same shapes."""
    args, heads, cfg = job
    try:
        q, cache, tables, pos = problem(args["batch"], args["context"], heads, args["queries"], args["block_size"],
                                        torch.bfloat16, torch.device("cuda"))
        paged_mla_decode_triton(q, cache, tables, pos, SCALE, C, config=cfg)
        torch.cuda.synchronize()
        return ""
    except Exception as e:  # reported beside the config, which the sweep then skips
        return f"{type(e).__name__}: {str(e)[:200]}"


def _time(fn) -> float:
    """Median seconds per call, CUDA events around each call after an L2 flush (Triton's do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def _time_graph(fn) -> float:
    """Median seconds per call over CUDA-graph replays of back-to-back calls: how the engine's decode step
    runs them, with no gaps for the host's launch work (the data is several times the L2: no flush)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e-3


def _rel_err(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096, help="cached tokens per sequence")
    ap.add_argument("--heads", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--queries", type=int, default=1, help="queries per sequence (2 with one MTP draft)")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--sweep", action="store_true", help="also time the candidate configs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/mla_decode.py times the Triton kernel and needs a CUDA device")
    device = torch.device("cuda")
    shape = {k: getattr(args, k) for k in ("batch", "context", "queries", "block_size")}
    jobs = [(shape, h, cfg) for h in args.heads for cfg in candidates(h, args.queries)] if args.sweep else []
    compile_errors = {}
    if jobs:  # compile the candidates side by side; timing below stays one kernel at a time
        with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1), mp_context=get_context("spawn")) as ex:
            compile_errors = {(h, cfg): err for (_, h, cfg), err in zip(jobs, ex.map(_compile, jobs)) if err}

    copy_bw = copy_bandwidth(device)
    result = {"bench": "mla_decode", **shape, "c": C, "r": R, "dtype": "bfloat16", "machine": machine(device),
              "copy_bytes_per_s": copy_bw, "heads": {}}
    rows = []
    for h in args.heads:
        q, cache, tables, pos = problem(args.batch, args.context, h, args.queries, args.block_size, torch.bfloat16,
                                        device)
        nbytes = (args.batch * args.context * (C + R) + q.numel() + q[..., :C].numel()) * q.element_size()
        flops = 2 * args.batch * args.queries * h * args.context * (2 * C + R)
        plan = plan_paged_attention(tables, pos, args.block_size, args.context)
        ref = paged_mla_decode_reference(q.float(), cache.float(), plan, SCALE, C)

        def record(name, fn, cfg=None):
            try:
                err = _rel_err(fn(), ref)
                seconds = _time(fn)
            except Exception as e:  # a candidate that fails to build or run is reported, not fatal
                row = {"name": name, "config": cfg and asdict(cfg), "error": f"{type(e).__name__}: {str(e)[:200]}"}
                rows.append((h, row))
                return row
            row = {"name": name, "config": cfg and asdict(cfg), "seconds": seconds, "bytes_per_s": nbytes / seconds,
                   "fraction_of_copy": nbytes / seconds / copy_bw, "flops_per_s": flops / seconds, "rel_err": err}
            try:
                row["graph_seconds"] = _time_graph(fn)
                row["graph_fraction_of_copy"] = nbytes / row["graph_seconds"] / copy_bw
            except Exception as e:  # keep the event timing; say why the graph one is missing
                row["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append((h, row))
            return row

        default = default_config(args.batch, args.queries, h, args.block_size, tables.shape[1] * args.block_size,
                                 device)
        entry = {"bytes": nbytes, "flops": flops}
        entry["triton"] = record("triton", lambda: paged_mla_decode_triton(q, cache, tables, pos, SCALE, C), default)
        entry["reference"] = record("reference", lambda: paged_mla_decode_reference(q, cache, plan, SCALE, C))
        sweep = []
        for _, hh, cfg in jobs:
            if hh != h:
                continue
            if (h, cfg) in compile_errors:
                rows.append((h, {"name": "sweep", "config": asdict(cfg), "error": compile_errors[(h, cfg)]}))
                sweep.append(rows[-1][1])
                continue
            sweep.append(record("sweep", lambda cfg=cfg: paged_mla_decode_triton(q, cache, tables, pos, SCALE, C,
                                                                                  config=cfg), cfg))
        if sweep:  # the default again: the spread between its two timings is the noise floor
            entry["triton_again"] = record("triton", lambda: paged_mla_decode_triton(q, cache, tables, pos, SCALE, C),
                                           default)
            entry["sweep"] = sweep
        result["heads"][str(h)] = entry
        del q, cache, tables, pos, plan, ref
        torch.cuda.empty_cache()

    print(f"\ncopy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write); batch {args.batch}, {args.context} cached "
          f"tokens, {args.queries} query, block {args.block_size}, c={C} r={R}, bf16")
    print(f"{'heads':>5} {'what':9} {'config (bh bn splits warps stages)':36} {'us':>8} {'TB/s':>6} "
          f"{'copy%':>6} {'TFLOP/s':>8} {'rel_err':>8} {'graph us':>9} {'copy%':>6}")
    for h, row in rows:
        desc = " ".join(str(v) for v in row["config"].values()) if row["config"] else ""
        if "error" in row:
            print(f"{h:>5} {row['name']:9} {desc:36} {row['error'][:60]}")
            continue
        graph = (f"{row['graph_seconds'] * 1e6:9.1f} {row['graph_fraction_of_copy']:6.1%}" if "graph_seconds" in row
                 else f" {row['graph_error'][:40]}")
        print(f"{h:>5} {row['name']:9} {desc:36} {row['seconds'] * 1e6:8.1f} {row['bytes_per_s'] / 1e12:6.2f} "
              f"{row['fraction_of_copy']:6.1%} {row['flops_per_s'] / 1e12:8.1f} {row['rel_err']:8.1e} {graph}")
    if args.json:
        path = Path(args.json)
        with tempfile.NamedTemporaryFile("w", dir=path.parent or ".", delete=False, suffix=".tmp") as f:
            json.dump(result, f, indent=2)
        os.replace(f.name, path)


if __name__ == "__main__":
    main()
