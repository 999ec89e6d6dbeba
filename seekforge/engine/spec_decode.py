"""Speculative decoding with the model's own MTP module (DeepSeek-V3): draft, then verify in one forward.

Drafting. MTP module 0 at position p reads the main model's hidden state h_p and the embedding of
t_{p+1} and predicts t_{p+2}. After each step it catches up on every position whose next token became
known (a prefill chunk, or the accepted part of a verification), caching its own latents in a paged
cache layer beside the main ones; its output at the last position drafts d_1. Further drafts reuse the
module autoregressively (its output hidden state stands in for the unknown h, as vLLM and EAGLE do):
the second and later MTP modules of a checkpoint are not used. Blocks taken from the prefix cache carry
the MTP latents computed with them; at a block's last position those saw whatever token followed it
there, so the first drafts after a shared prefix can be a little worse. Outputs never depend on drafts.

Verification. The next step feeds [last token, d_1..d_k] through the main model, which yields the
target distribution at every draft position. Greedy rows accept drafts while they equal the argmax,
then emit the argmax at the first mismatch (or after the last draft): exactly plain greedy decoding.
Sampled rows use the standard rejection rule: accept d_j with probability min(1, p(d_j) / q(d_j));
at the first rejection draw from normalise(max(p - q, 0)), after full acceptance draw from p, so the
emitted tokens follow p exactly (Leviathan et al. 2023; Chen et al. 2023).

Draws. Each is counter-based (`seekforge.engine.sampler`): a draft is drawn in stream DRAFT at its own token index,
the acceptance uniforms in stream ACCEPT and the emitted token in stream SAMPLE at the index it takes, so the three
are independent, as the rule needs, and a sequence without drafts draws as plain sampling does. A seeded sequence's
tokens then depend on its drafts only: a preemption (which drops them) or a token budget that trims them changes
which draws decide, not the distribution.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from seekforge import ops
from seekforge.engine.async_step import InFlight
from seekforge.engine.device_copy import to_device
from seekforge.engine.model_runner import Chunk, DeviceIds, ModelRunner
from seekforge.engine.sampler import (ACCEPT, DRAFT, SAMPLE, BatchCache, Row, RowKeys, SamplingBatch, filter_logits,
                                      make_batch, sample, target_logits)
from seekforge.engine.sequence import PENDING, Sequence


@dataclass
class SpecStats:
    """Acceptance per draft position: accepted[j] / proposed[j] is how often draft j + 1 was kept."""

    proposed: list[int]
    accepted: list[int]
    verify_steps: int = 0
    emitted: int = 0  # tokens produced by verification steps (accepted drafts + one each)

    @classmethod
    def empty(cls, k: int) -> SpecStats:
        return cls([0] * k, [0] * k)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        for j in range(num_drafts):
            self.proposed[j] += 1
            self.accepted[j] += j < num_accepted
        self.verify_steps += 1
        self.emitted += num_accepted + 1

    @property
    def acceptance_rate(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def mean_tokens_per_step(self) -> float:
        return self.emitted / self.verify_steps if self.verify_steps else 0.0

    def as_dict(self) -> dict:
        return {"acceptance_rate": self.acceptance_rate, "proposed": list(self.proposed),
                "accepted": list(self.accepted), "mean_tokens_per_step": self.mean_tokens_per_step}


@dataclass
class Catchup:
    """Positions [start, start + len(next_ids)) of one sequence whose next tokens are now known."""

    seq: Sequence
    start: int
    next_ids: list[int]
    hidden: torch.Tensor  # main-model hidden states at those positions [m, dim]
    draft: int  # how many tokens to draft after catching up (0: none)


class Verified(NamedTuple):
    """One sequence's outcome of a step (a tuple: a step makes one per sequence)."""

    tokens: list[int] | tuple[int, ...]  # accepted drafts then one target token
    accepted: int
    rows: range | tuple[int, ...]  # logits row of each emitted token


