"""LLM: the engine's front door (vLLM's offline API), and the step loop behind it.

    llm = LLM("path/to/checkpoint")            # or LLM(model) with a live Transformer, used in place
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason

`generate` runs a batch to completion; `stream` yields RequestOutputs with each step's new tokens;
`add_request` / `step` / `abort` let a server interleave requests. Every prompt and parameter set is
checked before any work, so one bad request never disturbs the others.

One step: the scheduler picks sequences and token counts, the model runner computes them in one packed
forward over the paged latent cache, the sampler (through spec_decode.verify, which without drafts is
plain sampling) picks tokens, stop conditions are applied, full blocks enter the prefix cache, and with
MTP the proposer drafts the next step's tokens.

Async scheduling (on by default on CUDA, vLLM's idea): a plain decode step is launched before the host
knows the previous step's tokens. Those stay on the device and are fed to the new step from there, while
the host settles the previous step (stop conditions, outputs, prefix cache) as the GPU runs the new one;
each sequence carries its unknown tokens as PENDING placeholders meanwhile. A sequence that stopped drops
the one token computed for it in the meantime. Steps that need every token on the host (prefill chunks,
penalties, logprobs, drafts, preemption) settle the step in flight first.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seekforge.engine.block_manager import BlockManager
from seekforge.engine.cache_size import cache_blocks, cache_budget
from seekforge.engine.device_copy import to_device
from seekforge.engine.model_runner import Chunk, DeviceIds, ModelRunner
from seekforge.engine.sampler import Row, compute_logprobs, make_batch, sample
from seekforge.engine.sampling_params import SamplingParams
from seekforge.engine.scheduler import Scheduler
from seekforge.engine.sequence import PENDING, Logprob, Request, Sequence
from seekforge.engine.spec_decode import Catchup, MTPProposer, verify
from seekforge.errors import ConfigError
from seekforge.model.transformer import Transformer

Prompt = str | list[int]


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str | None  # None without a tokenizer
    finish_reason: str | None  # "stop", "length", "abort"; None while running
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float | None = None
    delta_token_ids: list[int] = field(default_factory=list)  # new since the previous output (streaming)
    delta_text: str = ""


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first completion)

    # The first completion's fields, for the common n = 1 case.
    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[Logprob] | None:
        return self.outputs[0].logprobs


class InFlight:
    """A decode step launched before the host knew its tokens: the sampled ids stay on the device (the next
    step's inputs) and are copied to the host without blocking it."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor):
        self.seqs, self.tokens = seqs, tokens
        self.row = {seq.seq_id: i for i, seq in enumerate(seqs)}  # where each sequence's token sits in `tokens`
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host, self._done = tokens, None

    def host_tokens(self) -> list[int]:
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()


class LLM:
    def __init__(self, model: Transformer | str | os.PathLike, tokenizer=None, *, dtype=None, device=None,
                 block_size: int | None = None, num_blocks: int | None = None, kv_cache_memory: int | None = None,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, max_waiting: int = 4096, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, num_speculative_tokens: int = 0, cuda_graphs: bool = False,
                 compile: bool = False, async_scheduling: bool | None = None):
        if isinstance(model, Transformer):
            if dtype is not None or device is not None:
                raise ConfigError("LLM(model): dtype and device apply when loading from a path; a live model is "
                                  "used where it is, in place (move it first)")
        else:
            from seekforge.hf import from_pretrained

            path = Path(model)
            model = from_pretrained(path, dtype=dtype, device=device)
            if tokenizer is None and (path / "tokenizer.json").is_file():
                tokenizer = path
        if isinstance(tokenizer, (str, os.PathLike)):
            from seekforge.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_pretrained(tokenizer)
        self.model, self.tokenizer = model, tokenizer
        cfg = self.cfg = model.cfg
        self.max_model_len = max_model_len or cfg.max_seq_len
        if block_size is None:  # the Triton decode kernel reads 64-token tiles from one block on the GPU
            block_size = 64 if model.embed.weight.is_cuda else 16
        for name, value, low in (("block_size", block_size, 1), ("max_num_seqs", max_num_seqs, 1),
                                 ("max_num_batched_tokens", max_num_batched_tokens, 1),
                                 ("max_waiting", max_waiting, 1), ("max_model_len", self.max_model_len, 2),
                                 ("num_speculative_tokens", num_speculative_tokens, 0)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"LLM: {name} must be an integer >= {low}, got {value!r}")
        if self.max_model_len > cfg.max_seq_len:
            raise ConfigError(f"LLM: max_model_len {self.max_model_len} exceeds the model's max_seq_len "
                              f"{cfg.max_seq_len} (max_position_embeddings)")
        if num_speculative_tokens and not cfg.n_mtp_modules:
            raise ConfigError("LLM: num_speculative_tokens needs a checkpoint with MTP modules "
                              "(num_nextn_predict_layers > 0); this one has none")
        if cuda_graphs and num_speculative_tokens:
            raise ConfigError("LLM: cuda_graphs covers plain decode steps only; turn off num_speculative_tokens "
                              "or cuda_graphs")
        if not enable_chunked_prefill and max_num_batched_tokens < self.max_model_len:
            raise ConfigError(f"LLM: without chunked prefill max_num_batched_tokens ({max_num_batched_tokens}) must "
                              f"be at least max_model_len ({self.max_model_len}) or long prompts never run")
        k = num_speculative_tokens
        self.device = model.embed.weight.device
        elsize = model.embed.weight.element_size()
        per_token = cfg.cache_bytes_per_token(elsize) * (cfg.n_layers + (1 if k else 0)) // cfg.n_layers
        # the cache: num_blocks outright, else kv_cache_memory bytes, else on a GPU gpu_memory_utilization of its total
        # memory less what is in use already (vLLM's meaning; seekforge.engine.cache_size)
        if num_blocks is None:
            gpu_memory = None
            if self.device.type == "cuda" and kv_cache_memory is None:
                torch.cuda.empty_cache()  # memory the allocator caches but no tensor holds is not in use
                gpu_memory = torch.cuda.mem_get_info(self.device)
            budget, source = cache_budget(kv_cache_memory, gpu_memory_utilization, gpu_memory)
            num_blocks = cache_blocks(budget, source, per_token, block_size, self.max_model_len, max_num_seqs, 2 * k)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, self.max_model_len,
                                   max_waiting, num_lookahead=max(k - 1, 0), chunked_prefill=enable_chunked_prefill)
        self.runner = ModelRunner(model, num_blocks, block_size, self.max_model_len,
                                  mtp=bool(k), max_absorbed_query=1 + k, compile=compile)
        self.proposer = MTPProposer(self.runner, k) if k else None
        self.eos_ids = {t for t in (cfg.eos_token_id, tokenizer.eos_id if tokenizer else None) if t is not None}
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self._weights_key = self._weights_version()
        # on by default where the device runs apart from the host; on a CPU it only delays outputs a step
        self.async_scheduling = self.device.type == "cuda" if async_scheduling is None else async_scheduling
        self._in_flight: InFlight | None = None
        self.num_async_steps = 0
        # Tokens per expert [experts] fp32 of each main-model MoE layer (by layer id) in the last step's forward;
        # empty when it ran none. A captured step's are its graph's output buffers, which the next step
        # overwrites: copy or add them up before stepping again (`seekforge.model.moe.add_load`).
        self.expert_load: dict[int, torch.Tensor] = {}
        if cuda_graphs:
            with torch.inference_mode():
                self.runner.capture_cuda_graphs(min(max_num_seqs, 256))

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
            "preemptions": self.scheduler.num_preemptions, "async_steps": self.num_async_steps,
            "num_waiting": len(self.scheduler.waiting), "num_running": len(self.scheduler.running),
        }
        if self.proposer is not None:
            out["speculative"] = self.proposer.stats.as_dict()
        return out

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
    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("prompt is text but this model has no tokenizer (no tokenizer.json beside the "
                                  "checkpoint): pass token ids, or LLM(..., tokenizer=DIR)")
            if not prompt:
                raise ConfigError("empty prompt: give at least one character or token")
            return prompt, self.tokenizer.encode_prompt(prompt)  # the checkpoint's tokenizer decides on BOS
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ConfigError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ConfigError("empty prompt: give at least one token")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ConfigError(f"token id(s) {bad[:5]} outside the vocabulary [0, {self.cfg.vocab_size})")
        return None, list(prompt)

    def _check_request(self, prompt: Prompt, params: SamplingParams) -> tuple[str | None, list[int]]:
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        text, ids = self._prompt_ids(prompt)
        if len(ids) >= self.max_model_len:
            raise ConfigError(f"prompt has {len(ids)} tokens but the context holds {self.max_model_len}, leaving no "
                              f"room to generate: shorten it or raise max_model_len")
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if len(ids) + 1 + self.scheduler.num_lookahead > capacity:
            raise ConfigError(f"prompt has {len(ids)} tokens but the paged cache holds {capacity}: give the engine "
                              f"more cache (num_blocks / kv_cache_memory)")
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")
        bad = [t for t in params.stop_token_ids if t >= self.cfg.vocab_size]
        if bad:
            raise ConfigError(f"stop_token_ids {bad} outside the vocabulary [0, {self.cfg.vocab_size})")
        # checked here, against this model's vocabulary, so that one request can never break a batched step
        if params.logprobs is not None and params.logprobs > self.cfg.vocab_size:
            raise ConfigError(f"logprobs {params.logprobs} exceeds the vocabulary size {self.cfg.vocab_size}")
        if params.top_k >= self.cfg.vocab_size:
            params.top_k = 0  # keeping every token is no filter at all
        return text, ids

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
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(self.device).manual_seed((params.seed * 1_000_003 + i) % 2**63)
            req.seqs.append(Sequence(next(self._seq_ids), req, i, gen))
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

    # ---------------------------------------------------------------- the step
    @torch.inference_mode()
    def _step(self) -> set[str]:
        """One engine step; returns the ids of requests that got new tokens or finished."""
        self.expert_load = {}
        plan = self.scheduler.schedule()
        touched = {seq.request.request_id for seq in plan.finished}
        if plan.scheduled and self._can_pipeline(plan):
            return touched | self._pipelined_step([seq for seq, _ in plan.scheduled])
        if self._in_flight is not None:  # settle the step in flight first: this one needs every token known
            touched |= self._resolve()
            plan.scheduled = [(seq, n) for seq, n in plan.scheduled if not seq.is_finished]
        if not plan.scheduled:
            return touched
        chunks, sampling = [], []
        for i, (seq, n) in enumerate(plan.scheduled):
            start = seq.num_computed
            tokens = seq.token_ids[start:start + n]
            if len(tokens) < n:
                tokens = tokens + seq.drafts[:n - len(tokens)]
            chunks.append(Chunk(seq.block_table, start, tokens))
            if start + n >= seq.num_tokens:
                sampling.append(i)
        seqs = [seq for seq, _ in plan.scheduled]
        replayed = hidden = None
        if self.proposer is None and len(sampling) == len(chunks):
            replayed = self.runner.decode_logits(chunks)
        if replayed is not None:
            logits, self.expert_load = replayed
        else:
            step = self.runner.prepare(chunks)
            hidden, self.expert_load = self.runner.forward(step)
            first = [step.offsets[i] + seqs[i].num_tokens - 1 - chunks[i].start for i in sampling]
            rows_idx = [r for i, f in zip(sampling, first) for r in range(f, f + 1 + len(seqs[i].drafts))]
            # indexed by a device tensor: a list index is copied from pageable memory, which waits for the forward
            logits = self.runner.logits(hidden.index_select(0, to_device(rows_idx, torch.long, hidden.device)))
        # one sampling row per position: a sequence's history grows by its drafts along its rows
        rows, first_rows = [], []
        for i in sampling:
            seq = seqs[i]
            first_rows.append(len(rows))
            penalties = seq.params.has_penalties
            prompt = seq.token_ids[:seq.num_prompt_tokens] if penalties else None
            for j in range(1 + len(seq.drafts)):
                rows.append(Row(seq.params, seq.generator, prompt,
                                seq.output_token_ids + seq.drafts[:j] if penalties else None))
        catchups = []
        if sampling:
            batch = make_batch(rows, self.cfg.vocab_size, logits.device)
            verified = verify(logits, batch, first_rows, [seqs[i] for i in sampling])
            if batch.max_logprobs is not None:
                emitted_rows = [r for v in verified for r in v.rows]
                tokens = torch.tensor([t for v in verified for t in v.tokens], device=logits.device)
                sub = make_batch([rows[r] for r in emitted_rows], self.cfg.vocab_size, logits.device)
                logprobs = iter(compute_logprobs(logits[emitted_rows], tokens, sub))
            else:
                logprobs = itertools.repeat(None)
        outcome = dict(zip(sampling, verified)) if sampling else {}
        for i, (seq, n) in enumerate(plan.scheduled):
            start = seq.num_computed
            touched.add(seq.request.request_id)
            v = outcome.get(i)
            if v is None:  # a prefill chunk that does not reach the end of the prompt
                seq.num_computed = start + n
                self.block_manager.register(seq)
                if self.proposer is not None:
                    catchups.append(Catchup(seq, start, seq.token_ids[start + 1:start + n + 1],
                                            self._rows(hidden, step, i, n), 0))
                continue
            had_drafts = len(seq.drafts)
            if self.proposer is not None and had_drafts:
                self.proposer.stats.record(had_drafts, v.accepted)
            computed = seq.num_tokens + v.accepted  # positions whose latents are now valid
            reason = self._append(seq, v.tokens, [next(logprobs) for _ in v.tokens])
            seq.num_computed = min(computed, seq.num_tokens)
            self.block_manager.register(seq)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                continue
            if self.proposer is not None:
                m = seq.num_computed - start
                catchups.append(Catchup(seq, start, seq.token_ids[start + 1:start + m + 1],
                                        self._rows(hidden, step, i, m),
                                        self.proposer.num_drafts(seq, self.max_model_len)))
        if self.proposer is not None:
            self.proposer.propose(catchups)
        return touched

    # ---------------------------------------------------------------- async scheduling
    def _can_pipeline(self, plan) -> bool:
        """Whether this step can run before the host knows the last step's tokens: plain decode (one token a
        sequence, no drafts), nothing preempted, no request wanting its history on the host (penalties,
        logprobs), and no sequence whose tokens in flight already complete it."""
        if not self.async_scheduling or self.proposer is not None or plan.preempted:
            return False
        for seq, n in plan.scheduled:
            p = seq.params
            num_tokens = len(seq.token_ids)  # pending tokens included: they will be outputs too
            if (n != 1 or seq.num_computed != num_tokens - 1 or p.has_penalties or p.logprobs is not None
                    or num_tokens - seq.num_prompt_tokens >= p.max_tokens or num_tokens >= self.max_model_len):
                return False
        return True

    def _pipelined_step(self, seqs: list[Sequence]) -> set[str]:
        """Launch a decode step whose inputs may still be on the device (the step in flight samples them),
        then settle the step in flight while this one runs: the host's bookkeeping overlaps the GPU."""
        chunks = [Chunk(seq.block_table, seq.num_computed, [seq.token_ids[-1]]) for seq in seqs]
        device_ids = None
        if self._in_flight is not None:
            prev = self._in_flight.row
            waiting = [i for i, seq in enumerate(seqs) if seq.num_pending]
            device_ids = DeviceIds(waiting, [prev[seqs[i].seq_id] for i in waiting], self._in_flight.tokens)
        batch = make_batch([Row(seq.params, seq.generator) for seq in seqs], self.cfg.vocab_size, self.device)
        replayed = self.runner.decode_logits(chunks, device_ids)
        if replayed is not None:
            logits, self.expert_load = replayed
        else:
            hidden, self.expert_load = self.runner.forward(self.runner.prepare(chunks, device_ids))
            logits = self.runner.logits(hidden)
        tokens, _ = sample(logits, batch, out=self.runner.token_buffer(len(seqs)))
        for seq in seqs:
            seq.num_computed = seq.num_tokens
            seq.token_ids.append(PENDING)
            seq.num_pending += 1
        launched = InFlight(seqs, tokens)
        self.num_async_steps += 1
        touched = self._resolve() if self._in_flight is not None else set()
        self._in_flight = launched
        return touched

    def _resolve(self) -> set[str]:
        """Take the step in flight's tokens (waiting for the device) and apply them as `_step` does: stop
        conditions, prefix-cache registration. A sequence finished or aborted meanwhile drops its token."""
        f, self._in_flight = self._in_flight, None
        touched = set()
        for seq, token in zip(f.seqs, f.host_tokens()):
            if seq.is_finished:
                continue
            touched.add(seq.request.request_id)
            first = len(seq.token_ids) - seq.num_pending  # this step's token; later steps' follow it
            seq.token_ids[first] = token
            seq.num_pending -= 1
            reason = self._stop_reason(seq, token)
            if reason is not None:  # the tokens pending after it were computed for nothing
                del seq.token_ids[first + 1:]
                seq.num_pending = 0
                seq.num_computed = min(seq.num_computed, seq.num_tokens)
            self.block_manager.register(seq)
            if reason is not None:
                self.scheduler.finish(seq, reason)
        return touched

    @staticmethod
    def _rows(hidden, step, i, m):
        return hidden[step.offsets[i]:step.offsets[i] + m]

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list[Logprob | None]) -> str | None:
        """Append emitted tokens one by one until a stop condition; returns the finish reason, if any."""
        for tok, lp in zip(tokens, logprobs):
            seq.token_ids.append(tok)
            if lp is not None:
                seq.logprobs.append(lp)
                seq.cumulative_logprob += lp.logprob
            reason = self._stop_reason(seq, tok)
            if reason is not None:
                return reason
        return None

    def _stop_reason(self, seq: Sequence, tok: int) -> str | None:
        """Whether seq stops at `tok`, its newest known token (tokens still pending after it do not count)."""
        p = seq.params
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        if p.stop and self._stop_string(seq):
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens - seq.num_pending >= self.max_model_len:
            return "length"
        return None

    # ---------------------------------------------------------------- text
    def _detokenize(self, seq: Sequence) -> None:
        """Extend seq.text by the output tokens decoded since the last call (complete characters only)."""
        ids = seq.output_token_ids
        if seq.read_offset >= len(ids):
            return
        decode, skip = self.tokenizer.decode, seq.params.skip_special_tokens
        prefix = decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
        full = decode(ids[seq.prefix_offset:], skip_special_tokens=skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.text += full[len(prefix):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)

    def _stop_string(self, seq: Sequence) -> bool:
        """Whether the newest token completed a stop string; if so cut the text before it."""
        before = len(seq.text)
        self._detokenize(seq)
        lo = max(0, before - max(len(s) for s in seq.params.stop) + 1)
        hits = [i for i in (seq.text.find(s, lo) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        seq.text = seq.text[:min(hits)]
        seq.text_final = True
        return True

    def _output(self, req: Request, streaming: bool) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            text = delta_text = None
            if self.tokenizer is not None:
                if seq.is_finished and not seq.text_final:
                    seq.text = self.tokenizer.decode(seq.output_token_ids,
                                                     skip_special_tokens=seq.params.skip_special_tokens)
                    seq.text_final = True
                elif streaming and not seq.is_finished:
                    self._detokenize(seq)
                visible = len(seq.text)
                if seq.params.stop and not seq.is_finished:  # hold back what may become a stop string
                    visible = max(seq.text_reported, visible - max(len(s) for s in seq.params.stop) + 1)
                text, delta_text = seq.text[:visible], seq.text[seq.text_reported:visible]
                seq.text_reported = visible
            ids = seq.output_token_ids
            delta_ids = ids[seq.num_reported:]
            seq.num_reported = len(ids)
            want = seq.params.logprobs is not None
            outs.append(CompletionOutput(seq.index, ids, text, seq.finish_reason, list(seq.logprobs) if want else None,
                                         seq.cumulative_logprob if want else None, delta_ids, delta_text or ""))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished,
                             req.seqs[0].num_cached_prompt_tokens)

    # ---------------------------------------------------------------- public loops
    def step(self) -> list[RequestOutput]:
        """Run one step; outputs (with deltas) for every request that changed. Finished requests are
        reported once and then forgotten."""
        outs = []
        for rid in self._step():
            req = self.requests.get(rid)
            if req is None:
                continue
            outs.append(self._output(req, streaming=True))
            if req.finished:
                del self.requests[rid]
        return outs

    @staticmethod
    def _as_list(prompts) -> list:
        """One prompt (a string, or token ids) or a sequence of them, as a list of prompts."""
        if isinstance(prompts, (str, torch.Tensor)) or (
                isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts)):
            return [prompts]
        return list(prompts)

    def _normalise(self, prompts, sampling_params) -> list[tuple[str | None, list[int], SamplingParams]]:
        prompts = self._as_list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ConfigError(f"{len(sampling_params)} SamplingParams for {len(prompts)} prompts: give one, "
                                  f"or one per prompt")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        items = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                items.append((*self._check_request(prompt, p), p))
            except ConfigError as err:
                raise ConfigError(f"prompt {i}: {err}" if len(prompts) > 1 else str(err)) from None
            if p.n > self.scheduler.max_waiting:
                raise ConfigError(f"prompt {i}: n={p.n} exceeds the waiting queue bound max_waiting="
                                  f"{self.scheduler.max_waiting}")
        return items

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
            touched = self._step()
            if not touched and not self.scheduler.running and self.scheduler.waiting:
                raise RuntimeError("engine stalled: waiting requests cannot be scheduled")
            for rid in touched & mine:
                req = self.requests[rid]
                if streaming or req.finished:
                    yield self._output(req, streaming)
                if req.finished:
                    mine.discard(rid)
                    del self.requests[rid]

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete every prompt (strings, or lists of token ids); one RequestOutput per prompt, in order.
        All prompts are checked before any work starts."""
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
        return [results[rid] for rid in order]

    def stream(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None
               ) -> Iterator[RequestOutput]:
        """Like generate, but yield a RequestOutput whenever a request gets new tokens: `delta_token_ids` and
        `delta_text` of each completion hold what is new; the last output of a request has finished=True."""
        yield from self._run(prompts, sampling_params, streaming=True)
