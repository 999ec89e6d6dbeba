"""The fused MoE kernels (`seekforge.ops.triton.moe.fused_experts`) over FP8 expert weights (e4m3 with one fp32 scale
per 128x128 block, `scales=`), against the model's routed experts given the weights dequantised by hand (each e4m3
value times its block's scale, in fp32), and `ops.moe_forward`'s choice of them for an FP8 model's MoE block.

Without CUDA the kernels run under Triton's interpreter (tests/triton_setup.py), with fp16 standing in for bf16.
"""

import pytest
import torch
from moe_routing import random_routing
from triton_setup import CUDA, DEVICE, HALF, patch_interpreter

triton = pytest.importorskip("triton")
patch_interpreter()

from seekforge import ops  # noqa: E402
from seekforge.errors import ConfigError  # noqa: E402
from seekforge.model import ModelConfig, Transformer  # noqa: E402
from seekforge.model.fp8_weights import to_fp8_weights  # noqa: E402
from seekforge.model.mlp import MLP  # noqa: E402
from seekforge.model.moe import Experts  # noqa: E402
from seekforge.ops.triton import tuning  # noqa: E402
from seekforge.ops.triton.moe import MoEConfig, fused_experts  # noqa: E402

FP8 = torch.float8_e4m3fn


def fp8_matrices(shape: tuple, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 values [..., n, k] and block scales [..., ceil(n / 128), ceil(k / 128)] spread over two orders of
    magnitude, so a wrong block's scale shows."""
    *lead, n, k = shape
    q = (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(FP8)
    scale = torch.rand(*lead, -(-n // 128), -(-k // 128), generator=g) * 1e-2 + 1e-4
    return q, scale


def by_hand(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Element (i, j) of each matrix times the scale of block (i // 128, j // 128), in fp32."""
    n, k = q.shape[-2:]
    rows, cols = torch.arange(n) // 128, torch.arange(k) // 128
    return q.float() * scale[..., rows, :][..., cols]


def _problem(n, k, experts, dim, inter, seed, skew=False):
    """FP8 experts with random routing, and the model's experts (fp32) over them dequantised: the reference."""
    g = torch.Generator().manual_seed(seed)
    fp8 = [fp8_matrices(shape, g) for shape in ((experts, inter, dim), (experts, dim, inter), (experts, inter, dim))]
    ex = Experts(experts, dim, inter)
    with torch.no_grad():
        for p, (q, scale) in zip((ex.w1, ex.w2, ex.w3), fp8):
            p.copy_(by_hand(q, scale))
    x, weights, indices = random_routing(n, k, experts, dim, g, skew)
    with torch.no_grad():
        ref = ex(x, weights, indices)[0]
    weights_q = tuple(q.to(DEVICE) for q, _ in fp8)
    scales = tuple(s.to(DEVICE) for _, s in fp8)
    return weights_q, scales, x.to(DEVICE), weights.to(DEVICE), indices.to(DEVICE), ref


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


CASES = [  # n, k, experts, dim, inter, rows, config
    (1, 4, 16, 200, 136, True, None),  # batch 1 as GEMVs; dim and inter past one block, partial last blocks
    (1, 6, 16, 200, 136, False, None),  # batch 1 as MMA tiles, one block a pair
    (2, 3, 8, 260, 72, None, None),  # two tokens: one block a pair (the tiles under the interpreter)
    (9, 2, 8, 200, 136, None, None),  # past one block a pair: grouped by expert
    (40, 4, 8, 136, 200, None, MoEConfig(32, 32, 32, 4, 2)),  # experts with rows in several blocks, 4 K steps a block
    (60, 6, 8, 136, 72, None, None),  # wider blocks (over 16 rows an expert)
    (3, 1, 4, 16, 24, None, None),  # k = 1, every dim under one block
]


@pytest.mark.parametrize("n,k,experts,dim,inter,rows,config", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=["fp32", "half"])
def test_fp8_experts_match_the_model_over_the_weights_dequantised(n, k, experts, dim, inter, rows, config, dtype):
    (w1, w2, w3), scales, x, weights, indices, ref = _problem(n, k, experts, dim, inter, seed=n + k + dim)
    out = fused_experts(x.to(dtype), w1, w2, w3, weights, indices, config, rows=rows, scales=scales)
    assert out.dtype == dtype and out.shape == (n, dim)
    _close(out, ref, dtype)


def test_a_wrong_blocks_scale_shows():
    """The cases above can fail: the scales of one block of one chosen expert changed, the output moves."""
    (w1, w2, w3), scales, x, weights, indices, ref = _problem(1, 6, 16, 200, 136, seed=1)
    s1, s2, s3 = (s.clone() for s in scales)
    s2[indices[0, 0], 1, 0] *= 2  # w2 rows 128 .. of the first slot's expert
    out = fused_experts(x, w1, w2, w3, weights, indices, rows=False, scales=(s1, s2, s3))
    with pytest.raises(AssertionError):
        _close(out, ref, torch.float32)


@pytest.mark.parametrize("rows", [False, True], ids=["tiles", "gemvs"])
def test_one_block_per_pair_reads_an_expert_chosen_twice(rows):
    (w1, w2, w3), scales, x, weights, indices, ref = _problem(2, 2, 4, 136, 72, seed=4, skew=True)
    assert (indices == 0).sum() == 2
    _close(fused_experts(x, w1, w2, w3, weights, indices, rows=rows, scales=scales), ref, torch.float32)


def _fp8_mlp(dim: int, inter: int, g: torch.Generator) -> tuple[tuple, tuple, MLP]:
    """A shared-experts MLP's FP8 weights and scales (gate, down, up) and the fp32 MLP over them dequantised."""
    fp8 = [fp8_matrices(shape, g) for shape in ((inter, dim), (dim, inter), (inter, dim))]
    mlp = MLP(dim, inter)
    with torch.no_grad():
        for lin, (q, scale) in zip((mlp.w1, mlp.w2, mlp.w3), fp8):
            lin.weight.copy_(by_hand(q, scale))
    return tuple(q.to(DEVICE) for q, _ in fp8), tuple(s.to(DEVICE) for _, s in fp8), mlp


@pytest.mark.parametrize("n,num_shared,inter,rows", [(1, 1, 72, True), (1, 1, 72, False), (1, 2, 128, True),
                                                    (2, 2, 128, False), (20, 2, 128, None), (20, 1, 72, None)])
@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=["fp32", "half"])
def test_fp8_shared_experts_join_the_routed_ones(n, num_shared, inter, rows, dtype):
    """The shared experts' FP8 MLP as S more experts of weight 1, each reading its own rows (gate/up) or columns
    (down) of the shared matrices and their scales: one shared expert of any inter, several where inter is whole
    blocks. With the residual added in the same pass."""
    routed, scales, x, weights, indices, ref = _problem(n, 3, 8, 24, inter, seed=n + num_shared)
    shared, shared_scales, mlp = _fp8_mlp(24, num_shared * inter, torch.Generator().manual_seed(n))
    residual = torch.randn(n, 24, device=DEVICE)
    with torch.no_grad():
        ref = ref + mlp(x.cpu()) + residual.cpu()
    out = fused_experts(x.to(dtype), *routed, weights, indices, rows=rows, residual=residual.to(dtype),
                        scales=scales, shared=shared, shared_scales=shared_scales)
    _close(out, ref, dtype)


def test_bad_fp8_inputs_name_the_problem():
    (w1, w2, w3), scales, x, weights, indices, _ = _problem(2, 2, 4, 136, 72, seed=0)
    with pytest.raises(ConfigError, match="float8_e4m3fn where scales are given"):
        fused_experts(x, w1, w2, w3, weights, indices)  # FP8 weights without their scales
    with pytest.raises(ConfigError, match="block scales of shapes"):
        fused_experts(x, w1, w2, w3, weights, indices, scales=(scales[0], scales[0], scales[2]))
    with pytest.raises(ConfigError, match="block scales of shapes"):
        fused_experts(x, w1, w2, w3, weights, indices, scales=(scales[0].double(), scales[1], scales[2]))
    with pytest.raises(ConfigError, match="within one 128x128 block"):
        fused_experts(x, w1, w2, w3, weights, indices, MoEConfig(16, 256, 64, 4, 2), scales=scales)
    shared, shared_scales, _ = _fp8_mlp(136, 2 * 72, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="shared_scales"):
        fused_experts(x, w1, w2, w3, weights, indices, scales=scales, shared=shared)
    with pytest.raises(ConfigError, match=r"inter \(72\) is a multiple of 128"):
        fused_experts(x, w1, w2, w3, weights, indices, scales=scales, shared=shared, shared_scales=shared_scales)


def test_fp8_experts_compile_as_one_graph():
    (w1, w2, w3), scales, x, weights, indices, _ = _problem(1, 3, 8, 136, 72, seed=2)
    compiled = torch.compile(fused_experts, fullgraph=True, dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, w1, w2, w3, weights, indices, scales=scales),
                                   fused_experts(x, w1, w2, w3, weights, indices, scales=scales))


def _fp8_moe_block(inter: int, shared: int, seed: int):
    """The MoE block of a small model converted to FP8 weights (`to_fp8_weights`): routed and shared experts."""
    cfg = ModelConfig.preset("tiny").replace(n_layers=2, n_dense_layers=1, n_mtp_modules=0, dim=136,
                                             moe_inter_dim=inter, n_shared_experts=shared)
    torch.manual_seed(seed)
    model = to_fp8_weights(Transformer(cfg).to(DEVICE, HALF).eval())
    return model.layers[1].ffn


@pytest.mark.parametrize("n,shared,inter,fused,joined", [(1, 1, 72, True, True), (2, 2, 128, True, True),
                                                         (2, 2, 72, True, False), (20, 1, 72, True, False),
                                                         (65, 1, 72, False, False)], ids=str)
def test_moe_forward_takes_the_fused_kernels_for_fp8_experts(n, shared, inter, fused, joined, monkeypatch):
    """Under the Triton backend an FP8 MoE block's decode rows (up to FUSED_MOE_ROWS an expert on average) run the
    fused kernels with the block scales, the shared experts in the same pass for up to FUSED_SHARED_TOKENS tokens
    where their scales are whole blocks an expert (else added by their own FP8 projections); more rows take the
    model's path. Either way the output is the PyTorch reference's (the weights dequantised into x's dtype)."""
    from seekforge.ops.triton import moe as moe_module

    calls = []
    kernel = moe_module.fused_experts
    monkeypatch.setattr(moe_module, "fused_experts", lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))
    moe = _fp8_moe_block(inter, shared, seed=n)
    assert moe.experts.w1.dtype == FP8 and moe.shared_experts.w1.weight.dtype == FP8
    x = torch.randn(n, 136, device=DEVICE, dtype=HALF)
    residual = torch.randn(n, 136, device=DEVICE, dtype=HALF)
    with torch.no_grad():
        with ops.backend("torch"):
            want, routing = moe(x)
        with ops.backend("triton"), tuning.tuning(forced={"moe_form": "tiles"}):
            out, indices, load = ops.moe_forward(moe, x, residual=residual)
    assert len(calls) == int(fused)
    if fused:
        assert calls[0]["scales"][0] is moe.experts.w1_scale_inv
        assert (calls[0]["shared_scales"] is not None) == joined
    assert indices.sort(-1).values.tolist() == routing.indices.sort(-1).values.tolist()
    assert load.tolist() == routing.load.tolist()
    ref = (residual + want).float()
    torch.testing.assert_close(out.float(), ref, atol=3e-2 * ref.abs().max().item(), rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="16b shapes in bf16")
@pytest.mark.parametrize("n,rows", [(1, True), (1, False), (2, True), (4, None), (64, None)])
def test_16b_shape_fp8_decode_batches(n, rows):
    """DeepSeek-V2-Lite's routed experts (64 of 1408 x 2048, top-6) with both shared experts joined, bf16 x."""
    (w1, w2, w3), scales, x, weights, indices, ref = _problem(n, 6, 64, 2048, 1408, seed=n)
    shared, shared_scales, mlp = _fp8_mlp(2048, 2 * 1408, torch.Generator().manual_seed(n))
    with torch.no_grad():
        ref = ref + mlp(x.cpu())
    out = fused_experts(x.bfloat16(), w1, w2, w3, weights, indices, rows=rows, scales=scales, shared=shared,
                        shared_scales=shared_scales)
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs")
@pytest.mark.parametrize("n", [1, 8])
def test_fp8_cuda_graph_replay_follows_new_routing(n):
    (w1, w2, w3), scales, x, weights, indices, _ = _problem(n, 6, 64, 256, 256, seed=2)
    x = x.bfloat16()

    def run():
        return fused_experts(x, w1, w2, w3, weights, indices, scales=scales)

    run()  # compiles (and on the first one-block call times both forms) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(5):
        x.normal_(), weights.uniform_()
        indices.copy_(torch.stack([torch.randperm(64, device=DEVICE)[:6] for _ in range(n)]))
        graph.replay()
        torch.testing.assert_close(out, run(), atol=0, rtol=0)
