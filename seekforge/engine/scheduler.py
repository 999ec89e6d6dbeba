"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget (max_num_batched_tokens). Running sequences go first, in admission order:
a decoding one takes 1 token plus its drafts, one still prefilling takes the rest of its prompt or as
much as the budget leaves (chunked prefill), so long prompts never stall decoding for more than a
chunk. Then waiting sequences are admitted while budget, sequence slots and cache blocks last, taking
whatever prefix of their tokens the prefix cache already holds. When a running sequence needs a block
and none is free, the most recently admitted sequence is preempted: its blocks are released (they stay
in the prefix cache until evicted) and it waits at the front of the queue to be recomputed, generated
tokens included, so its output is unchanged. The waiting queue is bounded: adding past the bound
raises QueueFullError instead of growing without limit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from seekforge.engine.block_manager import BlockManager
from seekforge.engine.sequence import Sequence, SequenceStatus
from seekforge.errors import SeekforgeError


class QueueFullError(SeekforgeError):
    """The engine's waiting queue is full: retry later or raise max_waiting."""


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # ended by the scheduler (cache too small)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, max_waiting: int, num_lookahead: int = 0, chunked_prefill: bool = True):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_waiting = max_waiting
        self.num_lookahead = num_lookahead  # extra slots a sampling step may write (MTP draft chain)
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def has_room(self, num_seqs: int) -> bool:
        return len(self.waiting) + num_seqs <= self.max_waiting

    def add(self, seqs: list[Sequence]) -> None:
        if not self.has_room(len(seqs)):
            raise QueueFullError(f"the waiting queue holds {len(self.waiting)} of at most {self.max_waiting} "
                                 f"sequences; retry when requests finish or raise max_waiting")
        self.waiting.extend(seqs)

    def _slots(self, seq: Sequence, start: int, num_new: int) -> int:
        """Cache slots seq needs to compute num_new tokens from `start` (and draft after, if it samples)."""
        end = start + num_new
        if end >= seq.num_tokens:
            end += self.num_lookahead
        return min(end, self.max_model_len)  # drafts never reach past the context

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        block_size, lookahead, max_len = self.bm.block_size, self.num_lookahead, self.max_model_len
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = len(seq.token_ids) - seq.num_computed
            if seq.drafts and remaining + len(seq.drafts) > budget and remaining <= budget:
                self._trim_drafts(seq, budget - remaining)
            num_new = remaining + len(seq.drafts)
            if num_new > budget:
                num_new = budget
            # grown only where its blocks lack a slot the step may write (most decode steps lack none: nothing to check)
            held = len(seq.block_table) * block_size
            if held < seq.num_computed + num_new + lookahead and held < max_len:
                need = self._slots(seq, seq.num_computed, num_new)
                if self.bm.blocks_for(need) > self.bm.num_blocks:
                    self.finish(seq, "length")  # could not fit even alone: the cache is too small for it
                    out.finished.append(seq)
                    continue
                if not self._make_room(seq, need, out):
                    break
                self.bm.grow(seq, need)
            out.scheduled.append((seq, num_new))
            budget -= num_new
            i += 1
        if out.preempted:
            return out
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            if self._follows_prefill(seq):
                i += 1
                continue
            hits = self._match(seq, budget)
            if hits is None:  # its cached prefix is still on its way up from a lower tier (engine.tiered_blocks)
                i += 1
                continue
            start = len(hits) * self.bm.block_size
            remaining = seq.num_tokens - start
            if remaining > budget and not self.chunked_prefill:
                break
            num_new = min(remaining, budget)
            need = self._slots(seq, start, num_new)
            if not self.bm.can_allocate(seq, hits, need):
                break
            self.bm.allocate(seq, hits, need)
            del self.waiting[i]
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, num_new))
            budget -= num_new
        return out

    def _match(self, seq: Sequence, budget: int) -> list[int] | None:
        """The cached blocks a waiting sequence starts from, when admitted in a step that may still compute
        `budget` tokens (None: not yet)."""
        return self.bm.match_prefix(seq)

    def _make_room(self, seq: Sequence, need: int, out: SchedulerOutput) -> bool:
        """Preempts the latest running sequences until seq's blocks can grow to `need` slots; False where seq
        itself had to go."""
        while not self.bm.can_grow(seq, need):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _follows_prefill(self, seq: Sequence) -> bool:
        """Completions after the first wait until it has cached the prompt's full blocks, then share them."""
        leader = seq.leader
        if leader is None or leader.status is not SequenceStatus.RUNNING:
            return False
        full = (seq.num_prompt_tokens - 1) // self.bm.block_size * self.bm.block_size
        return leader.num_computed < full

    @staticmethod
    def _trim_drafts(seq: Sequence, keep: int) -> None:
        seq.drafts = seq.drafts[:keep]
        if seq.draft_probs is not None:
            seq.draft_probs = seq.draft_probs[:keep] if keep else None

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        seq.drafts, seq.draft_probs = [], None
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if seq.status is not SequenceStatus.FINISHED:
            seq.request.num_finished += 1
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.bm.free_seq(seq)
