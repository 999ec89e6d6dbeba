"""`seekforge serve PATH`: serve a checkpoint to any OpenAI client (chat and completions, streamed or not).

    seekforge serve runs/quickstart/base/final --port 8000 --api-key "$KEY" --served-model-name tiny

The port opens at once; /health answers 503 until the model is loaded and has generated a token.
With --kv-cpu-gb (and --kv-disk DIR) prefix-cache blocks also live in CPU memory (and on disk, across restarts).
The API key may also come from the SEEKFORGE_API_KEY environment variable (safer than argv, which
other users of the machine can read). SIGTERM finishes the requests in flight, then exits.
--dual-chain runs the rule chain beside the model on text requests: responses carry its decision in a
`dual_chain` field (which chain answered, the answer, the model's confidence), which OpenAI's client ignores.
"""

from __future__ import annotations

import os


def register(subparsers) -> None:
    from seekforge.commands.generate import add_dual_chain_args, add_engine_args

    p = subparsers.add_parser("serve",
                              help="serve a checkpoint behind an OpenAI-compatible HTTP API (and a chat page at /)")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SEEKFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $SEEKFORGE_API_KEY, else open)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients ask for (default: PATH as given)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per engine step at most")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="sequences waiting for a slot at most; past it requests get 503 (default: 1024)")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="paged latent cache size in GiB (default: 90%% of the GPU's total memory less what is "
                        "already in use; 1 GiB on CPU)")
    p.add_argument("--kv-cpu-gb", type=float, default=0.0, metavar="GIB",
                   help="a KV tier in CPU memory (pinned on a GPU), in GiB: every prefix-cache block is copied there, "
                        "and a prompt whose prefix the GPU cache evicted gets it back from there instead of "
                        "recomputing it (default: 0, no tiers)")
    p.add_argument("--kv-disk", default=None, metavar="DIR",
                   help="a KV tier on disk under the CPU one (needs --kv-cpu-gb): blocks entering the CPU tier are "
                        "written to DIR too, and a restarted server with the same model (same weights, dtype and "
                        "block size) reuses them; another model's blocks there are never read")
    p.add_argument("--kv-disk-gb", type=float, default=16.0, metavar="GIB",
                   help="GiB of DIR the disk tier may fill; least recently used blocks go first (default: 16)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay decode steps as CUDA graphs (GPU only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks: prefill and the captured decode step")
    p.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                   help="prepare each decode step while the previous one runs (auto: on CUDA)")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"],
                   help="the ops' implementations: Triton's kernels on CUDA (auto), PyTorch's everywhere (torch), or "
                        "Triton's, on the CPU too under TRITON_INTERPRET=1 (triton)")
    p.add_argument("--adaptive-experts", action="store_true",
                   help="under load (requests waiting for a slot, or steps slower than --adaptive-step-latency), "
                        "route each token to fewer experts, a level at a time (e.g. 6 -> 4 -> 2), and back when the "
                        "load eases; a request keeps a minimum with its min_experts field (the model's k: never "
                        "lowered). Off by default; the current k and the time at each k are Prometheus metrics")
    p.add_argument("--adaptive-expert-levels", type=int, nargs="+", default=None, metavar="K",
                   help="the routed top-k levels, the model's k first (default: k, about 2/3 and 1/3 of it)")
    p.add_argument("--adaptive-step-latency", type=float, default=None, metavar="SECONDS",
                   help="a step this slow counts as saturation too (default: the queue alone)")
    p.add_argument("--sparse-heads", type=float, default=0.0, metavar="FRACTION",
                   help="experimental dynamic sparse heads: each decoded token skips this fraction of the attention "
                        "heads, those of smallest content-query norm (prefill keeps all); a quality cost for little "
                        "speed, see docs/EXPERIMENTAL.md (default: 0, off)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_dual_chain_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from seekforge.engine.config import EngineConfig
    from seekforge.errors import CheckpointError, ConfigError
    from seekforge.server import ServerConfig, serve

    path = Path(args.path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json): point at a directory "
                              "written by save_pretrained or downloaded from the Hugging Face hub")
    for name in ("port", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.kv_cache_gib is not None and args.kv_cache_gib <= 0:
        raise ConfigError(f"--kv-cache-gib must be positive, got {args.kv_cache_gib}")
    if args.kv_cpu_gb < 0 or args.kv_disk_gb <= 0:
        raise ConfigError(f"--kv-cpu-gb must be at least 0 and --kv-disk-gb positive, got {args.kv_cpu_gb} and "
                          f"{args.kv_disk_gb}")
    if args.kv_disk is not None and not args.kv_cpu_gb:
        raise ConfigError("--kv-disk needs --kv-cpu-gb: the disk tier reads and writes through the CPU tier")
    engine = EngineConfig(
        dtype=args.dtype, device=args.device, weights_dtype="fp8" if args.fp8_weights else None,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=args.max_waiting,
        num_speculative_tokens=args.speculative_tokens,
        kv_cache_memory=int(args.kv_cache_gib * 2**30) if args.kv_cache_gib else None, cuda_graphs=args.cuda_graphs,
        compile=args.compile, async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
        kernels=args.kernels, kv_cpu_gb=args.kv_cpu_gb, kv_disk=args.kv_disk, kv_disk_gb=args.kv_disk_gb,
        adaptive_experts=args.adaptive_experts, adaptive_expert_levels=args.adaptive_expert_levels,
        adaptive_step_latency=args.adaptive_step_latency, sparse_heads=args.sparse_heads)
    from seekforge.commands.generate import dual_chain_from_args

    config = ServerConfig(model_path=args.path, served_model_names=args.served_model_name or [], host=args.host,
                          port=args.port, api_key=args.api_key or None, engine=engine, log_level=args.log_level,
                          dual_chain=dual_chain_from_args(args))
    return serve(config)
