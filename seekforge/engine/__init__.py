"""The inference engine: paged latent cache, continuous batching, prefix caching (over GPU, CPU and disk tiers), MTP
speculative decoding."""

from seekforge.engine.config import EngineConfig
from seekforge.engine.llm import LLM, CompletionOutput, RequestOutput
from seekforge.engine.sampling_params import SamplingParams
from seekforge.engine.scheduler import QueueFullError
from seekforge.engine.sequence import Logprob

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "Logprob", "QueueFullError", "RequestOutput", "SamplingParams"]
