"""Training throughput: seekforge's forward+backward against transformers' DeepseekV3/V2 on the same
config and batch, in one run, with the machine's ceilings and MFU.

    python bench/train.py --config small --batch 4 --seq 512                 # CPU
    python bench/train.py --config 16b --batch 2 --seq 4096 --dtype bfloat16  # one H200
    python bench/train.py ... --json out.json
    python bench/train.py --config 16b --batch 1 --seq 4096 --compile --distributed --skip-transformers
    python bench/train.py --config 16b --batch 1 --seq 4096 --distributed --skip-transformers --max-seq
    python bench/train.py --config 16b --layers 8 --batch 1 --seq 4096 --compile --distributed --mixed ...

MFU = tokens/s x training FLOPs per token (6 x active matmul parameters + causal attention) over the
bf16 (GPU) or fp32 (CPU) matmul ceiling measured in the same run. Both sides run without MTP (transformers
has none) and without the optimizer step; the experts of transformers use its best implementation.

--distributed adds, in the same run, seekforge through the distributed code path on a process group of one
rank (seekforge.parallel.parallelize: FSDP2 over the one-rank mesh, with and without activation checkpointing
per block, compiled with --compile), in the plain side's precision, so that the ratio is the path's own cost;
--keep-gathered adds FSDP2 with every block kept gathered from its forward to its backward, which prices the
backward's second gather; --selective adds FSDP2 with selective checkpointing (parallel.activation_checkpointing
= "selective": the matmuls' and attention's outputs kept, the elementwise work recomputed). --max-seq then also searches, for each seekforge side, the longest --seq (a multiple
of 1024) whose step fits in memory, at --batch, building the model afresh for each try: activation
checkpointing's gain (search without --compile, which would compile every length anew).

Precision: by default every side's weights are in --dtype (bf16 on CUDA) and so are the gradients, and FSDP2
gathers and reduces in it. --mixed is the trainer's precision instead: fp32 master weights and bf16 compute,
the plain model and transformers under bf16 autocast, FSDP2 gathering bf16 and reducing in fp32 (as
`seekforge train` with precision bf16). Its fp32 weights and gradients take twice the memory: --layers cuts
the preset to fewer layers where the whole one does not fit.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _autocast(device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def seekforge_step(cfg, tokens, labels, dtype, device, compile_: bool, distributed: str | None = None,
                   amp: torch.dtype | None = None):
    """The plain model's step, or with `distributed` ("fsdp", "fsdp-kept", "fsdp+ac" or "fsdp+sac": selective
    checkpointing) the step through seekforge.parallel on a one-rank process group. Weights in `dtype`; `amp`: the compute dtype of autocast
    (mixed precision, as the trainer runs it), None for none."""
    with torch.device(device), default_dtype(dtype):
        model = Transformer(cfg.replace(n_mtp_modules=0)).train()
    if distributed is not None:
        from torch.distributed.fsdp import FSDPModule

        from seekforge.parallel.config import ParallelConfig
        from seekforge.parallel.parallelize import parallelize

        checkpointing = {"fsdp+ac": True, "fsdp+sac": "selective"}.get(distributed, False)
        layout = ParallelConfig(activation_checkpointing=checkpointing).resolve(1)
        parallelize(model, one_rank_mesh(layout, device), layout, compute_dtype=amp, compile=compile_)
        if distributed == "fsdp-kept":
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.set_reshard_after_forward(False, recurse=False)
    elif compile_:
        from seekforge.parallel.compile import compile_blocks

        compile_blocks(model, amp)

    def step(tokens=tokens, labels=labels):
        with _autocast(device, amp):
            loss = model.loss(tokens, labels).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return model, step


def _time_side(build, device, warmup: int, iters: int) -> dict:
    """Build a side and time its step: seconds a step and, on CUDA, its memory; {"out_of_memory": True} where the
    model or its step does not fit. The model is freed before returning."""
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if device.type == "cuda" else 0

    def timed() -> float:  # the model lives in this frame only, so that it is freed on an out-of-memory error too
        _, step = build()
        return _measure(step, device, warmup, iters)

    try:
        out = {"step_s": timed()}
    except torch.OutOfMemoryError:
        out = {"out_of_memory": True}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        # the caching allocator freeing its cache to retry a failed cudaMalloc: a synchronising stall
        out["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def one_rank_mesh(layout, device):
    """The meshes of a one-process group (as torchrun would start it with --nproc-per-node 1)."""
    from seekforge.parallel.mesh import build_mesh, init_distributed

    defaults = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    init_distributed(device)
    return build_mesh(layout, device.type)


def longest_seq(step_at, start: int, limit: int, device, unit: int = 1024) -> int:
    """The longest multiple of `unit` from `start` up to `limit` whose step (`step_at(seq)` builds a model and
    runs a step) fits in memory: doubling, then bisection. 0 when `start` does not fit. Each try builds its own
    model, so that a step cut short by running out of memory (FSDP2's state half way) leaves nothing behind."""

    def fits(seq: int) -> bool:
        try:
            step_at(seq)
            _sync(device)
            return True
        except torch.OutOfMemoryError:
            return False
        except RuntimeError as e:  # an allocation outside the caching allocator (cuBLAS's workspace, NCCL's)
            if "out of memory" not in str(e):
                raise
            return False
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if not fits(start):
        return 0
    lo, hi = start, min(start * 2, limit)
    while hi > lo and fits(hi):
        lo, hi = hi, min(hi * 2, limit)
    if hi == lo:
        return lo
    while hi - lo > unit:
        mid = (lo + hi) // 2 // unit * unit
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def transformers_step(cfg, tokens, labels, dtype, device, experts: str, amp: torch.dtype | None = None):
    import transformers

    hf_cfg = cfg.replace(n_mtp_modules=0).to_hf_dict()
    config = transformers.AutoConfig.for_model(**hf_cfg)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa",
                                                              experts_implementation=experts).train()

    def step():
        with _autocast(device, amp):
            loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return model, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small")
    ap.add_argument("--layers", type=int, default=None, help="cut the preset to this many layers (memory)")
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
    ap.add_argument("--keep-gathered", action="store_true",
                    help="with --distributed: also FSDP2 with every block kept gathered from forward to backward")
    ap.add_argument("--selective", action="store_true",
                    help="with --distributed: also FSDP2 with selective activation checkpointing (matmuls kept)")
    ap.add_argument("--mixed", action="store_true",
                    help="fp32 master weights under bf16 autocast on every side (the trainer's precision)")
    ap.add_argument("--max-seq", action="store_true", help="also find each seekforge side's longest --seq that fits")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.max_seq and device.type != "cuda":
        ap.error("--max-seq searches up to the GPU's memory: it needs a CUDA device")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.mixed and dtype == torch.float32:
        ap.error("--mixed computes in --dtype under autocast: give a 16-bit --dtype (bfloat16)")
    weights, amp = (torch.float32, dtype) if args.mixed else (dtype, None)
    cfg = ModelConfig.load(args.config)
    if args.layers is not None:
        if not cfg.n_dense_layers < args.layers <= cfg.n_layers:
            ap.error(f"--layers must be above the {cfg.n_dense_layers} dense layers and at most the preset's "
                     f"{cfg.n_layers}")
        cfg = cfg.replace(n_layers=args.layers)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    labels = torch.roll(tokens, -1, dims=1)
    n_tokens = args.batch * args.seq
    flops_per_token = training_flops_per_token(cfg, args.seq)
    result = {"bench": "train_fwd_bwd", "config": args.config, "layers": cfg.n_layers, "batch": args.batch,
              "seq": args.seq, "dtype": str(dtype).removeprefix("torch."),
              "precision": "fp32 weights, bf16 autocast" if args.mixed else f"{dtype} weights and gradients",
              "machine": machine(device),
              "ceilings": ceilings(device, dtype), "flops_per_token": flops_per_token}
    peak = result["ceilings"]["matmul_flops"]
    name = "seekforge[compiled]" if args.compile else "seekforge"
    paths = [None]
    if args.distributed:
        paths += ["fsdp"] + ["fsdp-kept"] * args.keep_gathered + ["fsdp+ac"] + ["fsdp+sac"] * args.selective
    sides = [(name if path is None else f"seekforge[{path}{',compiled' if args.compile else ''}]",
              lambda t=tokens, l=labels, path=path: seekforge_step(cfg, t, l, weights, device, args.compile, path, amp))
             for path in paths]
    if not args.skip_transformers:
        sides.append((f"transformers[{args.experts}]",
                      lambda: transformers_step(cfg, tokens, labels, weights, device, args.experts, amp)))

    def write():
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))

    for side, build in sides:
        result[side] = _time_side(build, device, args.warmup, args.iters)
        if "step_s" in result[side]:
            tps = n_tokens / result[side]["step_s"]
            result[side].update(tokens_per_s=tps, mfu=tps * flops_per_token / peak)
            print(f"{side:28s} {tps:12.1f} tok/s  MFU {result[side]['mfu']:.3%}"
                  + (f"  peak {result[side]['peak_mem_gb']:.1f} GB, allocator retries "
                     f"{result[side]['alloc_retries']}" if device.type == "cuda" else ""), flush=True)
            if "tokens_per_s" in result[name] and side.startswith("transformers"):
                result["ratio"] = result[name]["tokens_per_s"] / tps
                print(f"seekforge / transformers: {result['ratio']:.2f}x")
            elif "tokens_per_s" in result[name] and side != name:
                result[side]["vs_plain"] = tps / result[name]["tokens_per_s"]
                print(f"{side} / {name}: {result[side]['vs_plain']:.3f}")
        else:
            print(f"{side:28s} out of memory at {args.batch} x {args.seq}", flush=True)
        if args.max_seq and side.startswith("seekforge"):
            def step_at(seq, build=build):
                t = torch.randint(0, cfg.vocab_size, (args.batch, seq), device=device)
                _, step = build(t, torch.roll(t, -1, dims=1))
                step()

            result[side]["max_seq"] = longest_seq(step_at, args.seq, cfg.max_seq_len, device)
            print(f"{side:28s} longest sequence that fits: {result[side]['max_seq']} tokens x {args.batch}", flush=True)
        write()


if __name__ == "__main__":
    main()
