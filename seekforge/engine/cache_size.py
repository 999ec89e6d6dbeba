"""How many blocks the engine's paged cache gets, from a byte budget: given outright (kv_cache_memory), or on
a GPU vLLM's gpu_memory_utilization, the share of the GPU's total memory this process may fill once the cache
is allocated. What is already in use (the weights, a trainer's tensors in the same process, other processes)
counts against that share, so a trainer that samples on the engine (GRPO) keeps the rest for its update.

Plain arithmetic on the numbers the caller reads from the device (torch.cuda.mem_get_info), so that it is
tested without one.
"""

from __future__ import annotations

from seekforge.errors import ConfigError

GiB = 2**30
CPU_CACHE_BYTES = GiB  # without a GPU to measure, the default budget


def cache_budget(kv_cache_memory: int | None, gpu_memory_utilization: float,
                 gpu_memory: tuple[int, int] | None) -> tuple[int, str]:
    """(bytes for the cache, where that number comes from). gpu_memory: (free, total) bytes of the GPU the
    cache goes on, None off a GPU. The budget is negative when more than the share is in use already."""
    if isinstance(gpu_memory_utilization, bool) or not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"LLM: gpu_memory_utilization is the share of the GPU's memory the process may fill, in "
                          f"(0, 1]; got {gpu_memory_utilization!r}")
    if kv_cache_memory is not None:
        if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, int) or kv_cache_memory < 1:
            raise ConfigError(f"LLM: kv_cache_memory is a number of bytes >= 1, got {kv_cache_memory!r}")
        return kv_cache_memory, f"kv_cache_memory={kv_cache_memory}"
    if gpu_memory is None:
        return CPU_CACHE_BYTES, "the default off a GPU; set kv_cache_memory"
    free, total = gpu_memory
    used = total - free
    return (int(total * gpu_memory_utilization) - used,
            f"gpu_memory_utilization={gpu_memory_utilization} of the GPU's {total / GiB:.2f} GiB, of which "
            f"{used / GiB:.2f} GiB is already in use")


def cache_blocks(budget: int, source: str, bytes_per_token: int, block_size: int, max_model_len: int,
                 max_num_seqs: int, lookahead: int = 0) -> int:
    """Blocks of `block_size` tokens the budget holds (the cache tensor also holds one scratch block, counted
    here), no more than max_num_seqs sequences of max_model_len tokens (plus `lookahead` drafts) can use.
    ConfigError when that is less than one sequence of max_model_len."""
    per_block = bytes_per_token * block_size
    fits = max(budget, 0) // per_block - 1
    most = max_num_seqs * -(-(max_model_len + lookahead) // block_size)
    one = -(-max_model_len // block_size)
    if fits < one:
        raise ConfigError(
            f"LLM: the KV cache gets {_size(budget) if budget > 0 else 'nothing'} ({source}), less than one sequence "
            f"of max_model_len {max_model_len} tokens needs ({_size((one + 1) * per_block)} at {bytes_per_token} "
            f"bytes per token); raise gpu_memory_utilization or kv_cache_memory, free GPU memory, or lower "
            f"max_model_len")
    return min(fits, most)


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n} bytes"
