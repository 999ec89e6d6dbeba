"""`seekforge info`: the GPU memory a preset's weights and cache take in bf16 and with FP8 weights, against counts
made by hand from the config's shapes."""

import json
import math

import pytest

from seekforge.cli import main
from seekforge.model.config import ModelConfig


def _info(capsys, *args) -> dict:
    assert main(["info", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _converted_matrices(cfg: ModelConfig) -> list[tuple[int, int, int, bool]]:
    """(count, rows, cols, padded) of the weights FP8 converts, every main and MTP block: MLA's projections but wkv_b,
    the dense or shared-expert SwiGLU (padded: held zero-padded for the blockwise GEMM), the routed experts."""
    blocks = cfg.n_layers + cfg.n_mtp_modules
    moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers)) + cfg.n_mtp_modules  # MTP blocks are MoE layers
    q_out = cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    attn = ([(blocks, cfg.q_lora_rank, cfg.dim, True), (blocks, q_out, cfg.q_lora_rank, True)] if cfg.q_lora_rank
            else [(blocks, q_out, cfg.dim, True)])
    attn += [(blocks, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.dim, True),
             (blocks, cfg.dim, cfg.n_heads * cfg.v_head_dim, True)]
    shared = cfg.n_shared_experts * cfg.moe_inter_dim
    ffn = [(2 * (blocks - moe), cfg.inter_dim, cfg.dim, True), (blocks - moe, cfg.dim, cfg.inter_dim, True),
           (2 * moe * cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim, False),
           (moe * cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, False)]
    if shared:
        ffn += [(2 * moe, shared, cfg.dim, True), (moe, cfg.dim, shared, True)]
    return attn + ffn


def _fp8_bytes(rows: int, cols: int, padded: bool) -> int:
    """An FP8 weight's bytes: 1 an element and a 4-byte scale per 128x128 block, rows rounded up to 128 and columns
    to 512 where the projection is held padded."""
    if padded:
        rows, cols = -(-rows // 128) * 128, -(-cols // 512) * 512
    return rows * cols + 4 * math.ceil(rows / 128) * math.ceil(cols / 128)


@pytest.mark.parametrize("preset, context", [("tiny", 100), ("16b", 32768), ("671b", 131072)])
def test_info_gives_the_gpu_memory_in_bf16_and_fp8(capsys, preset, context):
    cfg = ModelConfig.preset(preset)
    out = _info(capsys, preset, "--context", str(context))
    memory = out["gpu_memory"]
    # bf16: 2 bytes a parameter (and a few buffers: the gate's bias, rotary tables); FP8: each converted matrix
    # as `_fp8_bytes` counts it instead of 2 bytes an element
    assert 2 * out["total"] <= memory["bf16_weight_bytes"] < 2 * out["total"] * 1.001
    saved = sum(count * (2 * rows * cols - _fp8_bytes(rows, cols, padded))
                for count, rows, cols, padded in _converted_matrices(cfg))
    assert memory["fp8_weight_bytes"] == memory["bf16_weight_bytes"] - saved
    cache = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2 * cfg.n_layers * context
    assert memory["context_tokens"] == context and memory["cache_bytes"] == cache
    assert memory["fp8_total_gib"] == round((memory["fp8_weight_bytes"] + cache) / 2**30, 2)
    assert memory["bf16_total_gib"] == round((memory["bf16_weight_bytes"] + cache) / 2**30, 2)


def test_info_context_defaults_to_the_models_and_must_not_be_negative(capsys):
    assert _info(capsys, "tiny")["gpu_memory"]["context_tokens"] == ModelConfig.preset("tiny").max_seq_len
    assert main(["info", "tiny", "--context", "-1"]) == 2
    assert "--context" in capsys.readouterr().err
