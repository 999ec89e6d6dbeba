"""The fused MoE kernels (`seekforge.ops.triton.moe`) against the model's own routed experts.

Without CUDA the kernels run under Triton's interpreter on small shapes (tests/triton_setup.py). With
CUDA the same cases run natively, plus the 16b shape in bf16 at decode batch sizes and a CUDA-graph
replay with new routing between replays.
"""

import pytest
import torch
from moe_routing import random_routing
from triton_setup import CUDA, DEVICE, HALF, patch_interpreter

triton = pytest.importorskip("triton")
patch_interpreter()

from seekforge import ops  # noqa: E402
from seekforge.errors import ConfigError  # noqa: E402
from seekforge.ops.triton.moe import MoEConfig, fused_experts, group_by_expert  # noqa: E402
from seekforge.ops.triton.route import route, router_logits  # noqa: E402
from seekforge.model import ModelConfig  # noqa: E402
from seekforge.model.mlp import MLP  # noqa: E402
from seekforge.model.moe import Experts, MoE  # noqa: E402


def _problem(n, k, experts, dim, inter, dtype, seed, skew=False):
    """Random experts and routing; `skew` sends most tokens to expert 0 (rows past one block)."""
    g = torch.Generator().manual_seed(seed)
    ex = Experts(experts, dim, inter)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * dim ** -0.5)
    x, weights, indices = random_routing(n, k, experts, dim, g, skew)
    ref = ex(x, weights, indices)[0]  # fp32, grouped path (or its exact fallback)
    ex = ex.to(DEVICE, dtype)
    return ex, x.to(DEVICE, dtype), weights.to(DEVICE), indices.to(DEVICE), ref


CASES = [  # n, k, experts, dim, inter, config
    (1, 6, 64, 64, 48, None),  # decode batch 1: six experts of 64 read once each
    (5, 2, 8, 32, 80, None),  # inter not a multiple of the tile
    (40, 4, 8, 64, 32, MoEConfig(32, 32, 32, 4, 2)),  # experts with rows in several blocks
    (300, 6, 8, 32, 16, None),  # over 16 rows an expert: wider blocks
    (3, 1, 4, 16, 16, None),  # k = 1
]


@pytest.mark.parametrize("n,k,experts,dim,inter,config", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=["fp32", "half"])
def test_fused_experts_match_the_model(n, k, experts, dim, inter, config, dtype):
    ex, x, weights, indices, ref = _problem(n, k, experts, dim, inter, dtype, seed=n)
    out = fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices, config)
    assert out.dtype == dtype and out.shape == (n, dim)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


def test_skewed_routing_fills_many_blocks_of_one_expert():
    ex, x, weights, indices, ref = _problem(70, 2, 4, 32, 32, torch.float32, seed=3, skew=True)
    assert (indices == 0).sum() == 70
    out = fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices, MoEConfig(16, 32, 32, 4, 2))
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n,num_shared,rows", [(1, 2, False), (1, 2, True), (2, 1, False), (2, 1, True),
                                              (20, 2, None)])  # one block a pair (MMA tiles or GEMVs), then grouped
@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=["fp32", "half"])
def test_shared_experts_join_the_routed_ones(n, num_shared, rows, dtype):
    ex, x, weights, indices, routed = _problem(n, 3, 8, 32, 16, torch.float32, seed=n)
    torch.manual_seed(n)
    mlp = MLP(32, num_shared * 16)
    ref = routed + mlp(x.cpu().float())
    ex, mlp = ex.to(DEVICE, dtype), mlp.to(DEVICE, dtype)
    out = fused_experts(x.to(dtype), ex.w1, ex.w2, ex.w3, weights, indices,
                        shared=(mlp.w1.weight, mlp.w2.weight, mlp.w3.weight), rows=rows)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float().cpu(), ref.detach(), atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("n", [1, 20])  # one block a pair; grouped by expert
