"""The Triton MoE router (`seekforge.ops.triton.route`) against the model's `Gate` and `tokens_per_expert`.

Without CUDA the kernels run under Triton's interpreter (tests/triton_setup.py); with CUDA natively, plus the
16b shape in bf16 and a CUDA-graph replay with new tokens between replays.
"""

import pytest
import torch
from triton_setup import CUDA, DEVICE, HALF, patch_interpreter

triton = pytest.importorskip("triton")
patch_interpreter()

from seekforge.model import ModelConfig  # noqa: E402
from seekforge.model.gate import Gate  # noqa: E402
from seekforge.model.norm import RMSNorm  # noqa: E402
from seekforge.ops import tokens_per_expert  # noqa: E402
from seekforge.ops.triton import route as route_module  # noqa: E402
from seekforge.ops.triton.route import residual_route, route  # noqa: E402


def make_gate(seed=0, dtype=torch.float32, **overrides):
    cfg = ModelConfig.preset("tiny").replace(**{"n_expert_groups": 1, "n_limited_groups": 1, **overrides})
    torch.manual_seed(seed)
    gate = Gate(cfg).to(DEVICE)
    torch.nn.init.normal_(gate.weight, std=cfg.dim ** -0.5)
    gate.weight.data = gate.weight.data.to(dtype)
    return gate, cfg


