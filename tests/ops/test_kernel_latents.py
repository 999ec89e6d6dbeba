"""The Triton store of a decode step's new latents (`seekforge.ops.triton.latents`) against the model's latent
(`MLA.latent`: RMSNorm, rotary) written with `store_latents`.

Without CUDA the kernel runs under Triton's interpreter (tests/triton_setup.py), with fp16 standing in for bf16.
"""

import pytest
import torch
from triton_setup import DEVICE, HALF, patch_interpreter

triton = pytest.importorskip("triton")
patch_interpreter()

from seekforge import ops  # noqa: E402
from seekforge.errors import ConfigError  # noqa: E402
from seekforge.ops.triton import latents as latents_module  # noqa: E402
from seekforge.ops.triton.latents import latent_query_kernel as latent_query  # noqa: E402
from seekforge.ops.triton.latents import store_new_latents_kernel as store_new_latents  # noqa: E402
from seekforge.model import ModelConfig  # noqa: E402
from seekforge.model.mla import MLA  # noqa: E402
from seekforge.model.rope import RotaryEmbedding  # noqa: E402


def setup(cfg, n, seed=0):
    torch.manual_seed(seed)
    attn = MLA(cfg).to(DEVICE, HALF)
    attn.kv_norm.weight.data.uniform_(0.5, 1.5)
    rope = RotaryEmbedding(cfg).to(DEVICE)
    positions = torch.randint(0, 500, (n,), device=DEVICE)
    cos, sin = rope(positions.unsqueeze(0))
    kv_a = (torch.randn(n, cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2).to(DEVICE, HALF)
    cache = torch.randn(6, 4, cfg.kv_lora_rank + cfg.qk_rope_head_dim).to(DEVICE, HALF)
    slots = torch.randperm(24, device=DEVICE)[:n]
    return attn, cos[0], sin[0], kv_a, cache, slots


@pytest.mark.parametrize("strided", [False, True], ids=["slots", "slot_column"])
@pytest.mark.parametrize("n, c, r", [(1, 32, 16), (5, 48, 8), (3, 512, 64)])
def test_matches_the_models_latents_stored(n, c, r, strided):
    """strided: the slot mapping is a column of wider rows, as a captured step's static input holds it (a kernel
    that read it as contiguous wrote a batch's later tokens into the slots the next columns name)."""
    cfg = ModelConfig.preset("tiny").replace(kv_lora_rank=c, qk_rope_head_dim=r)
    attn, cos, sin, kv_a, cache, slots = setup(cfg, n)
    if strided:
        slots = torch.stack([slots, (slots + 1) % 24, (slots + 7) % 24], dim=1)[:, 0]
    want = cache.clone()
    kv, k_pe = attn.latent(kv_a.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0))
    ops.store_latents(want, slots, torch.cat([kv[0], k_pe[0]], dim=-1))
    with torch.no_grad():
        store_new_latents(cache, slots, kv_a, attn.kv_norm.weight, attn.kv_norm.eps, cos, sin)
    torch.testing.assert_close(cache, want, atol=2e-3, rtol=2e-3)  # other slots untouched, written ones as the model


def test_the_op_takes_it_with_triton_and_the_models_latents_with_torch():
    cfg = ModelConfig.preset("tiny")
    attn, cos, sin, kv_a, cache, slots = setup(cfg, 3)
    stored = []
    plain = cache.clone()
    with torch.no_grad():
        with ops.backend("torch"):
            ops.store_new_latents(attn, plain, slots, kv_a, cos, sin, lambda *args: stored.append(args) or
                                  ops.store_latents(*args))
        assert len(stored) == 1
        fused = cache.clone()
        with ops.backend("triton"):
            ops.store_new_latents(attn, fused, slots, kv_a, cos, sin, lambda *args: pytest.fail("not fused"))
    torch.testing.assert_close(fused, plain, atol=2e-3, rtol=2e-3)