@pytest.mark.parametrize("joined", [True, False], ids=["shared", "routed"])
def test_fused_experts_compile_as_one_graph(n, joined):
    """torch.compile traces the fused MoE whole (its launch is an opaque op): a graph break there split
    every compiled block calling it, and prefill's compiled blocks reused those split variants."""
    ex, x, weights, indices, _ = _problem(n, 3, 8, 32, 16, torch.float32, seed=n)
    mlp = MLP(32, 16).to(DEVICE)
    shared = (mlp.w1.weight, mlp.w2.weight, mlp.w3.weight) if joined else None
    compiled = torch.compile(fused_experts, fullgraph=True, dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, ex.w1, ex.w2, ex.w3, weights, indices, shared=shared),
                                   fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices, shared=shared))


@pytest.mark.parametrize("rows", [False, True], ids=["tiles", "gemvs"])
def test_one_block_per_pair_reads_a_shared_expert_once_per_token(rows):
    ex, x, weights, indices, ref = _problem(2, 2, 4, 32, 32, torch.float32, seed=4, skew=True)
    assert (indices == 0).sum() == 2  # both tokens chose expert 0: two blocks of it
    out = fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices, rows=rows)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n,k,experts,dim,inter", [(1, 6, 64, 64, 48), (2, 3, 8, 40, 80), (1, 1, 4, 16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=["fp32", "half"])
def test_the_gemv_form_of_one_or_two_tokens_matches_the_model(n, k, experts, dim, inter, dtype):
    """One row a pair as GEMVs (the row kernels), with K and N past and short of one tile."""
    ex, x, weights, indices, ref = _problem(n, k, experts, dim, inter, dtype, seed=n + k)
    out = fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices, rows=True)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("n,rows", [(1, True), (2, True), (2, False), (20, None)])  # GEMVs, MMA tiles, grouped
def test_the_residual_joins_the_sum_of_the_pairs(n, rows):
    """The block's residual added to the experts' sum in the same launch (the GEMV form's last program of each
    column slice sums that slice), in fp32 then rounded once: exactly what fp32 experts plus the residual give."""
    ex, x, weights, indices, ref = _problem(n, 3, 8, 40, 24, torch.float32, seed=n)
    residual = torch.randn(n, 40, device=DEVICE)
    out = fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices, rows=rows, residual=residual)
    torch.testing.assert_close(out.cpu(), ref + residual.cpu(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices, rows=rows) + residual,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="residual"):
        fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices, residual=residual[:, :8])


@pytest.mark.parametrize("winner", ["gemvs", "tiles"])
def test_the_faster_form_is_timed_once_a_shape_and_kept(winner):
    """A one-block shape's first call (on the GPU) times both forms replayed from CUDA graphs, GEMVs first, and
    keeps the faster; later calls time nothing. Both give the model's experts."""
    import seekforge.ops.triton.moe as moe_module
    import seekforge.ops.triton.tuning as tuning

    timed = []

    def clock(run):
        run()
        timed.append(len(timed))
        return 1.0 if (len(timed) % 2 == 1) == (winner == "gemvs") else 2.0

    ex, x, weights, indices, ref = _problem(1, 2, 4, 24, 40, torch.float32, seed=9)
    # the tiles tuned untimed (every candidate ties)
    with tuning.tuning(timed=True, clock=clock, tile_clock=lambda call, quantiles: call() or [1.0] * len(quantiles)):
        for _ in range(2):
            out = fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices)
            torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
        assert len(timed) == 2
        assert moe_module.rows_faster(x, ex.w1, 2, 2, 4) == (winner == "gemvs")
        assert len(tuning.current().choices["moe_form"]) == 1


def test_grouping_covers_every_pair_once_in_its_experts_blocks():
    g = torch.Generator().manual_seed(0)
    n, k, experts, bm = 37, 3, 10, 4
    indices = torch.rand(n, experts, generator=g).topk(k, dim=-1).indices
    pair_ids, block_expert = group_by_expert(indices, experts, bm)
    pairs = n * k
    assert block_expert.numel() == pairs // bm + min(experts, pairs) and pair_ids.numel() == block_expert.numel() * bm
    real = pair_ids[pair_ids < pairs]
    assert sorted(real.tolist()) == list(range(pairs))
    rows = pair_ids.view(-1, bm)
    flat = indices.flatten()
    for b, e in enumerate(block_expert.tolist()):
        members = rows[b][rows[b] < pairs]
        if e == experts:  # past the last real block: padding only
            assert members.numel() == 0
        else:
            assert members.numel() > 0 and (flat[members.long()] == e).all()
    assert block_expert.tolist() == sorted(block_expert.tolist())


