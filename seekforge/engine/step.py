"""One engine step: schedule, run the model over the packed chunks, sample (through spec_decode.verify, which
without drafts is plain sampling), apply the tokens (stop conditions, prefix cache), and with MTP draft the
next step's tokens."""

from __future__ import annotations

import itertools
import time

import torch

from seekforge.engine.constraint import mask_rows
from seekforge.engine.device_copy import to_device
from seekforge.engine.model_runner import Chunk
from seekforge.engine.sampler import Row, compute_logprobs, logprobs_of, make_batch
from seekforge.engine.spec_decode import Catchup, verify


class Step:
    """LLM's step (a mixin over the LLM's scheduler, runner, sampler state, proposer and block manager)."""

    @torch.inference_mode()
    def _step(self) -> set[str]:
        """One engine step: schedule, run, sample, apply; returns the ids of requests that got new tokens or
        finished. With adaptive experts, the controller then takes the queue and the step's wall time."""
        start = time.perf_counter()
        touched = self._scheduled_step()
        if self.adaptive is not None:
            self.adaptive.observe(len(self.scheduler.waiting), time.perf_counter() - start)
        return touched

    def _step_topk(self, seqs) -> int | None:
        """The routed top-k of a step over `seqs` (None: the model's): the adaptive controller's, raised to the
        largest minimum its requests ask for."""
        return None if self.adaptive is None else self.adaptive.step_topk([s.params.min_experts for s in seqs])

    def _scheduled_step(self) -> set[str]:
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
        chunks, sampling = self._chunks(plan.scheduled)
        seqs = [seq for seq, _ in plan.scheduled]
        logits, hidden, offsets = self._forward(chunks, sampling, seqs)
        outcome, logprobs = self._sample(logits, sampling, seqs)
        return touched | self._apply(plan.scheduled, outcome, logprobs, hidden, offsets)

    def _chunks(self, scheduled) -> tuple[list[Chunk], list[int]]:
        """Each scheduled sequence's tokens to compute (drafts after its known tokens), and which of them
        reach the end of their sequence, so get sampled."""
        if self.proposer is not None:
            self.proposer.settle()
        chunks, sampling = [], []
        for i, (seq, n) in enumerate(scheduled):
            start, token_ids = seq.num_computed, seq.token_ids
            tokens = token_ids[start:start + n]
            if len(tokens) < n:
                tokens = tokens + seq.drafts[:n - len(tokens)]
            chunks.append(Chunk(seq.block_table, start, tokens))
            if start + n >= len(token_ids):
                sampling.append(i)
        return chunks, sampling

    def _forward(self, chunks, sampling, seqs):
        """(logits of the sampled positions, hidden states, the row of each chunk's first token in them). A decode
        or verification step is replayed from a CUDA graph where it fits one (`ModelRunner.replay`)."""
        replayed = None
        topk = self._step_topk(seqs)
        prompt = [i for i, seq in enumerate(seqs) if seq.request.prompt_logprobs is not None and seq.needs_prompt_logprobs]
        if len(sampling) == len(chunks) and not prompt:
            replayed = self.runner.replay(chunks, topk=topk)
        if replayed is not None:
            logits, self.expert_load, hidden, rows = replayed
            offsets = range(0, len(chunks) * rows, rows)
        else:
            step = self.runner.prepare(chunks)
            hidden, self.expert_load = self.runner.forward(step, topk)
            offsets = step.offsets
            for i in prompt:
                self._prompt_logprobs(seqs[i], chunks[i], hidden[offsets[i]:offsets[i] + len(chunks[i].token_ids)])
        first = [offsets[i] + len(seqs[i].token_ids) - 1 - chunks[i].start for i in sampling]
        rows_idx = (first if self.proposer is None else
                    [r for i, f in zip(sampling, first) for r in range(f, f + 1 + len(seqs[i].drafts))])
        if rows_idx == list(range(len(rows_idx))):  # the first rows, in order (a decode step): no gather needed
            picked = hidden[:len(rows_idx)] if replayed is None else logits[:len(rows_idx)]
        else:  # indexed by a device tensor: a list index is copied from pageable memory, which waits for the forward
            index = to_device(rows_idx, torch.long, hidden.device)
            picked = (hidden if replayed is None else logits).index_select(0, index)
        return (self.runner.logits(picked) if replayed is None else picked), hidden, offsets

    def _prompt_logprobs(self, seq, chunk, hidden) -> None:
        """Record the logprobs of the prompt tokens this prefill chunk predicts: position p's logits score the
        token at p + 1 (a recomputed chunk fills nothing twice)."""
        req = seq.request
        first = max(chunk.start + 1, req.num_prompt_logprobs)  # the first prompt position still to fill
        last = min(chunk.start + len(chunk.token_ids) + 1, len(req.prompt_token_ids))  # one past the last
        if first >= last:
            return
        rows = hidden[first - 1 - chunk.start:last - 1 - chunk.start]
        targets = torch.tensor(req.prompt_token_ids[first:last], device=hidden.device)
        req.prompt_logprobs[first:last] = logprobs_of(self.runner.logits(rows), targets, seq.params.prompt_logprobs)
        req.num_prompt_logprobs = last

    def _sample(self, logits, sampling, seqs):
        """({index in the step: its verified tokens}, an iterator over the emitted tokens' logprobs)."""
        if not sampling:
            return {}, None
        sampled = [seqs[i] for i in sampling]
        if any(seq.params.has_penalties for seq in sampled):
            # one sampling row per position: a sequence's history grows by its drafts along its rows
            rows, first_rows = [], []
            for seq in sampled:
                first_rows.append(len(rows))
                penalties = seq.params.has_penalties
                prompt = seq.token_ids[:seq.num_prompt_tokens] if penalties else None
                for j in range(1 + len(seq.drafts)):
                    rows.append(Row(seq.params, seq.key, prompt,
                                    seq.output_token_ids + seq.drafts[:j] if penalties else None))
            batch = make_batch(rows, self.cfg.vocab_size, logits.device)
        else:  # rows without history, one a position: the batch of the last such step, where it had these rows
            rows_each = tuple(1 + len(seq.drafts) for seq in sampled)
            batch = self._plain_batches.get(sampled, rows_each)
            rows = batch.rows
            first_rows = list(itertools.accumulate(rows_each[:-1], initial=0))
        constrained = [(r, seqs[i].matcher) for r, i in zip(first_rows, sampling) if seqs[i].matcher is not None]
        masked = mask_rows(logits, *map(list, zip(*constrained))) if constrained else logits
        verified = verify(masked, batch, first_rows, sampled)
        if batch.max_logprobs is not None:
            emitted_rows = [r for v in verified for r in v.rows]
            tokens = torch.tensor([t for v in verified for t in v.tokens], device=logits.device)
            sub = make_batch([rows[r] for r in emitted_rows], self.cfg.vocab_size, logits.device)
            logprobs = iter(compute_logprobs(logits[emitted_rows], tokens, sub))
        else:
            logprobs = itertools.repeat(None)
        return dict(zip(sampling, verified)), logprobs

    def _apply(self, scheduled, outcome, logprobs, hidden, offsets) -> set[str]:
        """Apply the step to each sequence (tokens, stop conditions, prefix cache); with MTP, draft the next
        step's tokens. Returns the ids of the requests touched."""
        touched, catchups = set(), []
        register, proposer = self.block_manager.register, self.proposer
        for i, (seq, n) in enumerate(scheduled):
            start = seq.num_computed
            touched.add(seq.request.request_id)
            v = outcome.get(i)
            if v is None:  # a prefill chunk that does not reach the end of the prompt
                seq.num_computed = start + n
                register(seq)
                if proposer is not None:
                    catchups.append(Catchup(seq, start, seq.token_ids[start + 1:start + n + 1],
                                            hidden[offsets[i]:offsets[i] + n], 0))
                continue
            if proposer is not None and seq.drafts:
                proposer.stats.record(len(seq.drafts), v.accepted)
            computed = len(seq.token_ids) + v.accepted  # positions whose latents are now valid
            tokens = v.tokens
            reason, kept = self._append(seq, tokens, (next(logprobs),) if len(tokens) == 1 else
                                        [next(logprobs) for _ in tokens])
            seq.num_computed = min(computed, kept)  # tokens an in-chain tool inserted after `kept` are not computed
            register(seq)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                continue
            if proposer is not None:
                m = seq.num_computed - start
                catchups.append(Catchup(seq, start, seq.token_ids[start + 1:start + m + 1],
                                        hidden[offsets[i]:offsets[i] + m], proposer.num_drafts(seq, self.max_model_len)))
        if proposer is not None:
            proposer.propose(catchups)
        return touched