def check(gate, x):
    want_w, want_i, _ = gate(x)
    got_w, got_i, load = route(gate, x)
    # the same experts each with its weight; the order of a token's k slots is free (the outputs are summed)
    order_got, order_want = got_i.sort(dim=1).indices, want_i.sort(dim=1).indices
    torch.testing.assert_close(got_i.gather(1, order_got), want_i.gather(1, order_want), atol=0, rtol=0)
    torch.testing.assert_close(got_w.gather(1, order_got), want_w.gather(1, order_want), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(load, tokens_per_expert(want_i, gate.weight.shape[0]).float(), atol=0, rtol=0)
    assert got_w.dtype == torch.float32 and got_i.dtype == torch.int64


@pytest.mark.parametrize("overrides", [
    dict(score_func="softmax", norm_topk_prob=False, route_scale=1.0),  # DeepSeek-V2(-Lite)
    dict(score_func="sigmoid", norm_topk_prob=True, route_scale=2.5),   # V3's scoring, one group
    dict(score_func="softmax", norm_topk_prob=True, route_scale=1.0, n_routed_experts=12, n_activated_experts=3),
])
@pytest.mark.parametrize("n", [1, 5])
def test_matches_gate(overrides, n):
    gate, cfg = make_gate(**overrides)
    gate.bias.copy_(torch.randn(cfg.n_routed_experts, device=DEVICE) * 0.05)  # moves the choice, not the weights
    assert not gate.group_limited
    check(gate, torch.randn(n, cfg.dim, device=DEVICE))


@pytest.mark.parametrize("n,slice_", [(1, None), (3, None), (2, 16)])  # the row in one slice; in several
def test_residual_route_is_the_blocks_residual_add_norm_and_gate(n, slice_, monkeypatch):
    """The residual add and the FFN's input norm in the router's first kernel, in half precision as the engine
    runs it: h + delta and RMSNorm(h + delta) as the model rounds them, and the gate's choice for the latter."""
    if slice_ is not None:
        monkeypatch.setattr(route_module, "RESIDUAL_SLICE", slice_)
    gate, cfg = make_gate(dtype=HALF, score_func="sigmoid", norm_topk_prob=True, route_scale=2.5)
    norm = RMSNorm(cfg.dim, eps=1e-5).to(DEVICE, HALF)
    norm.weight.data.uniform_(0.5, 1.5)
    h = (torch.randn(cfg.dim, n, device=DEVICE, dtype=HALF) * 2).t()  # rows not dim apart
    delta = torch.randn(n, cfg.dim, device=DEVICE, dtype=HALF) * 2
    with torch.no_grad():
        h_out, x, weights, indices, load = residual_route(gate, h, delta, norm.weight, norm.eps)
        torch.testing.assert_close(h_out, h + delta, atol=0, rtol=0)
        torch.testing.assert_close(x, norm(h + delta), atol=2e-3, rtol=2e-3)
        for got, want in zip((weights, indices, load), route(gate, norm(h + delta))):
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
        compiled = torch.compile(residual_route, fullgraph=True, dynamic=True)
        for got, want in zip(compiled(gate, h, delta, norm.weight, norm.eps), (h_out, x, weights, indices, load)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_nan_tokens_still_choose_k_distinct_real_experts():
    """A token whose hidden state went NaN gets garbage weights but never an index past the experts (which the
    fused experts would read memory at); its neighbours' choice is untouched."""
    gate, cfg = make_gate()
    x = torch.randn(3, cfg.dim, device=DEVICE)
    x[1, 5] = float("nan")
    weights, indices, load = route(gate, x)
    assert ((indices >= 0) & (indices < cfg.n_routed_experts)).all()
    assert all(len(set(row)) == cfg.n_activated_experts for row in indices.tolist())
    want = route(gate, x[[0, 2]])
    torch.testing.assert_close(indices[[0, 2]], want[1], atol=0, rtol=0)
    assert load.sum().item() == 3 * cfg.n_activated_experts


def test_half_precision_weights_and_tokens():
    gate, cfg = make_gate(dtype=HALF)
    check(gate, torch.randn(3, cfg.dim, device=DEVICE, dtype=HALF))


def test_no_tokens():
    gate, cfg = make_gate()
    weights, indices, load = route(gate, torch.randn(0, cfg.dim, device=DEVICE))
    assert weights.shape == indices.shape == (0, cfg.n_activated_experts)
    assert load.tolist() == [0.0] * cfg.n_routed_experts


def test_compiles_as_one_graph():
    """torch.compile takes the launch as an opaque op, so a compiled decode block stays one graph."""
    gate, cfg = make_gate()
    x = torch.randn(3, cfg.dim, device=DEVICE)
    compiled = torch.compile(route, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for got, want in zip(compiled(gate, x), route(gate, x)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_group_limited_routing_is_left_to_the_gate():
    gate, _ = make_gate(n_expert_groups=2, n_limited_groups=1, topk_method="noaux_tc")
    assert gate.group_limited
    gate, _ = make_gate(n_expert_groups=2, n_limited_groups=1, topk_method="greedy")  # groups ignored
    assert not gate.group_limited


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 2, 64])
def test_16b_shape_bf16(n):
    cfg = ModelConfig.preset("16b")
    gate, _ = make_gate(dtype=torch.bfloat16, dim=cfg.dim, n_routed_experts=cfg.n_routed_experts,
                        n_activated_experts=cfg.n_activated_experts, score_func=cfg.score_func,
                        norm_topk_prob=cfg.norm_topk_prob, route_scale=cfg.route_scale)
    check(gate, torch.randn(n, cfg.dim, device=DEVICE, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="races show on the GPU only")
def test_every_launch_chooses_as_the_gate_does():
    """Over many launches of the 16b shape at 1 to 63 tokens, every one chooses what the gate does and counts the
    load (atomics across the tokens' programs) exactly."""
    cfg = ModelConfig.preset("16b")
    gate, _ = make_gate(dtype=torch.bfloat16, dim=cfg.dim, n_routed_experts=cfg.n_routed_experts,
                        n_activated_experts=cfg.n_activated_experts, score_func=cfg.score_func,
                        norm_topk_prob=cfg.norm_topk_prob, route_scale=cfg.route_scale)
    for seed in range(60):
        torch.manual_seed(seed)
        check(gate, torch.randn(1 + seed % 3 * 31, cfg.dim, device=DEVICE, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs")
def test_cuda_graph_replay_follows_new_tokens():
    gate, cfg = make_gate()
    x = torch.randn(2, cfg.dim, device=DEVICE)
    route(gate, x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = route(gate, x)
    for seed in range(3):
        x.copy_(torch.randn(2, cfg.dim, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        want = route(gate, x)
        for a, b in zip(out, want):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