def test_bad_shapes_and_dtypes_are_named():
    ex, x, weights, indices, _ = _problem(2, 2, 4, 16, 8, torch.float32, seed=0)
    with pytest.raises(ConfigError, match="w1/w3"):
        fused_experts(x, ex.w2, ex.w2, ex.w3, weights, indices)
    with pytest.raises(ConfigError, match="one dtype"):
        fused_experts(x.double(), ex.w1, ex.w2, ex.w3, weights, indices)
    with pytest.raises(ConfigError, match="indices"):
        fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices[:1])
    with pytest.raises(ConfigError, match="shared experts"):
        fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices, shared=(ex.w1[0], ex.w2[0], ex.w1[0][:4]))


def make_moe(dim, experts, k, inter, shared, dtype, seed, **overrides):
    """A model MoE block (greedy softmax routing over one group: what the Triton router takes), random weights."""
    cfg = ModelConfig.preset("tiny").replace(**{
        "dim": dim, "n_routed_experts": experts, "n_activated_experts": k, "moe_inter_dim": inter,
        "n_shared_experts": shared, "n_expert_groups": 1, "n_limited_groups": 1, "topk_method": "greedy",
        "score_func": "softmax", **overrides})
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape) * dim ** -0.5)
    return moe.to(DEVICE, dtype).eval()


@pytest.mark.parametrize("n,rows", [(1, True), (2, True), (1, False), (5, None)])  # GEMVs, MMA tiles, grouped
@pytest.mark.parametrize("routing", [dict(score_func="softmax"),
                                     dict(score_func="sigmoid", norm_topk_prob=True, route_scale=2.5)])
