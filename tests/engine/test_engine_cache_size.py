"""Sizing the engine's paged cache: vLLM's gpu_memory_utilization (a share of the GPU's total memory, less what
is in use), an explicit byte budget, the cap at what max_num_seqs sequences can use, and a clear error when not
even one sequence fits. The GPU's numbers are given by hand: the arithmetic runs without one."""

import pytest

from seekforge import LLM
from seekforge.engine.cache_size import CPU_CACHE_BYTES, GiB, cache_blocks, cache_budget
from seekforge.errors import ConfigError
from seekforge.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_utilization_is_a_share_of_total_memory_less_what_is_in_use():
    # an 80 GiB GPU with 20 GiB in use (weights, a trainer's tensors, other processes)
    gpu = (60 * GiB, 80 * GiB)
    assert cache_budget(None, 0.9, gpu)[0] == 72 * GiB - 20 * GiB
    budget, source = cache_budget(None, 0.4, gpu)
    assert budget == 32 * GiB - 20 * GiB
    assert "gpu_memory_utilization=0.4" in source and "80.00 GiB" in source and "20.00 GiB" in source
    # 40 GiB in use is more than a 0.4 share: nothing left
    assert cache_budget(None, 0.4, (40 * GiB, 80 * GiB))[0] == -8 * GiB
    # an explicit budget wins; off a GPU the default is 1 GiB
    assert cache_budget(5 << 20, 0.9, gpu) == (5 << 20, f"kv_cache_memory={5 << 20}")
    assert cache_budget(None, 0.9, None)[0] == CPU_CACHE_BYTES == GiB
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ConfigError, match="gpu_memory_utilization"):
            cache_budget(None, bad, gpu)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="kv_cache_memory"):
            cache_budget(bad, 0.9, gpu)


def test_blocks_from_a_budget_by_hand():
    # 1000 bytes a token, 16-token blocks: 16000 bytes a block; one of them is the scratch block.
    # max_model_len 100: a sequence takes ceil(100 / 16) = 7 blocks
    assert cache_blocks(1_000_000, "b", 1000, 16, 100, max_num_seqs=100) == 1_000_000 // 16_000 - 1  # 61
    assert cache_blocks(1_000_000, "b", 1000, 16, 100, max_num_seqs=4) == 4 * 7  # all 4 sequences can use
    assert cache_blocks(1_000_000, "b", 1000, 16, 100, max_num_seqs=4, lookahead=20) == 4 * 8  # ceil(120 / 16)
    assert cache_blocks(8 * 16_000, "b", 1000, 16, 100, max_num_seqs=4) == 7  # exactly one sequence and scratch
    with pytest.raises(ConfigError, match=r"gets 127999 bytes \(my budget\), less than one sequence of "
                                          r"max_model_len 100 tokens needs \(128000 bytes"):
        cache_blocks(8 * 16_000 - 1, "my budget", 1000, 16, 100, max_num_seqs=4)


def test_a_gpu_already_too_full_is_a_clear_error():
    budget, source = cache_budget(None, 0.4, (40 * GiB, 80 * GiB))
    with pytest.raises(ConfigError, match="gets nothing .*gpu_memory_utilization=0.4.*40.00 GiB is already in use.*"
                                          "raise gpu_memory_utilization"):
        cache_blocks(budget, source, 70_272, 64, 4096, max_num_seqs=256)


def test_the_engine_sizes_its_cache_from_the_budget():
    cfg = ModelConfig.preset("tiny").replace(max_seq_len=64)
    model = Transformer(cfg)
    per_token = cfg.cache_bytes_per_token(4)  # fp32
    per_block = per_token * 16
    llm = LLM(model, block_size=16, kv_cache_memory=10 * per_block, max_num_seqs=8)
    assert llm.block_manager.num_blocks == 9  # ten blocks' worth, one of them scratch
    assert llm.runner.kv_cache.numel() * 4 == 10 * per_block
    assert LLM(model, block_size=16, max_num_seqs=2).block_manager.num_blocks == 2 * 4  # capped: 2 x ceil(64 / 16)
    with pytest.raises(ConfigError, match="less than one sequence of max_model_len 64"):
        LLM(model, block_size=16, kv_cache_memory=4 * per_block)
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        LLM(model, gpu_memory_utilization=2.0)
    assert LLM(model, block_size=16, num_blocks=2).block_manager.num_blocks == 2  # explicit blocks are taken as given