def verify(logits: torch.Tensor, batch: SamplingBatch, first_rows: list[int], seqs: list[Sequence]) -> list[Verified]:
    """Verify each sequence's drafts against target logits and draw its next token (a sequence without
    drafts is plain sampling). Sequence i owns rows first_rows[i] .. first_rows[i] + len(drafts); batch
    describes every row of logits [R, vocab]. Sequence i's draws: its acceptance uniforms (stream ACCEPT) and its
    emitted token's (SAMPLE) at counter num_tokens + accepted, as plain sampling draws its next token."""
    dev, b = logits.device, len(seqs)
    k = max(len(s.drafts) for s in seqs)
    if k == 0:  # no drafts anywhere: plain sampling
        tokens = sample(logits, batch, (len(s.token_ids) for s in seqs))[0].tolist()
        return [Verified((tokens[r],), 0, (r,)) for r in first_rows]
    if batch.all_greedy:
        return _verify_greedy(logits, batch, first_rows, seqs)
    n = np.fromiter((len(s.drafts) for s in seqs), np.int64, b)
    # every per-sequence input in one copy to the device (a list each would be a copy each, which on CUDA waits for
    # the forward): the row of each position j <= k (a sequence's last row past its drafts), the drafts (0 past
    # them), their number and whether the row is greedy
    j = np.arange(k + 1)
    host = np.zeros((b, 2 * k + 3), np.int64)
    host[:, :k + 1] = np.asarray(first_rows, np.int64)[:, None] + np.minimum(j, n[:, None])
    host[:, k + 1:2 * k + 1][j[:k] < n[:, None]] = np.fromiter(itertools.chain.from_iterable(s.drafts for s in seqs),
                                                                 np.int64, int(n.sum()))
    host[:, 2 * k + 1] = n
    host[:, 2 * k + 2] = [s.params.greedy for s in seqs]
    packed = to_device(host, torch.long, dev)
    index, drafts, n_drafts = packed[:, :k + 1], packed[:, k + 1:2 * k + 1], packed[:, 2 * k + 1]
    greedy = packed[:, 2 * k + 2].bool()
    j = torch.arange(k + 1, device=dev)
    penalised = target_logits(logits, batch)
    target = penalised.argmax(dim=-1)[index]  # [B, k + 1]
    p = filter_logits(penalised, batch).softmax(dim=-1)[index]  # [B, k + 1, vocab]
    q = torch.zeros(len(seqs), k, p.shape[-1], device=dev)
    for i, s in enumerate(seqs):
        if s.draft_probs is not None:
            q[i, :len(s.drafts)] = s.draft_probs
    keys, counters = RowKeys.of([s.key for s in seqs], dev).at((len(s.token_ids) for s in seqs), len(seqs), dev)
    u = ops.uniform(keys, counters, ACCEPT, k)
    p_d = p[:, :k].gather(2, drafts.unsqueeze(2)).squeeze(2)
    q_d = q.gather(2, drafts.unsqueeze(2)).squeeze(2)
    keep = torch.where(greedy.unsqueeze(1), drafts == target[:, :k], u * q_d < p_d)
    keep &= j[:k].unsqueeze(0) < n_drafts.unsqueeze(1)
    accepted = keep.int().cumprod(dim=1).sum(dim=1)  # [B]
    at = accepted.view(-1, 1, 1).expand(-1, 1, p.shape[-1])
    p_a = p.gather(1, at).squeeze(1)
    q_a = torch.cat([q, q.new_zeros(len(seqs), 1, q.shape[-1])], dim=1)  # q is 0 past the drafts
    q_a = q_a.gather(1, at).squeeze(1)
    residual = (p_a - q_a).clamp(min=0)
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_a)
    sampled = ops.exponential_race(residual, keys, counters + accepted, SAMPLE)
    final = torch.where(greedy, target.gather(1, accepted.unsqueeze(1)).squeeze(1), sampled)
    # the host's one wait for the device this step: the accepted counts and emitted tokens in one copy
    accepted_host, final_host = torch.stack([accepted, final]).tolist()
    return [Verified(s.drafts[:a] + [tok], a, range(first, first + a + 1))
            for s, a, tok, first in zip(seqs, accepted_host, final_host, first_rows)]


def _verify_greedy(logits: torch.Tensor, batch: SamplingBatch, first_rows: list[int],
                   seqs: list[Sequence]) -> list[Verified]:
    """`verify` where every row is greedy: each row's argmax (of the penalised logits) comes back in the step's one
    copy, and the host keeps each sequence's drafts while they equal its rows' argmaxes, then emits the argmax at
    the first mismatch (or after the last draft). No per-sequence input goes to the device and the device runs one
    kernel where the general rule runs a dozen: a speculative step's host work stays close to a plain step's."""
    target = ops.argmax(target_logits(logits, batch)).tolist()
    out = []
    for s, first in zip(seqs, first_rows):
        drafts, a = s.drafts, 0
        for d, t in zip(drafts, target[first:first + len(drafts)]):
            if d != t:
                break
            a += 1
        out.append(Verified(drafts[:a] + [target[first + a]], a, range(first, first + a + 1)))
    return out


