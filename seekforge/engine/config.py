"""EngineConfig: every setting of the inference engine, in one place, with its default and its check.

    LLM(model, EngineConfig(max_num_seqs=64, kv_cache_memory=2 << 30))
    LLM(model, max_num_seqs=64)                # the same: keyword arguments fill an EngineConfig

The server (`seekforge serve`, ServerConfig.engine) and GRPO's rollout engine (GRPOConfig.engine) embed it,
so seekforge.configio checks their `engine.KEY=VALUE` overrides against these fields. Checks that need the
model (max_model_len against its context, MTP modules for drafts) are the LLM's, when it has one.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from seekforge.engine.cache_size import cache_budget
from seekforge.errors import ConfigError
from seekforge.ops import Backend


@dataclass
class EngineConfig:
    # loading a checkpoint from a path (a live model is used where it is)
    dtype: str | torch.dtype | None = None  # "float32", "bfloat16", "float16"; None: the checkpoint's
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None: cpu
    # "fp8": the blocks' weights in FP8 with 128x128 block scales (seekforge.model.fp8_weights), about half of bf16's
    # memory: an FP8 checkpoint's kept as they are, a 16-bit one's quantised on load; a live model must have them
    # already (to_fp8_weights). None: the weights as loaded (an FP8 checkpoint dequantised to dtype)
    weights_dtype: str | None = None
    # the paged latent cache: num_blocks outright, else kv_cache_memory bytes, else on a GPU
    # gpu_memory_utilization of its total memory less what is in use already (seekforge.engine.cache_size)
    block_size: int | None = None  # tokens per block; None: 64 on a GPU (the decode kernel's tile), else 16
    num_blocks: int | None = None
    kv_cache_memory: int | None = None  # None: 1 GiB off a GPU
    gpu_memory_utilization: float = 0.9
    # scheduling
    max_model_len: int | None = None  # None: the model's max_seq_len
    max_num_seqs: int = 256  # sequences decoded together at most
    max_num_batched_tokens: int = 2048  # tokens per step at most
    max_waiting: int = 4096  # sequences waiting for a slot at most; past it add_request raises QueueFullError
    enable_prefix_caching: bool = True
    # tiers under the prefix cache (seekforge.engine.tiered_blocks): cached blocks the GPU cache evicts live on in CPU
    # memory and on disk and are copied back instead of recomputed; the disk's outlive the process
    kv_cpu_gb: float = 0.0  # GiB of host memory (pinned on a GPU) for the CPU tier; 0: no lower tiers
    kv_disk: str | None = None  # directory of the disk tier (needs the CPU tier); None: no disk tier
    kv_disk_gb: float = 16.0  # GiB the disk tier may fill in kv_disk (least recently used blocks go first)
    enable_chunked_prefill: bool = True
    num_speculative_tokens: int = 0  # MTP drafts per step (needs a checkpoint with MTP modules)
    # speed on a GPU
    cuda_graphs: bool = False  # replay decode steps (and with MTP the verification and drafting) as CUDA graphs
    compile: bool = False  # torch.compile the blocks (prefill and the captured decode step)
    async_scheduling: bool | None = None  # launch a decode step before the last one's tokens are known; None: on CUDA
    # "auto": the Triton kernels on CUDA, PyTorch elsewhere; "torch": PyTorch's everywhere; "triton": Triton's on
    # CUDA, and on the CPU under Triton's interpreter (TRITON_INTERPRET=1) (seekforge.ops.dispatch)
    kernels: str = "auto"
    # adaptive expert activation (seekforge.engine.adaptive_topk): under saturation, steps route each token to fewer
    # experts, down the levels (None: the model's k, about 2/3 and 1/3 of it); saturated = at least adaptive_queue
    # sequences waiting, or (where set) a step of at least adaptive_step_latency seconds. Requests keep a minimum
    # with SamplingParams.min_experts.
    adaptive_experts: bool = False
    adaptive_expert_levels: list[int] | None = None
    adaptive_queue: int = 1
    adaptive_step_latency: float | None = None
    # dynamic sparse heads (experimental, docs/EXPERIMENTAL.md): each decoded token skips this fraction of the heads,
    # those of smallest content-query norm (seekforge.model.mla.MLA.kept_heads); prefill keeps every head. 0: off
    sparse_heads: float = 0.0

    def __post_init__(self) -> None:
        for name, low in (("block_size", 1), ("num_blocks", 1), ("max_model_len", 2), ("max_num_seqs", 1),
                          ("max_num_batched_tokens", 1), ("max_waiting", 1), ("num_speculative_tokens", 0),
                          ("adaptive_queue", 1)):
            value = getattr(self, name)
            if value is None and name in ("block_size", "num_blocks", "max_model_len"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"LLM: {name} must be an integer >= {low}, got {value!r}; set engine {name} "
                                  f"to one")
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "cuda_graphs", "compile", "adaptive_experts"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"LLM: {name} is true or false, got {getattr(self, name)!r}")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ConfigError(f"LLM: async_scheduling is true, false or None (on CUDA), got {self.async_scheduling!r}")
        cache_budget(self.kv_cache_memory, self.gpu_memory_utilization, None)  # checks both
        for name in ("kv_cpu_gb", "kv_disk_gb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"LLM: {name} is a number of GiB >= 0, got {value!r}")
        if isinstance(self.kv_disk, os.PathLike):
            self.kv_disk = os.fspath(self.kv_disk)
        if self.kv_disk is not None and not (isinstance(self.kv_disk, str) and self.kv_disk):
            raise ConfigError(f"LLM: kv_disk is a directory path, got {self.kv_disk!r}")
        if self.kv_disk is not None and not self.kv_cpu_gb:
            raise ConfigError("LLM: the disk tier (kv_disk) reads and writes through the CPU tier; set kv_cpu_gb > 0 "
                              "too")
        if self.kv_cpu_gb and not self.enable_prefix_caching:
            raise ConfigError("LLM: the KV tiers (kv_cpu_gb, kv_disk) sit under the prefix cache; turn "
                              "enable_prefix_caching on or set kv_cpu_gb to 0")
        Backend.of(self.kernels)
        if isinstance(self.sparse_heads, bool) or not isinstance(self.sparse_heads, (int, float)) or not (
                0 <= self.sparse_heads < 1):
            raise ConfigError(f"LLM: sparse_heads is the fraction of attention heads a decoded token skips, a number "
                              f"in [0, 1) (0: off), got {self.sparse_heads!r}")
        if self.weights_dtype not in (None, "fp8"):
            raise ConfigError(f"LLM: weights_dtype is None (the weights as loaded) or \"fp8\" (FP8 weights with "
                              f"128x128 block scales), got {self.weights_dtype!r}")

    def kept_heads(self, n_heads: int) -> int | None:
        """Heads each decoded token keeps under `sparse_heads` for a model of `n_heads` (the skipped ones rounded to
        the nearest count); None when off."""
        if not self.sparse_heads:
            return None
        skipped = int(self.sparse_heads * n_heads + 0.5)
        if not 0 < skipped < n_heads:
            raise ConfigError(f"LLM: sparse_heads={self.sparse_heads} skips {skipped} of the model's {n_heads} "
                              f"attention heads; choose a fraction that skips between 1 and {n_heads - 1} (about "
                              f"{0.5 / n_heads:.3g} to {(n_heads - 0.5) / n_heads:.3g}), or 0 for off")
        return n_heads - skipped


def engine_config(config: EngineConfig | None, settings: dict) -> EngineConfig:
    """`config` (default: EngineConfig()) with the keyword `settings` set over it."""
    if config is not None and not isinstance(config, EngineConfig):
        raise ConfigError(f"LLM(model, config): config must be an EngineConfig, got {type(config).__name__}; pass a "
                          f"tokenizer as tokenizer=...")
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ConfigError(f"LLM: unknown engine setting(s) {', '.join(unknown)}; the settings are "
                          f"{', '.join(sorted(names))}")
    return dataclasses.replace(config or EngineConfig(), **settings)
