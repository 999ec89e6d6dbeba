"""`seekforge info PRESET_OR_PATH`: a model's shape, parameter counts, cache cost, and the GPU memory its weights and
cache take in bf16 and with FP8 weights, built on the meta device."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="show a preset's or checkpoint's shape, parameter counts and the GPU memory "
                                           "it needs in bf16 and with FP8 weights")
    p.add_argument("model", help="preset name (tiny, small, 16b, 236b, 671b) or checkpoint directory")
    p.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help="tokens of context the latent cache holds, all sequences together, for the memory line "
                        "(default: the model's max_seq_len)")
    p.set_defaults(func=run)


def run(args) -> int:
    from seekforge.errors import ConfigError
    from seekforge.model.config import ModelConfig
    from seekforge.model.fp8_weights import memory_bytes, to_fp8_weights
    from seekforge.model.transformer import Transformer
    import torch

    cfg = ModelConfig.load(args.model)
    context = cfg.max_seq_len if args.context is None else args.context
    if context < 0:
        raise ConfigError(f"--context is a number of tokens >= 0, got {context}")
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    counts = model.num_parameters()
    bf16 = memory_bytes(model)
    fp8 = memory_bytes(to_fp8_weights(model))
    cache = cfg.cache_bytes_per_token(2) * context  # the latent cache stays bf16 with FP8 weights
    memory = {"context_tokens": context, "cache_bytes": cache, "bf16_weight_bytes": bf16, "fp8_weight_bytes": fp8,
              "bf16_total_gib": round((bf16 + cache) / 2**30, 2), "fp8_total_gib": round((fp8 + cache) / 2**30, 2)}
    print(json.dumps({"config": cfg.name or args.model, **counts,
                      "cache_bytes_per_token_bf16": cfg.cache_bytes_per_token(2),
                      "full_kv_bytes_per_token_bf16": cfg.full_kv_bytes_per_token(2),
                      "gpu_memory": memory}, indent=2))
    return 0
