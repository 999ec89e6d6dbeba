"""parallelize on one process: activation checkpointing recomputes each block in the backward, keeps far fewer
tensors for it, and changes neither the gradients nor the parameter names; torch.compile of pipeline stages (not
wired) is refused."""

import pytest
import torch

from seekforge.errors import ConfigError
from seekforge.model.config import ModelConfig
from seekforge.model.transformer import Transformer
from seekforge.parallel.config import ParallelConfig
from seekforge.parallel.parallelize import parallelize


def _saved_and_grads(model, tokens, labels):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = model.loss(tokens, labels, mtp_weight=0.3, balance_alpha=1e-4)
    out.loss.backward()
    return sum(saved), {name: p.grad for name, p in model.named_parameters()}


def test_activation_checkpointing_keeps_less_and_gives_the_same_gradients():
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    plain = Transformer(cfg)
    checkpointed = Transformer(cfg)
    checkpointed.load_state_dict(plain.state_dict())
    parallelize(checkpointed, None, ParallelConfig(activation_checkpointing=True).resolve(1))
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    labels = torch.roll(tokens, -1, dims=1)
    kept_plain, grads_plain = _saved_and_grads(plain, tokens, labels)
    kept, grads = _saved_and_grads(checkpointed, tokens, labels)
    assert kept < kept_plain / 2  # the blocks' inputs only, where the plain model keeps every intermediate
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)


def test_compiled_pipeline_stages_are_refused():
    layout = ParallelConfig(dp_shard=1, pp=2)  # as resolved on two ranks
    with pytest.raises(ConfigError, match="compile=true with parallel.pp > 1: torch.compile of pipeline stages"):
        parallelize(Transformer(ModelConfig.preset("tiny")), None, layout, compile=True)
