"""A tiny checkpoint in DeepSeek-V3's FP8 layout, written by hand: every linear weight of the decoder layers (the
attention projections, kv_b_proj included, the dense and shared MLPs, each expert) as float8_e4m3fn with a
`weight_scale_inv` per 128x128 block (scale = the block's amax / 448, the value q * scale), the embedding, head,
norms and router in bf16, and quantization_config in config.json as DeepSeek-V3's."""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import seekforge

FP8 = torch.float8_e4m3fn
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [128, 128]}
# DeepSeek's FP8 tensors: the linear layers of the decoder layers (the router, mlp.gate, stays bf16)
FP8_KEY = re.compile(r"model\.layers\.\d+\.(self_attn\.\w+_proj(_with_mqa)?|mlp\.(shared_experts\.|experts\.\d+\.)?"
                     r"(gate|up|down)_proj)\.weight$")


def quantise_by_hand(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block by block: scale = amax / 448 (1 for a block of zeros), q = w / scale in e4m3."""
    n, k = w.shape
    scale = torch.ones(-(-n // 128), -(-k // 128))
    q = torch.empty(n, k, dtype=FP8)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            if block.abs().max() > 0:
                scale[i, j] = block.abs().max() / 448
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / scale[i, j]).to(FP8)
    return q, scale


def dequantise_by_hand(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.arange(q.shape[0]) // 128, torch.arange(q.shape[1]) // 128
    return q.float() * scale[rows][:, cols]


def write_fp8_checkpoint(path: Path, cfg: seekforge.ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random bf16 model of `cfg` saved, then rewritten in DeepSeek's FP8 layout; returns the file's tensors."""
    torch.manual_seed(seed)
    model = seekforge.Transformer(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    for key in [k for k in tensors if FP8_KEY.match(k)]:
        tensors[key], tensors[key + "_scale_inv"] = quantise_by_hand(tensors[key])
    save_file(tensors, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": QUANTIZATION_CONFIG}))
    return tensors
