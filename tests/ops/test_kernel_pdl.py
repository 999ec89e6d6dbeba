"""Programmatic dependent launch (`seekforge.ops.triton.pdl`): off wherever it cannot run, and on a Hopper GPU the
batch-1 layer chain of Triton kernels, replayed from a CUDA graph, gives bit for bit what it gives without it."""

import pytest
import torch
from triton_setup import CUDA, patch_interpreter

pytest.importorskip("triton")
patch_interpreter()

from seekforge.ops.triton import pdl  # noqa: E402


def test_off_on_the_cpu_and_when_switched_off(monkeypatch):
    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert pdl.launch_options(torch.device("cuda", 0)) == {"PDL": False}


HOPPER = CUDA and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="PDL needs a Hopper GPU or newer")
def test_the_layer_chain_gives_the_same_bits_with_and_without_it(monkeypatch):
    from seekforge.ops.triton import moe, route
    from seekforge.ops.triton.gemv import gemv, head_gemv, norm_gemv
    from seekforge.ops.triton.latents import latent_query_kernel
    from seekforge.ops.triton.mla_decode import paged_mla_decode_triton
    from seekforge.model import ModelConfig
    from seekforge.model.gate import Gate

    cfg = ModelConfig.preset("16b").replace(n_expert_groups=1, n_limited_groups=1)
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    dim, heads, experts, inter = cfg.dim, cfg.n_heads, cfg.n_routed_experts, cfg.moe_inter_dim
    c, r, nope, v = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim

    def rn(*shape):
        return (torch.randn(*shape, device=dev) * 0.02).to(bf)

    w1, w3, w2 = rn(experts, inter, dim), rn(experts, inter, dim), rn(experts, dim, inter)
    gate = Gate(cfg).to(dev)
    gate.weight.data = (gate.weight.data.normal_() * dim ** -0.5).to(bf)
    layers = [dict(g1=torch.rand(dim, device=dev, dtype=bf) + 0.5, wq=rn(heads * (nope + r), dim), wkv=rn(c + r, dim),
                   kv_norm=torch.rand(c, device=dev, dtype=bf) + 0.5, w_uk=rn(heads, nope, c).transpose(1, 2),
                   w_uv=rn(heads, v, c), wo=rn(dim, heads * v), g2=torch.rand(dim, device=dev, dtype=bf) + 0.5,
                   shared=(rn(2 * inter, dim), rn(dim, 2 * inter), rn(2 * inter, dim))) for _ in range(2)]
    page, blocks, ctx = 64, 8, 300
    cache = torch.randn(blocks, page, c + r, device=dev, dtype=bf)
    tables = torch.randperm(blocks, device=dev).view(1, blocks)
    pos = torch.tensor([[ctx - 1]], device=dev)
    slot = (tables[0, (ctx - 1) // page] * page + (ctx - 1) % page).view(1)
    cos, sin = torch.rand(1, r // 2, device=dev), torch.rand(1, r // 2, device=dev)
    h0 = torch.randn(1, dim, device=dev, dtype=bf)

    def step():
        h = h0
        for layer in layers:
            q, kv = norm_gemv(h, layer["g1"], 1e-6, layer["wq"], layer["wkv"])
            q = q.view(1, heads, nope + r)
            query = latent_query_kernel(q[..., :nope], q[..., nope:], layer["w_uk"], cos, sin,
                                        store=(cache, slot, kv, layer["kv_norm"], 1e-6))
            latent = paged_mla_decode_triton(query.view(1, 1, heads, c + r), cache, tables, pos, 0.1, c)
            delta = gemv(head_gemv(latent.view(1, heads, c), layer["w_uv"]).view(1, heads * v), layer["wo"])
            h_out, x, logits = route.residual_logits(gate, h, delta, layer["g2"], 1e-6)
            h = moe.fused_experts(x, w1, w2, w3, None, None, shared=layer["shared"], rows=True, residual=h_out,
                                  router=logits)
        return h

    got = {}
    for on in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", on)
        eager = step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        got[on] = out
    assert torch.isfinite(got[True].float()).all() and torch.equal(got[True], got[False])
