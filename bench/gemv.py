"""The dense projections and MLA's absorbed per-head products of a small decode step at the 16b shape: the Triton
GEMV (`seekforge.ops.triton.gemv`, what the engine's steps of up to 4 sequences run) against cuBLAS (F.linear and
the batched einsum, the PyTorch path), in bytes per second beside the copy bandwidth measured in the same run;
"runs" is what the engine then runs for the shape (the faster of the two on its first call). Then the fused forms
(`norm_gemv`, `latent_query`, that with the cache store) against the same steps unfused ("before_us").

    python bench/gemv.py                          # rows 1, 2, 4; each shape's tuned tile (what the engine runs)
    python bench/gemv.py --sweep --json out.json  # also time candidate tiles beyond the tuned set
    python bench/gemv.py --fp8 --rows 1           # FP8 weights (below)

`--fp8`: the dense projections' weights in FP8, e4m3 with 128x128 block scales as `fp8_weights` keeps them (the
shared experts' SwiGLU too): the FP8 GEMV (`fp8_gemv`, what `ops.fp8_linear` runs for up to 4 rows) against the
PyTorch path (the weight dequantised into bf16, then F.linear, where "cublas_us" is), with bytes counted at one a
weight plus the scales; MLA's per-head products and the fused forms, which stay bf16, are left out.

Each call is timed over CUDA-graph replays (triton's do_bench_cudagraph), cycling through --layers copies of the
weight so that, as in a model, no call finds its weight in the 50 MB L2. Bytes = the weight plus x and y.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import copy_bandwidth, machine  # noqa: E402
from tiles import fastest  # noqa: E402

from seekforge.model.norm import RMSNorm  # noqa: E402
from seekforge.ops import apply_rotary  # noqa: E402
from seekforge.ops.quant import dequantise_blocks, quantise_blocks  # noqa: E402
from seekforge.ops.triton.gemv import choice, fp8_gemv, gemv, head_gemv, last_tuned_tile, norm_gemv  # noqa: E402
from seekforge.ops.triton.latents import latent_query_kernel as latent_query  # noqa: E402
from seekforge.ops.triton.latents import store_new_latents_kernel as store_new_latents  # noqa: E402
from seekforge.ops.triton.tuning import GemvConfig  # noqa: E402

DENSE = {  # name: (N, K) of a projection at the 16b shape (DeepSeek-V2-Lite)
    "wq": (3072, 2048), "wkv_a": (576, 2048), "wo": (2048, 2048),
    "dense w1/w3": (10944, 2048), "dense w2": (2048, 10944),
}
HEADS, NOPE, V_DIM, LATENT = 16, 128, 128, 512  # MLA's absorbed products: slices of wkv_b [h, d + d_v, c]
SHARED = {"shared w1/w3": (2816, 2048), "shared w2": (2048, 2816)}  # the 2 shared experts' SwiGLU, as one MLP


def fp8_cases(layers: int, dev: torch.device):
    """As `cases`, over FP8 weights (each weight (e4m3, scales)): the FP8 GEMV against dequantise + F.linear."""
    for name, (n, k) in {**DENSE, **SHARED}.items():
        weights = [quantise_blocks(torch.randn(n, k, device=dev) * k ** -0.5) for _ in range(layers)]
        yield (name, weights, lambda m, k=k: torch.randn(m, k, device=dev, dtype=torch.bfloat16),
               lambda x, w, cfg=None: fp8_gemv(x, *w, cfg),
               lambda x, w: F.linear(x, dequantise_blocks(*w, x.dtype)))


def weight_bytes(weight) -> int:
    """Bytes of a weight, or of an FP8 one's e4m3 values and scales."""
    return sum(t.numel() * t.element_size() for t in (weight if isinstance(weight, tuple) else (weight,)))


