"""Training throughput: seekforge's forward+backward against transformers' DeepseekV3/V2 on the same
config and batch, in one run, with the machine's ceilings and MFU.

    python bench/train.py --config small --batch 4 --seq 512                 # CPU
    python bench/train.py --config 16b --batch 2 --seq 4096 --dtype bfloat16  # one H200
    python bench/train.py ... --json out.json
    python bench/train.py --config 16b --batch 1 --seq 4096 --compile --distributed --skip-transformers
    python bench/train.py --config 16b --batch 1 --seq 4096 --distributed --skip-transformers --max-seq

MFU = tokens/s x training FLOPs per token (6 x active matmul parameters + causal attention) over the
bf16 (GPU) or fp32 (CPU) matmul ceiling measured in the same run. Both sides run without MTP (transformers
has none) and without the optimizer step; the experts of transformers use its best implementation.

--distributed adds, in the same run, seekforge through the distributed code path on a process group of one
rank (seekforge.parallel.parallelize: FSDP2 over the one-rank mesh, with and without activation checkpointing
per block, compiled with --compile), its weights in --dtype as the plain side's, so that the ratio is the
path's own cost. --max-seq then also searches, for each seekforge side, the longest --seq (a multiple of 256)
whose step fits in memory, at --batch: activation checkpointing's gain.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import ceilings, machine  # noqa: E402

from seekforge.model.config import ModelConfig  # noqa: E402
from seekforge.model.transformer import Transformer, default_dtype  # noqa: E402
from seekforge.train.flops import training_flops_per_token  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(step, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - start) / iters


def seekforge_step(cfg, tokens, labels, dtype, device, compile_: bool, distributed: str | None = None):
    """The plain model's step, or with `distributed` ("fsdp" or "fsdp+ac") the step through seekforge.parallel on
    a one-rank process group."""
    with torch.device(device), default_dtype(dtype):
        model = Transformer(cfg.replace(n_mtp_modules=0)).train()
    if distributed is not None:
        from seekforge.parallel.config import ParallelConfig
        from seekforge.parallel.parallelize import parallelize

        layout = ParallelConfig(activation_checkpointing=distributed == "fsdp+ac").resolve(1)
        parallelize(model, one_rank_mesh(layout, device), layout, compile=compile_)
    elif compile_:
        from seekforge.parallel.compile import compile_blocks

        compile_blocks(model)

    def step(tokens=tokens, labels=labels):
        model.loss(tokens, labels).loss.backward()
        for p in model.parameters():
            p.grad = None

    return model, step


def one_rank_mesh(layout, device):
    """The meshes of a one-process group (as torchrun would start it with --nproc-per-node 1)."""
    from seekforge.parallel.mesh import build_mesh, init_distributed

    defaults = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    init_distributed(device)
    return build_mesh(layout, device.type)


def longest_seq(step_at, start: int, limit: int, device) -> int:
    """The longest multiple of 256 from `start` up to about `limit` whose step (`step_at(seq)` builds and runs
    one) fits in memory: doubling, then bisection. 0 when `start` does not fit."""

    def fits(seq: int) -> bool:
        try:
            step_at(seq)
            _sync(device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if not fits(start):
        return 0
    lo, hi = start, start * 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 256:
        mid = (lo + hi) // 2 // 256 * 256
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def transformers_step(cfg, tokens, labels, dtype, device, experts: str):
    import transformers

    hf_cfg = cfg.replace(n_mtp_modules=0).to_hf_dict()
    config = transformers.AutoConfig.for_model(**hf_cfg)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa",
                                                              experts_implementation=experts).train()

    def step():
        model(input_ids=tokens, labels=labels).loss.backward()
        for p in model.parameters():
            p.grad = None

    return model, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--experts", default="grouped_mm", help="transformers' experts implementation")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile seekforge's blocks (as `compile=true` trains)")
    ap.add_argument("--distributed", action="store_true",
                    help="also run seekforge through FSDP2 on one rank, with and without activation checkpointing")
    ap.add_argument("--max-seq", action="store_true", help="also find each seekforge side's longest --seq that fits")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.max_seq and device.type != "cuda":
        ap.error("--max-seq searches up to the GPU's memory: it needs a CUDA device")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = ModelConfig.load(args.config)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    labels = torch.roll(tokens, -1, dims=1)
    n_tokens = args.batch * args.seq
    flops_per_token = training_flops_per_token(cfg, args.seq)
    result = {"bench": "train_fwd_bwd", "config": args.config, "batch": args.batch, "seq": args.seq,
              "dtype": str(dtype).removeprefix("torch."), "machine": machine(device),
              "ceilings": ceilings(device, dtype), "flops_per_token": flops_per_token}
    peak = result["ceilings"]["matmul_flops"]
    name = "seekforge[compiled]" if args.compile else "seekforge"
    sides = [(name, lambda: seekforge_step(cfg, tokens, labels, dtype, device, args.compile))]
    if args.distributed:
        for path in ("fsdp", "fsdp+ac"):
            sides.append((f"seekforge[{path}{',compiled' if args.compile else ''}]",
                          lambda path=path: seekforge_step(cfg, tokens, labels, dtype, device, args.compile, path)))
    if not args.skip_transformers:
        sides.append((f"transformers[{args.experts}]",
                      lambda: transformers_step(cfg, tokens, labels, dtype, device, args.experts)))
    for side, build in sides:
        model, step = build()
        seconds = _measure(step, device, args.warmup, args.iters)
        tps = n_tokens / seconds
        result[side] = {"tokens_per_s": tps, "step_s": seconds, "mfu": tps * flops_per_token / peak}
        if device.type == "cuda":
            result[side]["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()
        print(f"{side:28s} {tps:12.1f} tok/s  MFU {result[side]['mfu']:.3%}"
              + (f"  peak {result[side]['peak_mem_gb']:.1f} GB" if device.type == "cuda" else ""), flush=True)
        if args.max_seq and side.startswith("seekforge"):
            def step_at(seq, step=step):
                t = torch.randint(0, cfg.vocab_size, (args.batch, seq), device=device)
                step(t, torch.roll(t, -1, dims=1))

            result[side]["max_seq"] = longest_seq(step_at, args.seq, cfg.max_seq_len, device)
            print(f"{side:28s} longest sequence that fits: {result[side]['max_seq']} tokens x {args.batch}", flush=True)
        del model, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for side, _ in sides[1:]:
        if side.startswith("transformers"):
            result["ratio"] = result[name]["tokens_per_s"] / result[side]["tokens_per_s"]
            print(f"seekforge / transformers: {result['ratio']:.2f}x")
        else:
            result[side]["vs_plain"] = result[side]["tokens_per_s"] / result[name]["tokens_per_s"]
            print(f"{side} / {name}: {result[side]['vs_plain']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
