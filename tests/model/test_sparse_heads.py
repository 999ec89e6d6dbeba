"""Dynamic sparse heads in the model's absorbed MLA: each query attends with its kept heads only, the others'
outputs zero, against a naive loop; every head kept is today's absorbed path exactly."""

import pytest
import torch

from sparse_heads_reference import sparse_heads_attention
from seekforge.model import ModelConfig, Transformer
from seekforge.model.backend import Backend
from seekforge.ops.mla_decode import attend_latents


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny")).eval()


def _inputs(model, batch=2, seq=7):
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(3))
    cos, sin = model.rope(model.positions_like(tokens))
    return tokens, model.layers[0].attn_norm(model.embed(tokens)), cos, sin


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_dropping_heads_zeroes_their_outputs(model, keep):
    """Absorbed attention with `keep` of the 4 heads against the naive loop (explicit keys and values, float64,
    the dropped heads' outputs zeroed): equal within fp32's rounding, and not the dense output."""
    _, x, cos, sin = _inputs(model)
    mla = model.layers[0].attn
    with torch.no_grad():
        want = sparse_heads_attention(mla, x, cos, sin, keep)
        got = Backend(keep_heads=keep).attend(mla, None, x, cos, sin, None)
        dense = Backend(absorbed=True).attend(mla, None, x, cos, sin, None)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    per_head = got.unflatten(-1, (mla.n_heads, -1))
    assert ((per_head == 0).all(-1).sum(-1) == mla.n_heads - keep).all()  # exactly h - keep heads zero, per query
    assert not torch.allclose(got, dense, atol=1e-3)


def test_the_criterion_keeps_the_stated_number_of_largest_norm_heads(model):
    """`kept_heads` returns `keep` distinct heads per query, ascending, whose content-query norms are the largest."""
    q_nope = torch.randn(3, 5, 8, 16, generator=torch.Generator().manual_seed(0))
    norms = q_nope.norm(dim=-1)
    for keep in (1, 3, 6, 8):
        heads = model.layers[0].attn.kept_heads(q_nope, keep)
        assert heads.shape == (3, 5, keep) and (heads.diff(dim=-1) > 0).all()
        kept = norms.gather(-1, heads)
        dropped = norms.scatter(-1, heads, float("-inf"))
        assert (kept.min(-1).values >= dropped.max(-1).values).all()


def test_keeping_every_head_is_the_dense_absorbed_path_exactly(model):
    """keep_heads equal to the model's heads: logits bit for bit those of today's absorbed forward; and so is the
    sparse form itself with every head kept (`select_heads`, the attention, `place_heads`)."""
    tokens, x, cos, sin = _inputs(model)
    h = model.cfg.n_heads
    mla = model.layers[0].attn
    with torch.no_grad():
        assert torch.equal(model(tokens, backend=Backend(keep_heads=h)), model(tokens, backend=Backend(absorbed=True)))
        q, kv_a = mla.project(x)
        q_nope, q_pe = mla.query(q, cos, sin)
        kv, k_pe = mla.latent(kv_a, cos, sin)
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, mla.absorbed_weights()[0])
        heads = mla.kept_heads(q_nope, h)
        assert torch.equal(heads, torch.arange(h).expand_as(heads))
        sparse = mla.place_heads(attend_latents(mla.select_heads(q_latent, heads), mla.select_heads(q_pe, heads), kv,
                                                k_pe, None, mla.softmax_scale), heads)
        assert torch.equal(sparse, attend_latents(q_latent, q_pe, kv, k_pe, None, mla.softmax_scale))