def cases(layers: int, dev: torch.device):
    """name -> (weights, one per layer; x of m rows; Triton call; cuBLAS call (the PyTorch path))."""
    for name, (n, k) in DENSE.items():
        yield (name, [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k ** -0.5 for _ in range(layers)],
               lambda m, k=k: torch.randn(m, k, device=dev, dtype=torch.bfloat16), gemv, F.linear)
    wkv_b = [torch.randn(HEADS, NOPE + V_DIM, LATENT, device=dev, dtype=torch.bfloat16) * LATENT ** -0.5
             for _ in range(layers)]
    per_head = lambda x, w: torch.einsum("nhk,hjk->nhj", x, w)  # noqa: E731 - the engine's reference
    yield ("W_UK (heads)", [w[:, :NOPE].transpose(1, 2) for w in wkv_b],
           lambda m: torch.randn(m, HEADS, NOPE, device=dev, dtype=torch.bfloat16), head_gemv, per_head)
    yield ("W_UV (heads)", [w[:, NOPE:] for w in wkv_b],
           lambda m: torch.randn(m, HEADS, LATENT, device=dev, dtype=torch.bfloat16), head_gemv, per_head)


def candidates(weight) -> list[GemvConfig]:
    if isinstance(weight, tuple):  # FP8: twice the 16-bit tiles' weights for the same bytes; rows in one scale block
        return [GemvConfig(bn, bk, w) for bn in (1, 2, 4, 8, 16) for bk in (512, 1024, 2048, 4096)
                for w in (1, 2, 4, 8) if bn * bk <= 16384]
    if weight.stride(-1) == 1:  # whole K-contiguous rows
        return [GemvConfig(bn, bk, w) for bn in (1, 2, 4, 8) for bk in (256, 512, 1024, 2048) for w in (1, 2, 4, 8)
                if bn * bk <= 8192]
    return [GemvConfig(bn, bk, w) for bn in (16, 32, 64, 128) for bk in (8, 16, 32, 64) for w in (1, 2, 4, 8)
            if bn * bk <= 8192]


def us_a_call(calls, layers: int) -> float:
    """Microseconds a call of `calls` (one call a layer), replayed as a CUDA graph."""
    return do_bench_cudagraph(calls) * 1e3 / layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", type=int, default=16, help="weight copies called in turn (past L2)")
    ap.add_argument("--sweep", action="store_true", help="also time candidate tiles")
    ap.add_argument("--fp8", action="store_true", help="FP8 weights (e4m3, 128x128 block scales): fp8_gemv")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    results = []
    per_call = partial(us_a_call, layers=args.layers)
    for name, weights, make_x, triton_fn, cublas_fn in (fp8_cases if args.fp8 else cases)(args.layers, dev):
        for m in args.rows:
            x = make_x(m)
            y = cublas_fn(x, weights[0])
            nbytes = weight_bytes(weights[0]) + (x.numel() + y.numel()) * 2
            triton_fn(x, weights[0])  # the shape's first call: its tile tuned, then weighed against cuBLAS
            tuned = last_tuned_tile(fp8=args.fp8)
            row = {"name": name, "weight": list((weights[0][0] if args.fp8 else weights[0]).shape), "rows": m,
                   "bytes": nbytes, "fp8": args.fp8,
                   "cublas_us": per_call(lambda: [cublas_fn(x, w) for w in weights]),
                   "triton_us": per_call(lambda: [triton_fn(x, w, tuned) for w in weights]),
                   "tuned": asdict(tuned), "runs": "triton" if args.fp8 else choice(x, weights[0])}
            if args.sweep:
                row["best"] = fastest(candidates(weights[0]),
                                      lambda cfg: per_call(lambda: [triton_fn(x, w, cfg) for w in weights]))
            for key in ("cublas", "triton"):
                row[f"{key}_bw_share"] = nbytes / (row[f"{key}_us"] * 1e-6) / bw
            print(f"{name:12s} {str(row['weight']):16s} rows {m}: cuBLAS {row['cublas_us']:6.1f} us "
                  f"({row['cublas_bw_share']:.0%}), Triton {row['triton_us']:6.1f} us ({row['triton_bw_share']:.0%}), "
                  f"{row['cublas_us'] / row['triton_us']:.2f}x, tuned {tuple(row['tuned'].values())}, "
                  f"runs {row['runs']}" + (f"; best {row['best'][:2]}" if "best" in row else ""), flush=True)
            results.append(row)
    fused = [] if args.fp8 else [fused_row(name, m, args.layers, dev, bw, *case) for m in args.rows
                                 for name, case in fused_cases(args.layers, m, dev).items()]
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(dev), "copy_bandwidth": bw, "rows": results,
                                         "fused": fused}, indent=1))


