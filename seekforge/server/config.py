"""ServerConfig: what `seekforge serve` was asked to serve, and how."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerConfig:
    model_path: str
    served_model_names: list[str] = field(default_factory=list)  # empty: the path as given
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1/* when set
    dtype: str | None = None
    device: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024  # sequences waiting for a slot; past it requests get 503
    num_speculative_tokens: int = 0
    # bytes of paged cache; default: 90% of the GPU's total memory less what is in use, 1 GiB on CPU
    kv_cache_memory: int | None = None
    cuda_graphs: bool = False  # replay decode steps as CUDA graphs (GPU, bfloat16/float16)
    compile: bool = False  # torch.compile the blocks (prefill and the captured decode step; ~1 min more at startup)
    async_scheduling: bool | None = None  # prepare each decode step while the last runs; None: on CUDA
    health_timeout: float = 30.0  # seconds a /health generation may take before it reports 503
    log_level: str = "info"

    @property
    def model_names(self) -> list[str]:
        return self.served_model_names or [self.model_path]

    def engine_kwargs(self) -> dict:
        return dict(dtype=self.dtype, device=self.device, max_model_len=self.max_model_len,
                    max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                    max_waiting=self.max_waiting, num_speculative_tokens=self.num_speculative_tokens,
                    kv_cache_memory=self.kv_cache_memory, cuda_graphs=self.cuda_graphs,
                    compile=self.compile, async_scheduling=self.async_scheduling)
