"""A sequence (one completion being generated) and a request (a prompt and its n sequences).

A sequence's state is its tokens (prompt then output) and how many of them have their latents in the
paged cache (`num_computed`). Every engine step computes the tokens after `num_computed` (a prefill
chunk, a recompute after preemption, or one decode token plus speculative drafts) and samples when it
reaches the end. Nothing here touches tensors except the draft probabilities kept for verification.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from seekforge.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    """The log-probability of a generated token under the model (before sampling transforms), with the
    `top` most likely tokens of that position."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


PENDING = -1  # a token id not yet known on the host (async scheduling)


class Sequence:
    def __init__(self, seq_id: int, request: Request, index: int, key: int | None):
        self.seq_id = seq_id
        self.request = request
        self.index = index  # which of the request's n completions
        self.params = request.params
        self.key = key  # random key of its draws (seekforge.ops.sequence_keys) when its request has a seed
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        # cache state
        self.num_computed = 0
        # async scheduling: the last num_pending entries of token_ids are PENDING, tokens a step still in
        # flight is sampling on the device (they count for scheduling, never for outputs)
        self.num_pending = 0
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading blocks registered in (or taken from) the prefix cache
        self.last_hash: int | None = None  # hash-chain value of block num_hashed_blocks - 1
        self.num_cached_prompt_tokens = 0  # prefix-cache hits at the last admission (for statistics)
        # speculative decoding: drafts for the next step and the distributions they were drawn from
        self.drafts: list[int] = []
        self.draft_probs: torch.Tensor | None = None  # [len(drafts), vocab] or None when greedy
        # this sequence's state under its request's constraint (None: unconstrained)
        self.matcher = request.params.constraint.start() if request.params.constraint is not None else None
        # this sequence's in-chain tool state (None: none); how many output tokens it inserted
        self.inserter = request.params.inserter.start() if request.params.inserter is not None else None
        self.num_inserted = 0
        # outputs
        self.logprobs: list[Logprob] = []
        self.cumulative_logprob = 0.0
        self.text = ""
        self.text_final = False  # text is complete (finished, or cut at a stop string)
        self.prefix_offset = 0  # incremental detokenisation window over the output ids
        self.read_offset = 0
        self.num_reported = 0  # output tokens already handed out as stream deltas
        self.text_reported = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:len(self.token_ids) - self.num_pending]

    @property
    def num_output_tokens(self) -> int:
        """Output tokens known on the host (pending ones excluded)."""
        return len(self.token_ids) - self.num_pending - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether this sequence's prefill must still compute its request's prompt logprobs (then it takes
        nothing from the prefix cache: every prompt position's logits are needed)."""
        req = self.request
        return self.index == 0 and req.prompt_logprobs is not None and req.num_prompt_logprobs < len(
            req.prompt_token_ids)

    @property
    def leader(self) -> Sequence | None:
        """Completions 1..n-1 of a request wait for completion 0 to prefill the prompt, then share its blocks."""
        return self.request.seqs[0] if self.index else None

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed}, blocks={len(self.block_table)})")


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs: list[Sequence] = []
        # each prompt token's Logprob under the tokens before it (the first has none), when asked for
        self.prompt_logprobs: list[Logprob | None] | None = (
            [None] * len(prompt_token_ids) if params.prompt_logprobs is not None else None)
        self.num_prompt_logprobs = 1  # positions filled (the first never is)
        self.num_finished = 0  # of seqs (Scheduler.finish counts them: the engine asks every step)

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.seqs)
