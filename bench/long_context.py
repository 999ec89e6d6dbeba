"""Serving long prompts on the inference engine: time to first token, decode tokens/s and cache bytes per
sequence at long prompt lengths, against a per-head K/V cache of the same model.

    python bench/long_context.py                                    # CPU smoke run: a cut-down shape, short prompts
    python bench/long_context.py --device cuda --dtype bfloat16 --preset 16b --layers 0 \
        --lengths 32768 131072 --chunk 8192 --cuda-graphs --json docs/benchmarks/long-context-16b-h100.json

One prompt of random tokens per length (random weights: the time does not depend on what they say), prefix
caching off so every run prefills the whole prompt. The engine prefills it in chunks of --chunk tokens (chunked
prefill) and decodes with the absorbed-MLA paged cache (the split-K decode kernel on a GPU).
- TTFT: wall time of a request for one token, prompt included (best of --repeats).
- decode tokens/s: (--new-tokens - 1) over the time after the first token, at that context (best of --repeats).
- cache bytes per sequence: the engine's latent cache (kv_lora_rank + qk_rope_head_dim per token per layer) at
  the prompt's length plus the new tokens, against what per-head K and V of every head would take
  (n_heads x (qk_head_dim + v_head_dim) per token per layer), both in the run's dtype; computed from the shape
  (`ModelConfig.cache_bytes_per_token`, `full_kv_bytes_per_token`), the same bytes the engine allocates per token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from ceilings import machine  # noqa: E402

from seekforge import LLM, SamplingParams  # noqa: E402
from seekforge.model import ModelConfig, Transformer  # noqa: E402


def timed(llm: LLM, prompt: list[int], new: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="16b", help="model shape preset (random weights)")
    ap.add_argument("--layers", type=int, default=2, help="override n_layers; 0 keeps the preset's (GPU runs)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="prompt lengths in tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (max_num_batched_tokens)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kv-cache-memory", type=int, default=None, help="cache bytes (default: what the lengths need)")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay decode steps from CUDA graphs (GPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = ModelConfig.preset(args.preset)
    longest = max(args.lengths) + args.new_tokens
    cfg = cfg.replace(n_layers=args.layers or cfg.n_layers, n_mtp_modules=0, max_seq_len=max(cfg.max_seq_len, longest))
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg).to(dtype=dtype).eval()
    elsize = torch.empty(0, dtype=dtype).element_size()
    latent, full = cfg.cache_bytes_per_token(elsize), cfg.full_kv_bytes_per_token(elsize)
    llm = LLM(model, max_num_seqs=1, max_model_len=longest, max_num_batched_tokens=args.chunk,
              enable_prefix_caching=False, cuda_graphs=args.cuda_graphs,
              kv_cache_memory=args.kv_cache_memory or 2 * latent * longest + (64 << 20))
    results = {"preset": args.preset, "layers": cfg.n_layers, "params": model.num_parameters(), "dtype": args.dtype,
               "device": str(device), "machine": machine(device), "chunk": args.chunk, "new_tokens": args.new_tokens,
               "cuda_graphs": args.cuda_graphs, "threads": torch.get_num_threads(),
               "cache_bytes_per_token": latent, "full_kv_bytes_per_token": full,
               "engine_cache_bytes_per_token": llm.cache_bytes_per_token, "lengths": []}
    rng = torch.Generator().manual_seed(1)
    timed(llm, torch.randint(2, cfg.vocab_size, (min(args.lengths),), generator=rng).tolist(), 2, 1)  # warm-up
    for length in args.lengths:
        prompt = torch.randint(2, cfg.vocab_size, (length,), generator=rng).tolist()
        ttft = timed(llm, prompt, 1, args.repeats)
        total = timed(llm, prompt, args.new_tokens, args.repeats)
        tokens = length + args.new_tokens
        row = {"prompt": length, "ttft_s": ttft, "prefill_tokens_per_s": length / ttft,
               "decode_tokens_per_s": (args.new_tokens - 1) / max(total - ttft, 1e-9),
               "cache_bytes_per_sequence": latent * tokens, "full_kv_bytes_per_sequence": full * tokens,
               "full_over_latent": full / latent}
        if device.type == "cuda":
            row["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
        results["lengths"].append(row)
        print(f"prompt {length}: TTFT {ttft:.3f} s ({row['prefill_tokens_per_s']:.0f} tok/s prefill), decode "
              f"{row['decode_tokens_per_s']:.1f} tok/s; cache {row['cache_bytes_per_sequence'] / 2**30:.3f} GiB per "
              f"sequence against {row['full_kv_bytes_per_sequence'] / 2**30:.3f} GiB per-head K/V "
              f"({row['full_over_latent']:.1f}x)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
