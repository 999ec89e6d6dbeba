"""Routed experts at the 16b shape: the fused Triton MoE kernels against the model's grouped matmuls
(`torch._grouped_mm`, what the model and transformers' "grouped_mm" experts run), in bytes per second beside
the copy bandwidth measured in the same run.

    python bench/moe.py                          # tokens 1 .. 4096, default tiles
    python bench/moe.py --sweep 1 64 512 --json out.json  # also time candidate tiles at 3 sizes

Each call is timed over CUDA-graph replays (triton's do_bench_cudagraph: how a captured decode step runs
it), cycling through --layers sets of weights so that, as in a model, no call finds its weights in L2
(timing one set let them sit in the 50 MB L2 between replays: at one token the two kernels showed 19 + 9 us
there against 27 + 16 us inside the engine's step). At one or two tokens both forms are timed (the MMA tiles and
the GEMVs), and the row says which one the engine keeps. Bytes = the weights of every expert that some token chose,
read once, plus the tokens in and out: the fewest any implementation must move. Routing is uniform at random (top-k of random scores), as a balanced
model's is. `--shared 2` adds the 16b shape's two shared experts as the engine runs them: joined to the fused pass
up to FUSED_SHARED_TOKENS tokens (a batch-1 decode step reads 8 experts in one pass), a separate MLP beyond,
and always a separate MLP beside the grouped matmuls.

    python bench/moe.py --tokens 1 --shared 2 --sweep 1   # the engine's batch-1 step, candidate tiles

`--fp8`: the experts' weights (shared ones too) in FP8, e4m3 with 128x128 block scales as `fp8_weights` keeps them:
the fused kernels read them as they are, against the FP8 experts' PyTorch path (the weights dequantised, then the
grouped or per-row matmuls), with bytes counted at one a weight. (Its sweep's tiles all lie within one scale block,
as the FP8 kernels need.)

    python bench/moe.py --fp8 --tokens 1 2 4 64 --shared 2 --sweep 1 64
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import copy_bandwidth, machine  # noqa: E402
from tiles import fastest  # noqa: E402

from seekforge.model.fp8_weights import FP8WeightLinear, _convert_experts  # noqa: E402
from seekforge.model.mlp import MLP  # noqa: E402
from seekforge.model.moe import Experts  # noqa: E402
from seekforge.ops import FUSED_SHARED_TOKENS  # noqa: E402
from seekforge.ops.triton.moe import (ONE_BLOCK_PER_PAIR, MoEConfig, default_config, fused_experts,  # noqa: E402
                                      rows_faster)


def problem(n, experts, k, dim, inter, layers, shared=0, seed=0, fp8=False):
    """`layers` sets of expert weights (a model's layers), so the timed calls read weights the L2 cache does not
    hold, as a decode step does, each with its shared experts' MLP (None without), converted to FP8 weights where
    `fp8`; one token batch and routing for all."""
    torch.manual_seed(seed)
    with torch.device("cuda"):
        exs = [Experts(experts, dim, inter).to(torch.bfloat16) for _ in range(layers)]
        mlps = [MLP(dim, shared * inter).to(torch.bfloat16) if shared else None for _ in range(layers)]
        for module in exs + [m for m in mlps if m is not None]:
            for p in module.parameters():
                torch.nn.init.normal_(p, std=dim ** -0.5)
        if fp8:
            for ex, mlp in zip(exs, mlps):
                _convert_experts(ex)
                if mlp is not None:
                    mlp.w1, mlp.w2, mlp.w3 = (FP8WeightLinear(lin.weight) for lin in (mlp.w1, mlp.w2, mlp.w3))
        x = torch.randn(n, dim, dtype=torch.bfloat16)
        indices = torch.rand(n, experts).topk(k, dim=-1).indices
        weights = torch.rand(n, k)
    return list(zip(exs, mlps)), x, weights, indices


def candidates() -> list[MoEConfig]:
    """Tiles whose pipelined loads (stages x (rows + two weight tiles) x BLOCK_K, bf16) fit shared memory."""
    return [MoEConfig(bm, bn, bk, 8 if bm * bn >= 64 * 128 else 4, st)
            for bm in (16, 32, 64) for bn in (32, 64, 128) for bk in (64, 128) for st in (3, 5)
            if st * (bm + 2 * bn) * bk * 2 <= 200 * 1024]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=8,
                    help="distinct weight sets called in turn (default 8: 8.9 GB at the 16b shape, far past L2)")
    ap.add_argument("--shared", type=int, default=0, help="shared experts (the 16b shape has 2), as the engine runs them")
    ap.add_argument("--sweep", type=int, nargs="*", help="also time candidate tiles at these token counts")
    ap.add_argument("--fp8", action="store_true", help="FP8 expert weights (e4m3, 128x128 block scales)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for n in args.tokens:
        layers, x, weights, indices = problem(n, args.experts, args.topk, args.dim, args.inter, args.layers,
                                              args.shared, fp8=args.fp8)
        chosen = indices.unique().numel()
        weight_bytes = 1 if args.fp8 else 2
        nbytes = (chosen + args.shared) * 3 * args.dim * args.inter * weight_bytes + 2 * n * args.dim * 2
        joined = args.shared and n <= FUSED_SHARED_TOKENS
        k_all = args.topk + (args.shared if joined else 0)  # a token's pairs and the experts, joined shared ones too
        experts_all = args.experts + (args.shared if joined else 0)

        def fused(cfg=None, rows=None):
            for ex, mlp in layers:
                shared = (mlp.w1.weight, mlp.w2.weight, mlp.w3.weight) if joined else None
                scales = shared_scales = None
                if args.fp8:
                    scales = ex.w1_scale_inv, ex.w2_scale_inv, ex.w3_scale_inv
                    if joined:
                        shared_scales = mlp.w1.weight_scale_inv, mlp.w2.weight_scale_inv, mlp.w3.weight_scale_inv
                y = fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices, cfg, shared, rows, scales=scales,
                                  shared_scales=shared_scales)
                if mlp is not None and not joined:
                    y = y + mlp(x)

        def grouped():
            for ex, mlp in layers:
                y = ex(x, weights, indices)[0]
                if mlp is not None:
                    y = y + mlp(x)

        per_call = lambda fn: do_bench_cudagraph(fn) * 1e3 / args.layers  # noqa: E731 - us per layer's call
        row = {"tokens": n, "experts_read": chosen, "shared": args.shared, "fp8": args.fp8, "bytes": nbytes,
               "layers": args.layers, "fused_us": per_call(fused), "grouped_us": per_call(grouped),
               "default": asdict(default_config(n * k_all, experts_all, 2, weight_bytes))}
        if n * k_all <= ONE_BLOCK_PER_PAIR:  # both forms of one or two tokens, and which one the engine keeps
            row["tiles_us"], row["gemvs_us"] = per_call(lambda: fused(rows=False)), per_call(lambda: fused(rows=True))
            row["runs"] = "gemvs" if rows_faster(x, layers[0][0].w1, n * k_all, k_all, experts_all) else "tiles"
        if args.sweep and n in args.sweep:
            row["best"] = fastest(candidates(), lambda cfg: per_call(lambda: fused(cfg)), keep=5)
        for key in ("fused", "grouped"):
            row[f"{key}_bw_share"] = nbytes / (row[f"{key}_us"] * 1e-6) / bw
        print(f"tokens {n:5d}: experts read {chosen:2d}, fused {row['fused_us']:8.1f} us "
              f"({row['fused_bw_share']:.1%} of copy BW), grouped {row['grouped_us']:8.1f} us "
              f"({row['grouped_bw_share']:.1%}), {row['grouped_us'] / row['fused_us']:.2f}x"
              + (f"; MMA tiles {row['tiles_us']:.1f} us, GEMVs {row['gemvs_us']:.1f} us, runs {row['runs']}"
                 if "runs" in row else "")
              + (f"; best {row['best'][:2]}" if "best" in row else ""), flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(dev), "copy_bandwidth": bw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
