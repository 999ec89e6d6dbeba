"""What a request gives back: RequestOutputs, the stop conditions applied to each new token, and the
incremental detokenising that stop strings and streamed text need."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from seekforge.engine.sequence import Logprob, Request, Sequence


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
    num_inserted_tokens: int = 0  # of token_ids, those an in-chain tool inserted (SamplingParams.inserter)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first completion)
    prompt_logprobs: list[Logprob | None] | None = None  # per prompt token (the first None), when asked for
    dual_chain: Any = None  # LLM.generate(..., dual_chain=...): which chain answered, and how sure (its decide())

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


class Outputs:
    """LLM's stop conditions and outputs (a mixin: reads the LLM's tokenizer, eos_ids and max_model_len)."""

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list[Logprob | None]) -> tuple[str | None, int]:
        """Append emitted tokens one by one until a stop condition, or until the sequence's in-chain tool inserts
        tokens after one (seekforge.engine.insertion: the emitted tokens after it are dropped). Returns the finish
        reason, if any, and the sequence's length before the inserted tokens (those still need computing)."""
        for tok, lp in zip(tokens, logprobs):
            reason = self._take(seq, tok, lp)
            if reason is not None:
                return reason, len(seq.token_ids)
            inserted = seq.inserter.accept(tok) if seq.inserter is not None else None
            if inserted:
                kept = seq.num_tokens
                for extra in inserted:
                    seq.num_inserted += 1
                    reason = self._take(seq, extra, Logprob(extra, 0.0) if seq.params.logprobs is not None else None)
                    if reason is not None:
                        return reason, kept
                    seq.inserter.accept(extra)  # the state sees the text; insertions do not nest
                return None, kept
        return None, len(seq.token_ids)

    def _take(self, seq: Sequence, tok: int, lp: Logprob | None) -> str | None:
        seq.token_ids.append(tok)
        if lp is not None:
            seq.logprobs.append(lp)
            seq.cumulative_logprob += lp.logprob
        if seq.matcher is not None:
            seq.matcher.accept(tok)
        return self._stop_reason(seq, tok)

    def _stop_reason(self, seq: Sequence, tok: int) -> str | None:
        """Whether seq stops at `tok`, its newest known token (tokens still pending after it do not count)."""
        p = seq.params
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        if seq.matcher is not None and seq.matcher.finished:
            return "stop"
        if p.stop and self._stop_string(seq):
            return "stop"
        known = len(seq.token_ids) - seq.num_pending
        if known - seq.num_prompt_tokens >= p.max_tokens or known >= self.max_model_len:
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
                                         seq.cumulative_logprob if want else None, delta_ids, delta_text or "",
                                         seq.num_inserted))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished,
                             req.seqs[0].num_cached_prompt_tokens, req.prompt_logprobs)