def test_the_experts_choose_from_the_routers_logits(n, rows, routing):
    """Given the router's logits instead of its choice, the experts (in the GEMV form's first kernel; by the select
    kernel before the MMA tiles and the grouping) fill in the weights, indices and load that `route` gives, slot
    for slot, and sum what that choice gives; the shared expert's programs choose nothing."""
    moe = make_moe(40, 8, 3, 24, 1, torch.float32, seed=n, **routing)
    with torch.no_grad():
        moe.gate.bias.copy_(torch.randn(8, device=DEVICE) * 0.05)
    x = torch.randn(n, 40, device=DEVICE)
    shared = (moe.shared_experts.w1.weight, moe.shared_experts.w2.weight, moe.shared_experts.w3.weight)
    chosen = route(moe.gate, x)
    want = fused_experts(x, moe.experts.w1, moe.experts.w2, moe.experts.w3, *chosen[:2], rows=rows, shared=shared)
    router = router_logits(moe.gate, x)
    got = fused_experts(x, moe.experts.w1, moe.experts.w2, moe.experts.w3, None, None, rows=rows, shared=shared,
                        router=router)
    torch.testing.assert_close(router.indices, chosen[1], atol=0, rtol=0)
    torch.testing.assert_close(router.load, chosen[2], atol=0, rtol=0)
    # on the GPU the two kernels' softmax sums may run in another order: weights a rounding apart
    torch.testing.assert_close(router.weights, chosen[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_moe_forward_keeps_the_model_path_where_the_backend_is_torch():
    moe = make_moe(16, 8, 2, 16, 2, torch.float32, seed=1).cpu()
    x, residual = torch.randn(4, 16), torch.randn(4, 16)
    with torch.no_grad(), ops.backend("torch"):
        out, indices, load = ops.moe_forward(moe, x)
        want, routing = moe(x)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(ops.moe_forward(moe, x, residual=residual)[0], residual + want)
    assert indices.tolist() == routing.indices.tolist() and load.tolist() == routing.load.tolist()


@pytest.mark.parametrize("n,gemv", [(1, True), (2, True), (2, False), (5, False)])
def test_moe_forward_returns_the_choice_of_its_kernels(n, gemv):
    """The Triton path of `moe_forward` (on the CPU under Triton's interpreter): the experts it returns are the gate's
    choice (a set per token: the kernels' top-k is unsorted) and the load counts them, whichever kernel chose (the
    GEMV form's first kernel, or the router's select kernel before the MMA tiles)."""
    from seekforge.ops.triton import tuning

    moe = make_moe(32, 8, 2, 16, 1, HALF, seed=n)
    x = torch.randn(n, 32, device=DEVICE, dtype=HALF)
    with torch.no_grad(), ops.backend("triton"), tuning.tuning(forced={"moe_form": "gemvs" if gemv else "tiles"}):
        out, indices, load = ops.moe_forward(moe, x)
        _, want, _ = moe.gate(x)
    assert indices.sort(-1).values.tolist() == want.sort(-1).values.tolist()
    assert load.tolist() == torch.bincount(want.flatten(), minlength=8).tolist()


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n", [1, 4, 64, 512])
def test_16b_shape_bf16_decode_batches(n):
    ex, x, weights, indices, _ = _problem(n, 6, 64, 2048, 1408, torch.bfloat16, seed=n)
    ref = ex.float()(x.float(), weights, indices)[0]
    out = fused_experts(x, ex.w1.bfloat16(), ex.w2.bfloat16(), ex.w3.bfloat16(), weights, indices)
    torch.testing.assert_close(out.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_replay_follows_new_routing():
    ex, x, weights, indices, _ = _problem(8, 6, 64, 256, 128, torch.bfloat16, seed=2)
    fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices)
    for seed in (3, 4):
        _, x2, w2, i2, _ = _problem(8, 6, 64, 256, 128, torch.bfloat16, seed=seed)
        x.copy_(x2), weights.copy_(w2), indices.copy_(i2)
        graph.replay()
        expect = fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices)
        torch.testing.assert_close(out, expect, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs")
@pytest.mark.parametrize("n", [1, 2])
def test_the_gemv_forms_last_programs_sum_the_pairs_in_graph_replays(n):
    """The GEMV form's down kernel, replayed many times with new inputs: the arrival counters reset themselves,
    and each column slice's last program sees every pair's rows (bit for bit what the eager launch gives)."""
    ex, x, weights, indices, _ = _problem(n, 6, 64, 2048, 1408, torch.bfloat16, seed=7)
    residual = torch.randn(n, 2048, device=DEVICE, dtype=torch.bfloat16)

    def run():
        return fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices, rows=True, residual=residual)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(40):
        x.normal_(), weights.uniform_(), residual.normal_()
        indices.copy_(torch.stack([torch.randperm(64, device=DEVICE)[:6] for _ in range(n)]))
        graph.replay()
        torch.testing.assert_close(out, run(), atol=0, rtol=0)
    tiles = fused_experts(x, ex.w1, ex.w2, ex.w3, weights, indices, rows=False, residual=residual)
    torch.testing.assert_close(out.float(), tiles.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n", [1, 4, 40])  # shared experts joined to the fused pass, then added apart
def test_moe_forward_takes_the_router_and_fused_kernels_for_decode_and_counts_load(n):
    moe = make_moe(256, 64, 6, 128, 2, torch.bfloat16, seed=5)
    x = torch.randn(n, 256, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        out, indices, load = ops.moe_forward(moe, x)
        ref, routing = moe.float()(x.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)
    assert load.tolist() == routing.load.tolist()
    # the kernels' choice as the gate's (as a set per token: the router's top-k is unsorted)
    assert indices.sort(-1).values.tolist() == routing.indices.sort(-1).values.tolist()


@pytest.mark.parametrize("n", [1, 3])
def test_moe_forward_keeps_the_model_path_for_deep_experts(n):
    """The fused kernels run one-layer experts only: with deep experts (`n_deep_experts`), `moe_forward` under the
    Triton backend gives the model's mixed-depth output."""
    moe = make_moe(32, 8, 2, 16, 1, HALF, seed=n, n_deep_experts=4)
    x = torch.randn(n, 32, device=DEVICE, dtype=HALF)
    with torch.no_grad():
        with ops.backend("torch"):
            want, routing = moe(x)
        with ops.backend("triton"):
            out, indices, load = ops.moe_forward(moe, x)
    torch.testing.assert_close(out, want)
    assert indices.tolist() == routing.indices.tolist() and load.tolist() == routing.load.tolist()
