"""Request checks and prompt encoding: every prompt and parameter set is checked against the model (its
vocabulary, context and cache) before any work, so one bad request never disturbs the others."""

from __future__ import annotations

import torch

from seekforge.engine.sampling_params import SamplingParams
from seekforge.errors import ConfigError

Prompt = str | list[int]


class RequestChecks:
    """LLM's request checks (a mixin: reads the LLM's tokenizer, cfg, max_model_len, block manager, scheduler)."""

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