def fused_cases(layers: int, m: int, dev: torch.device) -> dict:
    """name -> (per-layer argument tuples, the fused kernel, what the decode block ran before it)."""
    bf16 = dict(device=dev, dtype=torch.bfloat16)
    norm = RMSNorm(2048).to(**bf16).requires_grad_(False)  # else compile traces a backward through the GEMV op
    x = torch.randn(m, 2048, **bf16)
    g = norm.weight.detach()
    projections = [(x, g, norm.eps, torch.randn(3072, 2048, **bf16) * 0.02, torch.randn(576, 2048, **bf16) * 0.02)
                   for _ in range(layers)]
    q = torch.randn(m, HEADS, NOPE + 64, **bf16)
    angles = torch.rand(m, 32, device=dev)
    queries = [(q[..., :NOPE], q[..., NOPE:], w[:, :NOPE].transpose(1, 2), angles.cos(), angles.sin())
               for w in (torch.randn(HEADS, NOPE + V_DIM, LATENT, **bf16) * 0.05 for _ in range(layers))]

    def unfused_projections(x, g, eps, wa, wb):  # g, eps: norm's, as the fused kernel takes them
        h = norm(x)
        return gemv(h, wa), gemv(h, wb)

    def unfused_query(q_nope, q_pe, w_uk, cos, sin):
        pe = apply_rotary(q_pe.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0))[0]
        return torch.cat([head_gemv(q_nope, w_uk), pe], dim=-1)

    # the new latents' cache store in the latent query's launch vs its own (both Triton: the previous engine)
    cache = torch.zeros(64, 64, LATENT + 64, **bf16)
    slots = torch.randperm(64 * 64, device=dev)[:m]
    kv_norm = torch.rand(LATENT, **bf16) + 0.5
    stores = [(*query, (cache, slots, torch.randn(m, LATENT + 64, **bf16), kv_norm, 1e-6)) for query in queries]

    def store_apart(q_nope, q_pe, w_uk, cos, sin, store):
        store_new_latents(*store, cos, sin)
        return latent_query(q_nope, q_pe, w_uk, cos, sin)

    return {"attn_norm + wq + wkv_a": (projections, norm_gemv, torch.compile(unfused_projections, dynamic=False)),
            "W_UK + q rope + cat": (queries, latent_query, torch.compile(unfused_query, dynamic=False)),
            "latent query + store": (stores, latent_query, store_apart)}


def fused_row(name, m, layers, dev, bw, per_layer, fused_fn, unfused_fn) -> dict:
    """The fused kernel against the same steps unfused (compiled, with this module's tuned GEMVs), one call a layer."""
    per_call = partial(us_a_call, layers=layers)
    for fn in (fused_fn, unfused_fn):
        fn(*per_layer[0])  # tuning and compiling outside the graph
    row = {"name": name, "rows": m, "fused_us": per_call(lambda: [fused_fn(*a) for a in per_layer]),
           "before_us": per_call(lambda: [unfused_fn(*a) for a in per_layer])}
    print(f"{name:24s} rows {m}: fused {row['fused_us']:6.1f} us, unfused {row['before_us']:6.1f} us "
          f"({row['before_us'] / row['fused_us']:.2f}x)", flush=True)
    return row


if __name__ == "__main__":
    main()
