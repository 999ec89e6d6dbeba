"""The engine runs a model with deep experts (ModelConfig.n_deep_experts) as greedy decoding by full forwards of
the model loaded on its own does."""

from __future__ import annotations

import pytest
import torch

from seekforge import LLM, SamplingParams
from seekforge.model.hf import from_pretrained

pytestmark = [pytest.mark.usefixtures("one_thread")]

NEW = 8


def test_engine_greedy_equals_full_forwards(tiny_checkpoint):
    path = tiny_checkpoint(n_deep_experts=2, init_std=0.1)
    model = from_pretrained(path, dtype="float32")
    assert model.cfg.n_deep_experts == 2
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (4, 9)]
    want = []
    with torch.no_grad():
        for prompt in prompts:
            tokens = list(prompt)
            for _ in range(NEW):
                tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
            want.append(tokens[len(prompt):])
    llm = LLM(path, dtype="float32", block_size=4)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    assert [o.token_ids for o in outs] == want
