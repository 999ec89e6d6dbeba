"""Turns logits into tokens for a batch of rows, each with its own SamplingParams, vectorised over rows.

A row is one position that needs a token: a sequence's next token, or one position of a speculative
verification (whose history includes the drafts before it). Steps, in transformers' order: penalties
(repetition over prompt and output, presence and frequency over the output), temperature, top-k, top-p,
min-p. Greedy rows take the argmax of the penalised logits. A token is drawn by the exponential race
(argmax of p / E, E ~ Exp(1)), which needs one vector of draws per row and no cumulative sums.

The draws are counter-based (`seekforge.ops.rng`), all rows' in one op: a seeded row's are a function of its
sequence's key (the request's seed and the completion's index), the index in the sequence of the token drawn, and
the stream (what the draw is for), so the same seed gives the same completion whatever else is in the batch, after
a preemption's recompute, with async scheduling and on any device; an unseeded row draws with a fresh key from
torch's default generator (reproducible when the caller seeds torch).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from seekforge import ops
from seekforge.engine.device_copy import padded_tables, to_device
from seekforge.engine.sampling_params import SamplingParams
from seekforge.engine.sequence import Logprob

SAMPLE, DRAFT, ACCEPT = 0, 1, 2  # a token's streams: its sample (or verification's residual draw), MTP's draft of
# it, the draft's acceptance uniform: independent draws, as speculative decoding's rejection rule needs


@dataclass
class Row:
    params: SamplingParams
    key: int | None  # its sequence's random key (Sequence.key: the request has a seed); None: fresh draws
    prompt_ids: list[int] | None = None  # only needed for penalties
    output_ids: list[int] | None = None  # output so far, drafts before this position included


@dataclass
class RowKeys:
    """The rows' random keys: a seeded row's is its sequence's, an unseeded row's fresh at every draw."""

    seeded_keys: torch.Tensor | None  # [R] int64, the seeded rows' keys (0 elsewhere); None when no row is seeded
    mask: torch.Tensor | None  # [R] bool, which rows are seeded, where some are and some not; else None

    @classmethod
    def of(cls, keys: list[int | None], device) -> RowKeys:
        seeded = [k is not None for k in keys]
        if not any(seeded):
            return cls(None, None)
        return cls(to_device([k or 0 for k in keys], torch.long, device),
                   None if all(seeded) else to_device(seeded, torch.bool, device))

    def at(self, counters: Iterable[int], rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, counters) [rows] int64 of a draw: each row's index in its sequence of the token drawn (`counters`,
        read only where a row is seeded) and key (an unseeded row's from torch's default generator)."""
        if self.seeded_keys is None:
            fresh = torch.empty(rows, dtype=torch.long, device=device).random_()
            return fresh, torch.zeros_like(fresh)
        counters = to_device(list(counters), torch.long, device)
        if self.mask is None:
            return self.seeded_keys, counters
        return torch.where(self.mask, self.seeded_keys, torch.empty_like(self.seeded_keys).random_()), counters


@dataclass
class SamplingBatch:
    rows: list[Row]
    greedy: torch.Tensor | None  # [R] bool; None when every row or none is (no host-to-device copy then)
    all_greedy: bool
    temperature: torch.Tensor | None  # [R, 1]; None when every row is greedy
    top_k: torch.Tensor | None  # [R] (vocab where off) or None when no row uses it
    top_p: torch.Tensor | None  # [R, 1]
    min_p: torch.Tensor | None  # [R, 1]
    penalties: tuple | None  # (repetition [R,1], presence [R,1], frequency [R,1]) when any row uses them
    max_logprobs: int | None  # the largest `logprobs` asked for, None when no row asks
    keys: RowKeys  # the rows' random keys (none when every row is greedy)


def make_batch(rows: list[Row], vocab_size: int, device: torch.device) -> SamplingBatch:
    ps = [r.params for r in rows]

    def col(values, dtype=torch.float32):
        return to_device(values, dtype, device).unsqueeze(1)

    greedy = [p.temperature == 0 for p in ps]
    all_greedy = all(greedy)
    top_k = [p.top_k or vocab_size for p in ps]
    asked = [p.logprobs for p in ps if p.logprobs is not None]
    return SamplingBatch(
        rows=rows,
        greedy=to_device(greedy, torch.bool, device) if any(greedy) and not all_greedy else None,
        all_greedy=all_greedy,
        temperature=None if all_greedy else col([p.temperature or 1.0 for p in ps]),
        top_k=to_device(top_k, torch.long, device) if any(k < vocab_size for k in top_k) else None,
        top_p=col([p.top_p for p in ps]) if any(p.top_p < 1 for p in ps) else None,
        min_p=col([p.min_p for p in ps]) if any(p.min_p > 0 for p in ps) else None,
        penalties=(col([p.repetition_penalty for p in ps]), col([p.presence_penalty for p in ps]),
                   col([p.frequency_penalty for p in ps])) if any(p.has_penalties for p in ps) else None,
        max_logprobs=max(asked) if asked else None,
        keys=RowKeys(None, None) if all_greedy else RowKeys.of([r.key for r in rows], device),
    )


