"""The planner's arithmetic against hand-computed values, the model's own count, and DeepSeek-V3's layout."""

import pytest
import torch

from seekforge.cli import main
from seekforge.errors import ConfigError
from seekforge.model.config import ModelConfig
from seekforge.model.transformer import Transformer
from seekforge.parallel.config import ParallelConfig
from seekforge.train.plan import GB, PlanConfig, Precision, all_to_all_bytes, plan, total_params


@pytest.mark.parametrize("preset", ["tiny", "16b", "671b"])
def test_analytic_count_matches_the_model(preset):
    cfg = ModelConfig.preset(preset)
    with torch.device("meta"):
        assert total_params(cfg) == Transformer(cfg).num_parameters()["total"]


def test_tiny_by_hand():
    cfg = ModelConfig.preset("tiny")
    # attention: wq_a 128*64 + q_norm 64 + wq_b 64*4*32 + wkv_a 128*48 + kv_norm 32 + wkv_b 32*4*32 + wo 64*128
    attn = 8192 + 64 + 8192 + 6144 + 32 + 4096 + 8192
    dense_block = 256 + attn + 3 * 128 * 384
    moe_block = 256 + attn + 8 * 128 + 3 * 128 * 64 + 8 * 3 * 128 * 64
    mtp = 3 * 128 + 2 * 128 * 128 + moe_block
    assert total_params(cfg) == 2 * 512 * 128 + 128 + dense_block + 2 * moe_block + mtp
    # one GPU, ZeRO-3 over 1 rank, fp32 master + fp32 m, v: 12 bytes a parameter
    out = plan(cfg, PlanConfig(), 1)
    assert out["heaviest"].memory["optimizer"] == 12 * total_params(cfg)
    assert plan(cfg, PlanConfig(precision=Precision(moments="bf16")), 1)["heaviest"].memory["optimizer"] == \
        8 * total_params(cfg)
    # one dispatch over ep=4: 4096 tokens x top-2 x 128 wide x 2 bytes, 3/4 of it leaves the rank
    assert all_to_all_bytes(cfg, 4096, 4) == 4096 * 2 * 128 * 2 * 3 / 4 == 1572864


def test_selective_checkpointing_keeps_the_matmul_outputs_by_hand():
    """Selective checkpointing holds what full checkpointing holds plus every block's matmul and attention
    outputs, in bf16: tiny, per token, attention wq_a 64 + wq_b 4*32 + wkv_a 32+16 + wkv_b 4*32 + attention 4*16
    + wo 128 = 560; the dense FFN w1, w3 2*384 + w2 128 = 896; a MoE FFN router 8 + 2 experts * (64+64+128)
    + shared 64+64+128 = 776; three MoE blocks (two layers and the MTP block) and one dense."""
    cfg = ModelConfig.preset("tiny")
    held = {mode: plan(cfg, PlanConfig(parallel=ParallelConfig(activation_checkpointing=mode)), 1)
            ["heaviest"].memory["activations"] for mode in (True, "selective", False)}
    per_token = (560 + 896) + 3 * (560 + 776)
    assert held["selective"] - held[True] == 2 * 4096 * per_token
    assert held[True] < held["selective"] < held[False]


def test_deepseek_v3_layout_fits_80gb():
    """671B on 2048 GPUs: PP16, EP64, ZeRO-1 data parallelism, bf16 moments, recomputation."""
    config = PlanConfig(parallel=ParallelConfig(pp=16, ep=64, activation_checkpointing=True), zero=1,
                        precision=Precision(moments="bf16"))
    out = plan(ModelConfig.preset("671b"), config, 2048)
    assert out["parallel"].dp_shard == 128
    assert 0 < sum(out["heaviest"].memory.values()) / GB < 80
    # without sharding anything over 2048 GPUs, the optimizer alone (12 B x 671B) could not fit
    assert 12 * out["total_params"] / GB > 80


@pytest.mark.parametrize("layout, match", [
    (ParallelConfig(dp_shard=3, pp=16), "must equal the world size"),
    (ParallelConfig(pp=16, ep=63), "does not divide the 256 routed experts"),
    (ParallelConfig(pp=1024, ep=4), "does not divide dp_shard"),
    # training carves ep out of dp_shard alone (not dp_shard*tp): 2048 / (tp 2 * pp 16) = 64 ranks for ep 128
    (ParallelConfig(tp=2, pp=16, ep=128), "does not divide dp_shard = 64"),
])
def test_degree_errors(layout, match):
    with pytest.raises(ConfigError, match=match):
        plan(ModelConfig.preset("671b"), PlanConfig(parallel=layout), 2048)


def test_tp_must_divide_heads():
    with pytest.raises(ConfigError, match="attention heads"):
        plan(ModelConfig.preset("tiny"), PlanConfig(parallel=ParallelConfig(tp=3)), 3)


def test_pp_larger_than_blocks():
    with pytest.raises(ConfigError, match="every stage"):
        plan(ModelConfig.preset("tiny"), PlanConfig(parallel=ParallelConfig(pp=8)), 8)


def test_command(capsys):
    assert main(["plan", "16b", "parallel.ep=8", "--gpus", "8", "--gpu-memory", "80"]) == 0
    assert "not a measurement" in capsys.readouterr().out
    assert main(["plan", "16b", "parallel.ep=3", "--gpus", "8", "--gpu-memory", "80"]) == 2
