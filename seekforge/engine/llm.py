"""LLM: the engine's front door (vLLM's offline API).

    llm = LLM("path/to/checkpoint")            # or LLM(model) with a live Transformer, used in place
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason

`generate` runs a batch to completion; `stream` yields RequestOutputs with each step's new tokens;
`add_request` / `step` / `abort` let a server interleave requests.

The jobs behind it, one module each: request checks and prompt encoding (seekforge.engine.inputs), the
step (seekforge.engine.step), the pipelined step of async scheduling (seekforge.engine.async_step), stop
conditions, outputs and detokenising (seekforge.engine.outputs).
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterator, Sequence as Seq
from pathlib import Path

import torch

from seekforge import ops
from seekforge.engine.adaptive_topk import AdaptiveTopK, default_levels
from seekforge.engine.async_step import AsyncStep, InFlight
from seekforge.engine.block_manager import BlockManager
from seekforge.engine.cache_size import cache_blocks, cache_budget
from seekforge.engine.config import EngineConfig, engine_config
from seekforge.engine.inputs import Prompt, RequestChecks
from seekforge.engine.model_runner import ModelRunner
from seekforge.engine.outputs import CompletionOutput, Outputs, RequestOutput
from seekforge.engine.sampler import BatchCache
from seekforge.engine.sampling_params import SamplingParams
from seekforge.engine.scheduler import Scheduler
from seekforge.engine.sequence import Request, Sequence
from seekforge.engine.spec_decode import MTPProposer
from seekforge.engine.step import Step
from seekforge.engine.tiered_blocks import TieredBlockManager, TieredScheduler
from seekforge.errors import ConfigError
from seekforge.model.fp8_weights import has_fp8_weights
from seekforge.model.transformer import Transformer

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "Prompt"]


class LLM(Step, AsyncStep, Outputs, RequestChecks):
    def __init__(self, model: Transformer | str | os.PathLike, config: EngineConfig | None = None, tokenizer=None,
                 **settings):
        """`config` holds the engine's settings (seekforge.engine.config); keyword `settings` (max_num_seqs=64, ...)
        are set over it."""
        config = self.config = engine_config(config, settings)
        if isinstance(model, Transformer):
            if config.dtype is not None or config.device is not None:
                raise ConfigError("LLM(model): dtype and device apply when loading from a path; a live model is "
                                  "used where it is, in place (move it first)")
            if config.weights_dtype == "fp8" and not has_fp8_weights(model):
                raise ConfigError("LLM(model, weights_dtype=\"fp8\"): a live model is used as it is; convert its "
                                  "weights first (seekforge.model.fp8_weights.to_fp8_weights(model), in place) or "
                                  "load it from a path")
        else:
            from seekforge.model.hf import from_pretrained

            path = Path(model)
            model = from_pretrained(path, dtype=config.dtype, device=config.device,
                                    fp8_weights=config.weights_dtype == "fp8")
            if tokenizer is None and (path / "tokenizer.json").is_file():
                tokenizer = path
        if isinstance(tokenizer, (str, os.PathLike)):
            from seekforge.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_pretrained(tokenizer)
        self.model, self.tokenizer = model, tokenizer
        cfg = self.cfg = model.cfg
        self.max_model_len = config.max_model_len or cfg.max_seq_len
        block_size, num_blocks = config.block_size, config.num_blocks
        if block_size is None:  # the Triton decode kernel reads 64-token tiles from one block on the GPU
            block_size = 64 if model.embed.weight.is_cuda else 16
        if self.max_model_len > cfg.max_seq_len:
            raise ConfigError(f"LLM: max_model_len {self.max_model_len} exceeds the model's max_seq_len "
                              f"{cfg.max_seq_len} (max_position_embeddings)")
        if config.num_speculative_tokens and not cfg.n_mtp_modules:
            raise ConfigError("LLM: num_speculative_tokens needs a checkpoint with MTP modules "
                              "(num_nextn_predict_layers > 0); this one has none")
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(f"LLM: without chunked prefill max_num_batched_tokens ({config.max_num_batched_tokens}) "
                              f"must be at least max_model_len ({self.max_model_len}) or long prompts never run")
        k = config.num_speculative_tokens
        self.device = model.embed.weight.device
        elsize = model.embed.weight.element_size()
        per_token = cfg.cache_bytes_per_token(elsize) * (cfg.n_layers + (1 if k else 0)) // cfg.n_layers
        # the cache: num_blocks outright, else kv_cache_memory bytes, else on a GPU gpu_memory_utilization of its total
        # memory less what is in use already (vLLM's meaning; seekforge.engine.cache_size)
        if num_blocks is None:
            gpu_memory = None
            if self.device.type == "cuda" and config.kv_cache_memory is None:
                torch.cuda.empty_cache()  # memory the allocator caches but no tensor holds is not in use
                gpu_memory = torch.cuda.mem_get_info(self.device)
            budget, source = cache_budget(config.kv_cache_memory, config.gpu_memory_utilization, gpu_memory)
            num_blocks = cache_blocks(budget, source, per_token, block_size, self.max_model_len, config.max_num_seqs,
                                      2 * k)
        # the kernels every step runs (seekforge.ops.dispatch): chosen around each step, and here, where compile
        # loads them before anything is traced
        self.kernels = ops.check_device(config.kernels, self.device)
        with ops.backend(self.kernels):
            self.runner = ModelRunner(model, num_blocks, block_size, self.max_model_len,
                                      mtp=bool(k), max_absorbed_query=1 + k, compile=config.compile,
                                      keep_heads=config.kept_heads(cfg.n_heads))
        scheduler = Scheduler
        if config.kv_cpu_gb:  # lower tiers under the prefix cache (without them, the plain GPU-only manager)
            caches = [c for c in (self.runner.kv_cache, self.runner.mtp_cache) if c is not None]
            self.block_manager = TieredBlockManager.build(config, model, caches, num_blocks, block_size)
            scheduler = TieredScheduler
        else:
            self.block_manager = BlockManager(num_blocks, block_size, config.enable_prefix_caching)
        self.scheduler = scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, config.max_waiting, num_lookahead=max(k - 1, 0),
                                   chunked_prefill=config.enable_chunked_prefill)
        self.proposer = MTPProposer(self.runner, k) if k else None
        self.eos_ids = {t for t in (cfg.eos_token_id, tokenizer.eos_id if tokenizer else None) if t is not None}
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self._weights_key = self._weights_version()
        # on by default where the device runs apart from the host; on a CPU it only delays outputs a step
        self.async_scheduling = (self.device.type == "cuda" if config.async_scheduling is None
                                 else config.async_scheduling)
        self._in_flight: InFlight | None = None
        self._plain_batches = BatchCache(cfg.vocab_size, self.device)  # steps' sampling rows without penalties
        self.num_async_steps = 0
        # Tokens per expert [experts] fp32 of each main-model MoE layer (by layer id) in the last step's forward;
        # empty when it ran none. A captured step's are its graph's output buffers, which the next step
        # overwrites: copy or add them up before stepping again (`seekforge.model.moe.add_load`).
        self.expert_load: dict[int, torch.Tensor] = {}
        self.adaptive = self._adaptive_controller(config) if config.adaptive_experts else None
        if config.cuda_graphs:  # with adaptive experts, one graph a batch size and routed top-k
            topks = (None,) if self.adaptive is None else (None, *self.adaptive.levels[1:])
            with torch.inference_mode(), ops.backend(self.kernels):
                self.runner.capture_cuda_graphs(config.max_num_seqs, topks)

    def _adaptive_controller(self, config: EngineConfig) -> AdaptiveTopK:
        k = self.cfg.n_activated_experts
        levels = default_levels(k) if config.adaptive_expert_levels is None else tuple(config.adaptive_expert_levels)
        if not levels or levels[0] != k:
            raise ConfigError(f"LLM: adaptive_expert_levels must start at the model's routed top-k {k} and descend "
                              f"(e.g. {' '.join(map(str, default_levels(k)))}), got {list(levels)}")
        return AdaptiveTopK(levels, queue_high=config.adaptive_queue, latency_high=config.adaptive_step_latency)

    # ---------------------------------------------------------------- facts
    @property
    def cache_bytes_per_token(self) -> int:
        """Paged cache bytes per token of the main model: (kv_lora_rank + qk_rope_head_dim) x element size x layers."""
        return self.runner.cache_bytes_per_token

    def stats(self) -> dict:
        elsize = self.runner.kv_cache.element_size()
        bm = self.block_manager
        out = {
            "cache_bytes_per_token": self.cache_bytes_per_token,
            "mtp_cache_bytes_per_token": self.runner.mtp_cache_bytes_per_token,
            "full_kv_bytes_per_token": self.cfg.full_kv_bytes_per_token(elsize),
            "num_blocks": bm.num_blocks, "block_size": bm.block_size, "free_blocks": bm.num_free_blocks,
            "prefix_cache_hit_rate": bm.hit_tokens / bm.query_tokens if bm.query_tokens else 0.0,
            "prefill_tokens_computed": bm.prefill_tokens,
            "preemptions": self.scheduler.num_preemptions, "async_steps": self.num_async_steps,
            "num_waiting": len(self.scheduler.waiting), "num_running": len(self.scheduler.running),
        }
        if self.proposer is not None:
            out["speculative"] = self.proposer.stats.as_dict()
        if isinstance(bm, TieredBlockManager):
            out["kv_tiers"] = bm.tier_stats()
        if self.adaptive is not None:
            out["adaptive_experts"] = self.adaptive.stats()
        return out

    def close(self) -> None:
        """Finish the KV tiers' copies and disk writes (a no-op without tiers); the LLM takes no requests after."""
        if isinstance(self.block_manager, TieredBlockManager):
            self.block_manager.close()

    # ---------------------------------------------------------------- weights
    def _weights_version(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in itertools.chain(self.model.parameters(), self.model.buffers()))

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes: call after changing the model's weights. `generate`, `stream` and
        `add_request` also do it on their own when an in-place update (optimizer step, copy_) bumped a
        parameter's version counter; writes through `.data` are invisible to that check."""
        self.block_manager.reset_prefix_cache()
        self._weights_key = self._weights_version()

    def _check_weights(self) -> None:
        if self._weights_version() != self._weights_key:
            self.reset_prefix_cache()

    # ---------------------------------------------------------------- requests
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue one request (checked first; raises ConfigError or QueueFullError and changes nothing)."""
        params = params or SamplingParams()
        text, ids = self._check_request(prompt, params)
        self._check_weights()
        return self._add(text, ids, params, request_id)

    def _add(self, text, ids, params, request_id=None) -> str:
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ConfigError(f"request id {request_id!r} is already in use")
        req = Request(request_id, text, ids, params)
        keys = [None] * params.n if params.seed is None else ops.sequence_keys(params.seed, params.n)
        req.seqs += [Sequence(next(self._seq_ids), req, i, key) for i, key in enumerate(keys)]
        self.scheduler.add(req.seqs)  # raises QueueFullError, changing nothing, when the queue is full
        self.requests[request_id] = req
        return request_id

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            for seq in req.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---------------------------------------------------------------- public loops
    def step(self) -> list[RequestOutput]:
        """Run one step; outputs (with deltas) for every request that changed. Finished requests are
        reported once and then forgotten."""
        outs = []
        with ops.backend(self.kernels):
            touched = self._step()
        for rid in touched:
            req = self.requests.get(rid)
            if req is None:
                continue
            outs.append(self._output(req, streaming=True))
            if req.finished:
                del self.requests[rid]
        return outs

    def _run(self, prompts, sampling_params, streaming: bool,
             order: list[str] | None = None) -> Iterator[RequestOutput]:
        pending = deque(self._normalise(prompts, sampling_params))
        self._check_weights()  # once: reading every parameter's version costs milliseconds
        mine: set[str] = set()
        while pending or mine:
            while pending and self.scheduler.has_room(pending[0][2].n):
                rid = self._add(*pending.popleft())
                mine.add(rid)
                if order is not None:
                    order.append(rid)
            with ops.backend(self.kernels):
                touched = self._step()
            if not touched and not self.scheduler.running and self.scheduler.waiting:
                raise RuntimeError("engine stalled: waiting requests cannot be scheduled")
            for rid in touched & mine:
                req = self.requests[rid]
                finished = req.finished
                if streaming or finished:
                    yield self._output(req, streaming)
                if finished:
                    mine.discard(rid)
                    del self.requests[rid]

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False, dual_chain=None) -> list[RequestOutput]:
        """Complete every prompt (strings, or lists of token ids); one RequestOutput per prompt, in order.
        All prompts are checked before any work starts.

        `dual_chain` (a seekforge.dual_chain.DualChain): run the rule chain beside the model. Its calculator
        inserts exact results into the generation (in chain), the requests record token logprobs (logprobs=0
        where none were asked for), and each RequestOutput's `dual_chain` holds its decision: which chain
        answered, the answer, the model's confidence."""
        if dual_chain is not None:
            if isinstance(sampling_params, (list, tuple)):
                sampling_params = [dual_chain.sampling_params(p, self.tokenizer) for p in sampling_params]
            else:
                sampling_params = dual_chain.sampling_params(sampling_params or SamplingParams(), self.tokenizer)
        results, order = {}, []
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(self._as_list(prompts)), desc="generate", unit="req")
        for out in self._run(prompts, sampling_params, streaming=False, order=order):
            results[out.request_id] = out
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        outs = [results[rid] for rid in order]
        if dual_chain is not None:
            for out in outs:
                out.dual_chain = dual_chain.decide(out, self.tokenizer)
        return outs

    def stream(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None
               ) -> Iterator[RequestOutput]:
        """Like generate, but yield a RequestOutput whenever a request gets new tokens: `delta_token_ids` and
        `delta_text` of each completion hold what is new; the last output of a request has finished=True."""
        yield from self._run(prompts, sampling_params, streaming=True)
