"""Training throughput: seekforge's forward+backward against transformers' DeepseekV3/V2 on the same
config and batch, in one run, with the machine's ceilings and MFU.

    python bench/train.py --config small --batch 4 --seq 512                 # CPU
    python bench/train.py --config 16b --batch 2 --seq 4096 --dtype bfloat16  # one H200
    python bench/train.py ... --json out.json

MFU = tokens/s x training FLOPs per token (6 x active matmul parameters + causal attention) over the
bf16 (GPU) or fp32 (CPU) matmul ceiling measured in the same run. Both sides run without MTP (transformers
has none) and without the optimizer step; the experts of transformers use its best implementation.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import ceilings, machine  # noqa: E402

from seekforge.model.config import ModelConfig  # noqa: E402
from seekforge.model.transformer import Transformer  # noqa: E402
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


def seekforge_step(cfg, tokens, labels, dtype, device, compile_: bool):
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = Transformer(cfg.replace(n_mtp_modules=0)).train()
        finally:
            torch.set_default_dtype(default)
    if compile_:
        from seekforge.parallel.compile import compile_blocks

        compile_blocks(model)

    def step():
        model.loss(tokens, labels).loss.backward()
        for p in model.parameters():
            p.grad = None

    return model, step


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
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    device = torch.device(args.device)
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
    if not args.skip_transformers:
        sides.append((f"transformers[{args.experts}]",
                      lambda: transformers_step(cfg, tokens, labels, dtype, device, args.experts)))
    for name, build in sides:
        model, step = build()
        seconds = _measure(step, device, args.warmup, args.iters)
        tps = n_tokens / seconds
        result[name] = {"tokens_per_s": tps, "step_s": seconds, "mfu": tps * flops_per_token / peak}
        if device.type == "cuda":
            result[name]["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()
        print(f"{name:28s} {tps:12.1f} tok/s  MFU {result[name]['mfu']:.3%}", flush=True)
        del model, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if len(sides) == 2:
        result["ratio"] = result[sides[0][0]]["tokens_per_s"] / result[sides[1][0]]["tokens_per_s"]
        print(f"seekforge / transformers: {result['ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