def test_compiles_as_one_graph_writing_the_cache_in_place():
    cfg = ModelConfig.preset("tiny")
    attn, cos, sin, kv_a, cache, slots = setup(cfg, 2)
    want = cache.clone()
    with torch.no_grad():
        store_new_latents(want, slots, kv_a, attn.kv_norm.weight, attn.kv_norm.eps, cos, sin)
        ptr = cache.data_ptr()
        torch.compile(lambda c: store_new_latents(c, slots, kv_a, attn.kv_norm.weight, attn.kv_norm.eps, cos, sin),
                      fullgraph=True)(cache)
    assert cache.data_ptr() == ptr
    torch.testing.assert_close(cache, want, atol=0, rtol=0)


def test_bad_cache_layout_is_named():
    cfg = ModelConfig.preset("tiny")
    attn, cos, sin, kv_a, cache, slots = setup(cfg, 2)
    with pytest.raises(ConfigError, match="contiguous rows"):
        store_new_latents(cache[..., :-1], slots, kv_a[:, :-1], attn.kv_norm.weight, 1e-6, cos, sin)


@pytest.mark.parametrize("n, heads", [(1, 16), (3, 4), (4, 2)])  # (4, 2): a head's program stores two tokens
def test_the_latent_querys_launch_stores_them_as_the_store_kernel_does(n, heads):
    cfg = ModelConfig.preset("tiny").replace(n_heads=heads)
    attn, cos, sin, kv_a, cache, slots = setup(cfg, n)
    q = torch.randn(n, heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim).to(DEVICE, HALF)
    q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
    w_uk = attn.absorbed_weights()[0].detach().transpose(1, 2)
    want = cache.clone()
    with torch.no_grad():
        store_new_latents(want, slots, kv_a, attn.kv_norm.weight, attn.kv_norm.eps, cos, sin)
        query = latent_query(q_nope, q_pe, w_uk, cos, sin)
        ptr = cache.data_ptr()
        column = torch.stack([slots, (slots + 1) % 24], dim=1)[:, 0]  # as a captured step's static rows hold them
        store = (cache, column, kv_a, attn.kv_norm.weight, attn.kv_norm.eps)
        got = torch.compile(latent_query, fullgraph=True)(q_nope, q_pe, w_uk, cos, sin, store)
    assert cache.data_ptr() == ptr  # written in place, also compiled
    torch.testing.assert_close(cache, want, atol=0, rtol=0)
    torch.testing.assert_close(got, query, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="rotary width"):
        narrow = cache[..., 2:].contiguous()  # a rope part 2 narrower than the query's
        latent_query(q_nope, q_pe, w_uk, cos, sin, (narrow, slots, kv_a[:, 2:], attn.kv_norm.weight, 1e-6))


@pytest.mark.parametrize("n", [ops.STORE_IN_QUERY_TOKENS, ops.STORE_IN_QUERY_TOKENS + 1])
def test_the_op_stores_them_in_the_latent_querys_launch_with_triton(monkeypatch, n):
    """Up to STORE_IN_QUERY_TOKENS tokens in one launch; past it (where one launch measured slower) two."""
    cfg = ModelConfig.preset("tiny")
    attn, cos, sin, kv_a, cache, slots = setup(cfg, n)
    q = torch.randn(n, cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim).to(DEVICE, HALF)
    q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
    stored, plain, fused = [], cache.clone(), cache.clone()
    joined = n <= ops.STORE_IN_QUERY_TOKENS
    with torch.no_grad():
        with ops.backend("torch"):
            want = ops.store_and_query(attn, plain, slots, kv_a, q_nope, q_pe, cos, sin,
                                       lambda *args: stored.append(args) or ops.store_latents(*args))
        assert len(stored) == 1
        if joined:  # spies on the kernels the op calls
            monkeypatch.setattr(latents_module, "store_new_latents_kernel", lambda *a: pytest.fail("not fused"))
        else:
            monkeypatch.setattr(latents_module, "latent_query_kernel", _refusing_a_store(latent_query))
        with ops.backend("triton"):
            got = ops.store_and_query(attn, fused, slots, kv_a, q_nope, q_pe, cos, sin,
                                      lambda *args: pytest.fail("the Triton store applies"))
    torch.testing.assert_close(fused, plain, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def _refusing_a_store(latent_query):
    def query(*args):
        assert len(args) == 5, "stored in the latent query's launch past STORE_IN_QUERY_TOKENS"
        return latent_query(*args)
    return query