class MTPProposer:
    def __init__(self, runner: ModelRunner, num_tokens: int):
        self.runner = runner
        self.k = num_tokens
        self.stats = SpecStats.empty(num_tokens)
        # the drafts `settle` writes: (sequence, index in its drafts) of each, and their tokens
        self._pending: tuple[list[tuple[Sequence, int]], InFlight] | None = None
        self._plain_batches = BatchCache(runner.cfg.vocab_size, runner.device)  # draft rows without penalties

    def settle(self) -> None:
        """Write the drafts `propose` left on the device into their sequences, waiting for it if they are not back
        yet. They stand as PENDING until then: the next step's inputs are the first to read them, so the host settles
        the step that drafted them (outputs, scheduling) while the device drafts, where reading each at once would
        leave the device idle meanwhile. A sequence whose drafts were dropped or trimmed since keeps what it has."""
        if self._pending is None:
            return
        (placed, drafted), self._pending = self._pending, None
        for (seq, j), token in zip(placed, drafted.host_tokens()):
            if len(seq.drafts) > j:
                seq.drafts[j] = token

    def _batch(self, seqs: list[Sequence], penalties: bool, vocab_size: int, device) -> SamplingBatch:
        """The draft rows' sampling batch, one row a sequence. With penalties a penalised row carries its history
        (prompt, output and drafts so far), built anew; without, the batch is kept from the last call over the same
        sequences, so steady drafting builds no rows."""
        if penalties:
            return make_batch([Row(s.params, s.key, s.token_ids[:s.num_prompt_tokens] if s.params.has_penalties
                                   else None, s.output_token_ids + s.drafts if s.params.has_penalties else None)
                               for s in seqs], vocab_size, device)
        return self._plain_batches.get(seqs)

    def num_drafts(self, seq: Sequence, max_model_len: int) -> int:
        """Drafts worth making for seq's next step: within the context and the token budget; none for a
        constrained sequence (its mask is known for the next position only), nor for one whose next tokens an
        in-chain tool already inserted (drafts follow the last token; the inserted ones are computed first)."""
        if seq.matcher is not None or seq.num_tokens - seq.num_computed > 1:
            return 0
        left = seq.params.max_tokens - seq.num_output_tokens
        return max(0, min(self.k, max_model_len - seq.num_tokens, left - 1))

    def propose(self, items: list[Catchup]) -> None:
        """Run MTP over every item's new positions, then set drafts (and their distributions) on the
        sequences that asked for them. Each MTP step replays a captured graph where it fits one
        (`ModelRunner.mtp_step`); sampling stays here, on the rows that draft. The drafts' values reach the
        sequences at `settle` (PENDING until then); their number is set here."""
        self._pending = None
        for it in items:
            it.seq.drafts, it.seq.draft_probs = [], None
        if not items:
            return
        runner = self.runner
        h, logits = runner.mtp_step([Chunk(it.seq.block_table, it.start, it.next_ids) for it in items],
                                    [it.hidden for it in items])
        live, batch, tokens = items, None, None
        # a draft row's history (prompt, output and drafts so far) is read only by penalties: without them the drafts
        # stay on the device, each chain step takes the last from there, and all come back at once (`settle`); with
        # them each depth's are read at once (the next depth's history), but for the last
        penalties = any(it.seq.params.has_penalties for it in items)
        position = [it.start + len(it.next_ids) for it in items]  # where the next chain step sits
        placed, deferred = [], []  # the deferred drafts: (sequence, index in its drafts), and their tokens by depth
        for depth in itertools.count():
            keep = [i for i, it in enumerate(live) if it.draft > depth]
            if not keep:
                break
            if len(keep) < len(live):
                index = to_device(keep, torch.long, h.device)
                live, position, batch = [live[i] for i in keep], [position[i] for i in keep], None
                h, logits = h.index_select(0, index), logits.index_select(0, index)
                tokens = None if tokens is None else tokens.index_select(0, index)
            if depth:
                chain = [Chunk(it.seq.block_table, p, [it.seq.drafts[-1]]) for it, p in zip(live, position)]
                on_device = None if penalties else DeviceIds(list(range(len(live))), list(range(len(live))), tokens)
                h, logits = runner.mtp_step(chain, h.split(1), on_device)
                position = [p + 1 for p in position]
            if batch is None or penalties:  # without history a row's batch is the same at every depth
                batch = self._batch([it.seq for it in live], penalties, logits.shape[-1], logits.device)
            drafted = (len(it.seq.token_ids) + len(it.seq.drafts) for it in live)  # the index of each draft
            tokens, probs = sample(logits, batch, drafted, DRAFT, want_probs=True)
            if penalties and any(it.draft > depth + 1 for it in live):
                values = tokens.tolist()
            else:
                values = itertools.repeat(PENDING)
                placed += [(it.seq, depth) for it in live]
                deferred.append(tokens)
            for i, (it, token) in enumerate(zip(live, values)):
                it.seq.drafts.append(token)
                if probs is not None and not it.seq.params.greedy:
                    p = probs[i:i + 1]
                    it.seq.draft_probs = p if it.seq.draft_probs is None else torch.cat([it.seq.draft_probs, p])
        if placed:
            self._pending = placed, InFlight([seq for seq, _ in placed],
                                             deferred[0] if len(deferred) == 1 else torch.cat(deferred))
