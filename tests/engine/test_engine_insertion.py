"""In-chain tools (SamplingParams.inserter): tokens inserted into one sequence, inside the batch, leave every
other request token-identical, and the sequence itself continues exactly as greedy decoding of the model over
its tokens with the insertion in place (computed here by full forwards of the model, no cache)."""

from __future__ import annotations

import pytest
import torch

from seekforge import LLM, SamplingParams
from seekforge.errors import ConfigError

pytestmark = [pytest.mark.usefixtures("one_thread")]

NEW = 12
AFTER = 3  # the scripted tool inserts after the sequence's 3rd token
INSERT = [7, 8, 9]


class AfterN:
    """Inserts `tokens` once, after the n-th token a sequence takes."""

    def __init__(self, n: int, tokens: list[int]):
        self.n, self.tokens = n, tokens

    def start(self):
        return _AfterNState(self.n, self.tokens)


class _AfterNState:
    def __init__(self, n, tokens):
        self.n, self.tokens, self.seen = n, tokens, 0

    def accept(self, token):
        self.seen += 1
        return list(self.tokens) if self.seen == self.n else []


def greedy(model, prompt, new, insert_after=None, insert=()):
    """Greedy decoding by full forwards: `insert` goes in after output token `insert_after`; all count as output."""
    tokens, out = list(prompt), []
    with torch.no_grad():
        while len(out) < new:
            token = int(model(torch.tensor([tokens]))[0, -1].argmax())
            tokens.append(token)
            out.append(token)
            if len(out) == insert_after:
                tokens += insert
                out += insert
    return out[:new]


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    path = tiny_checkpoint(init_std=0.1)
    llm = LLM(path, dtype="float32", block_size=4)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, llm.cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 2)]
    model = llm.model
    plain = [greedy(model, p, NEW) for p in prompts]
    inserted = greedy(model, prompts[1], NEW, AFTER, INSERT)
    assert inserted[:AFTER] == plain[1][:AFTER] and inserted[AFTER:AFTER + 3] == INSERT
    return path, prompts, plain, inserted


def _params(**kwargs):
    return SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, **kwargs)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("budget", [64, 3], ids=["whole", "chunked"])  # 3: the inserted chunk is split
def test_insertion_in_a_batch_leaves_the_others_identical(setup, async_scheduling, budget):
    path, prompts, plain, inserted = setup
    llm = LLM(path, dtype="float32", block_size=4, async_scheduling=async_scheduling,
              max_num_batched_tokens=budget, max_model_len=64)
    params = [_params(), _params(inserter=AfterN(AFTER, INSERT)), _params()]
    outs = llm.generate(prompts, params)
    without = llm.generate(prompts, _params())
    assert [o.token_ids for o in without] == plain
    assert outs[0].token_ids == without[0].token_ids and outs[2].token_ids == without[2].token_ids
    assert outs[1].token_ids == inserted
    assert [o.outputs[0].num_inserted_tokens for o in outs] == [0, 3, 0]


def test_insertion_with_speculative_drafts(setup, monkeypatch):
    """Drafts the verifier accepts past the token that triggers the insertion are dropped: they were drawn
    without it. The proposer is replaced by one that drafts the uninserted greedy continuation, which the
    verifier accepts up to the insertion (a random MTP module's drafts would almost never be accepted)."""
    path, prompts, plain, inserted = setup
    llm = LLM(path, dtype="float32", block_size=4, num_speculative_tokens=3)
    continuation = {tuple(p): out for p, out in zip(prompts, plain)}

    def propose(items):
        for it in items:
            seq = it.seq
            seq.drafts, seq.draft_probs = [], None
            if it.draft:
                at = seq.num_output_tokens  # the output index the first draft would take
                seq.drafts = continuation[tuple(seq.request.prompt_token_ids)][at:at + it.draft]

    monkeypatch.setattr(llm.proposer, "propose", propose)
    outs = llm.generate(prompts, [_params(), _params(inserter=AfterN(AFTER, INSERT)), _params()])
    assert [o.token_ids for o in outs] == [plain[0], inserted, plain[2]]
    stats = llm.stats()["speculative"]
    assert stats["accepted"][0] > 0  # drafts were accepted, the insertion's step among them


def test_inserted_tokens_count_as_output_with_certain_logprobs(setup):
    path, prompts, plain, inserted = setup
    llm = LLM(path, dtype="float32", block_size=4)
    out = llm.generate(prompts[1], _params(logprobs=0, inserter=AfterN(AFTER, INSERT)))[0].outputs[0]
    assert out.token_ids == inserted and len(out.token_ids) == NEW  # max_tokens counts the inserted ones
    assert [lp.token_id for lp in out.logprobs] == inserted
    assert [lp.logprob for lp in out.logprobs[AFTER:AFTER + 3]] == [0.0, 0.0, 0.0]
    assert all(lp.logprob < 0 for lp in out.logprobs[:AFTER])
    # an insertion that would pass max_tokens is cut there
    short = llm.generate(prompts[1], SamplingParams(temperature=0, max_tokens=AFTER + 1, ignore_eos=True,
                                                    inserter=AfterN(AFTER, INSERT)))[0]
    assert short.token_ids == inserted[:AFTER + 1] and short.finish_reason == "length"


def test_inserter_is_checked():
    with pytest.raises(ConfigError, match="inserter must have a start"):
        SamplingParams(inserter=object())
    with pytest.raises(ConfigError, match="cannot share a request"):
        SamplingParams(inserter=AfterN(1, [1]), constraint=AfterN(1, [1]))
