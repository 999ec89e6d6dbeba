"""`seekforge info PRESET_OR_PATH`: a model's shape, parameter counts and cache cost, built on the meta device."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="show a preset's or checkpoint's shape and parameter counts")
    p.add_argument("model", help="preset name (tiny, small, 16b, 236b, 671b) or checkpoint directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from seekforge.model.config import ModelConfig
    from seekforge.model.transformer import Transformer
    import torch

    cfg = ModelConfig.load(args.model)
    with torch.device("meta"):
        model = Transformer(cfg)
    counts = model.num_parameters()
    print(json.dumps({"config": cfg.name or args.model, **counts,
                      "cache_bytes_per_token_bf16": cfg.cache_bytes_per_token(2),
                      "full_kv_bytes_per_token_bf16": cfg.full_kv_bytes_per_token(2)}, indent=2))
    return 0
