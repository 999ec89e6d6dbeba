"""Async scheduling (on by default on CUDA, vLLM's idea): a plain decode step is launched before the host
knows the previous step's tokens. Those stay on the device and are fed to the new step from there, while
the host settles the previous step (stop conditions, outputs, prefix cache) as the GPU runs the new one;
each sequence carries its unknown tokens as PENDING placeholders meanwhile. A sequence that stopped drops
the one token computed for it in the meantime. Steps that need every token on the host (prefill chunks,
penalties, logprobs, drafts, preemption) settle the step in flight first (seekforge.engine.step).
"""

from __future__ import annotations

import torch

from seekforge.engine.model_runner import Chunk, DeviceIds
from seekforge.engine.sampler import sample
from seekforge.engine.sequence import PENDING, Sequence, SequenceStatus


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


class AsyncStep:
    """LLM's pipelined step (a mixin over the same state as seekforge.engine.step.Step)."""

    def _can_pipeline(self, plan) -> bool:
        """Whether this step can run before the host knows the last step's tokens: plain decode (one token a
        sequence, no drafts), nothing preempted, no request wanting its history on the host (penalties,
        logprobs, a constraint, an in-chain tool that may insert tokens), and no sequence whose tokens in flight
        already complete it."""
        if not self.async_scheduling or self.proposer is not None or plan.preempted:
            return False
        max_len, checked = self.max_model_len, None  # checked: the last params seen (a request's n share theirs)
        for seq, n in plan.scheduled:
            p = seq.params
            num_tokens = len(seq.token_ids)  # pending tokens included: they will be outputs too
            if (n != 1 or seq.num_computed != num_tokens - 1 or seq.matcher is not None or seq.inserter is not None
                    or num_tokens - seq.num_prompt_tokens >= p.max_tokens or num_tokens >= max_len):
                return False
            if p is not checked:
                if p.has_penalties or p.logprobs is not None:
                    return False
                checked = p
        return True

    def _pipelined_step(self, seqs: list[Sequence]) -> set[str]:
        """Launch a decode step whose inputs may still be on the device (the step in flight samples them),
        then settle the step in flight while this one runs: the host's bookkeeping overlaps the GPU."""
        chunks, waiting, rows = [], [], []  # waiting: chunks whose token is still on the device, at `rows` there
        prev = self._in_flight.row if self._in_flight is not None else None
        for i, seq in enumerate(seqs):
            chunks.append(Chunk(seq.block_table, seq.num_computed, [seq.token_ids[-1]]))
            if seq.num_pending:
                waiting.append(i)
                rows.append(prev[seq.seq_id])
        device_ids = None if prev is None else DeviceIds(waiting, rows, self._in_flight.tokens)
        batch = self._plain_batches.get(seqs)
        topk = self._step_topk(seqs)
        replayed = self.runner.decode_logits(chunks, device_ids, topk)
        if replayed is not None:
            logits, self.expert_load = replayed
        else:
            hidden, self.expert_load = self.runner.forward(self.runner.prepare(chunks, device_ids), topk)
            logits = self.runner.logits(hidden)
        tokens, _ = sample(logits, batch, (len(seq.token_ids) for seq in seqs), out=self.runner.token_buffer(len(seqs)))
        for seq in seqs:
            seq.num_computed = len(seq.token_ids)
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
        register = self.block_manager.register
        for seq, token in zip(f.seqs, f.host_tokens()):
            if seq.status is SequenceStatus.FINISHED:
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
            register(seq)
            if reason is not None:
                self.scheduler.finish(seq, reason)
        return touched