class BatchCache:
    """The sampling batch of rows without history (no penalties), kept while it is asked for over the same sequences
    sampling as many rows each: steady decoding, speculative or not, and steady drafting build no rows and copy no
    parameters to the device."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self._key: tuple | None = None
        self._batch: SamplingBatch | None = None

    def get(self, seqs, rows_each: tuple[int, ...] | None = None) -> SamplingBatch:
        """The batch over `seqs` (Sequences): rows_each[i] rows for seqs[i] (None: one each)."""
        if rows_each is None:
            rows_each = (1,) * len(seqs)
        key = tuple(s.seq_id for s in seqs), rows_each
        if key != self._key:
            rows = [Row(s.params, s.key) for s, n in zip(seqs, rows_each) for _ in range(n)]
            self._key, self._batch = key, make_batch(rows, self.vocab_size, self.device)
        return self._batch


def broadcast_batch(params: SamplingParams, vocab_size: int, device) -> SamplingBatch:
    """`params`' temperature, top-k, top-p and min-p as a one-row batch whose tensors broadcast over any
    number of rows in `filter_logits`: how a trainer recomputes the distribution the engine sampled from
    (GRPO's log-probabilities). Penalties depend on each row's history and have no such form."""
    if params.greedy or params.has_penalties:
        raise ValueError("broadcast_batch: a sampled distribution (temperature > 0) without penalties only")
    return make_batch([Row(params, None)], vocab_size, device)


def _padded(lists: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The lists as rows [len(lists), longest] of ids (0 past each list) and of which entries are present: built on
    the host and copied in one transfer each, not one per list (on CUDA a copy from a list waits for the device)."""
    counts = np.fromiter(map(len, lists), np.int64, len(lists))
    width = max(1, int(counts.max(initial=0)))
    ids = padded_tables(lists, width, 0)
    return to_device(ids, torch.long, device), to_device(np.arange(width) < counts[:, None], torch.bool, device)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    repetition, presence, frequency = batch.penalties
    out_ids, out_present = _padded([r.output_ids or [] for r in batch.rows], logits.device)
    counts = torch.zeros_like(logits).scatter_add_(1, out_ids, out_present.float())
    prompt_ids, prompt_present = _padded([r.prompt_ids or [] for r in batch.rows], logits.device)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen.scatter_(1, prompt_ids, prompt_present).logical_or_(counts > 0)
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalised, logits)
    return logits - frequency * counts - presence * (counts > 0).float()


def filter_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on rows [R, vocab]; excluded tokens get -inf."""
    logits = logits / batch.temperature
    if batch.top_k is not None or batch.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if batch.top_k is not None:
            drop |= torch.arange(logits.shape[-1], device=logits.device) >= batch.top_k.unsqueeze(1)
        if batch.top_p is not None:
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
            drop |= before >= batch.top_p  # keeps the smallest prefix reaching top_p (always >= 1 token)
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if batch.min_p is not None:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < batch.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def target_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Penalised logits: what greedy rows argmax over and sampled rows filter."""
    return apply_penalties(logits, batch) if batch.penalties is not None else logits


def sample(logits: torch.Tensor, batch: SamplingBatch, counters: Iterable[int], stream: int = SAMPLE,
           want_probs: bool = False, out: torch.Tensor | None = None):
    """logits [R, vocab] (fp32) -> tokens [R] (written into `out` [R] int64 where given, and returned), and the
    sampling distributions [R, vocab] when asked (None when every row is greedy). `counters`: each row's index in
    its sequence of the token it draws (read only where a row is seeded)."""
    penalised = target_logits(logits, batch)
    if batch.all_greedy:
        return ops.argmax(penalised, out), None
    probs = filter_logits(penalised, batch).softmax(dim=-1)
    drawn = ops.exponential_race(probs, *batch.keys.at(counters, len(batch.rows), probs.device), stream)
    tokens = drawn if batch.greedy is None else torch.where(batch.greedy, ops.argmax(penalised), drawn)
    return (tokens if out is None else out.copy_(tokens)), (probs if want_probs else None)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[Logprob]:
    """Log-probabilities under logits [R, vocab] of tokens [R], with each row's top k."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    top_v, top_i = logp.topk(k, dim=-1) if k else (None, None)
    top_v = top_v.tolist() if k else None
    top_i = top_i.tolist() if k else None
    return [Logprob(tok, chosen[i], dict(zip(top_i[i], top_v[i])) if k else {}) for i, tok in enumerate(tokens.tolist())]


def compute_logprobs(logits: torch.Tensor, tokens: torch.Tensor, batch: SamplingBatch) -> list[Logprob | None]:
    """Model log-probabilities (raw logits, before penalties and temperature) of the chosen tokens, and
    the top-k of each row that asked; None for rows that did not ask."""
    if batch.max_logprobs is None:
        return [None] * len(batch.rows)
    out = []
    for row, lp in zip(batch.rows, logprobs_of(logits, tokens, batch.max_logprobs)):
        k = row.params.logprobs
        out.append(None if k is None else Logprob(lp.token_id, lp.logprob, dict(list(lp.top.items())[:k])))
    return out
