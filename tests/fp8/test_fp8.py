"""DeepSeek-V3's blockwise FP8 (seekforge.fp8): quantisation against hand-made values, the FP8 linear and grouped
expert GEMMs with their gradients against a reference written here (dequantise, multiply in fp64), and a converted
model's training step against the same reference patched into the model."""

import pytest
import torch
from torch import nn

from seekforge.errors import ConfigError
from seekforge.fp8.convert import FP8Experts, FP8Linear, convert_to_fp8
from seekforge.fp8.gemm import fp8_grouped_linear, fp8_linear
from seekforge.ops.quant import (FP8, dequantise_blocks, dequantise_tiles, quantise_blocks, quantise_segments,
                                 quantise_tiles)
from seekforge.model.config import ModelConfig
from seekforge.model.norm import RMSNorm
from seekforge.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- quantisation
def test_tiles_round_trip_exactly_where_values_are_e4m3_times_the_scale():
    """A row of 300 = 128 + 128 + 44: three tiles, the last partial. Each tile holds e4m3 values (whole numbers up
    to 16, and 448 once) times a power of two, so its scale is amax / 448 = that power and the round trip is exact;
    an all-zero tile gets scale 1."""
    grid = torch.arange(300) % 17 - 8.0  # -8 .. 8, all e4m3 values
    grid[5], grid[200], grid[290] = 448.0, -448.0, 448.0
    powers = torch.tensor([0.25, 4.0, 2.0 ** -10])
    x = (grid * powers.repeat_interleave(128)[:300]).unsqueeze(0)
    q, scale = quantise_tiles(x)
    assert q.dtype == FP8 and q.shape == (1, 300) and scale.shape == (1, 3)
    assert torch.equal(scale[0], powers)
    assert torch.equal(dequantise_tiles(q, scale), x)
    q0, s0 = quantise_tiles(torch.zeros(2, 130))
    assert torch.equal(s0, torch.ones(2, 2)) and torch.equal(q0.float(), torch.zeros(2, 130))


def test_tile_scale_is_amax_over_448_and_the_error_is_e4m3_rounding():
    torch.manual_seed(0)
    x = torch.randn(5, 257) * torch.logspace(-3, 3, 257)  # magnitudes spread within tiles
    q, scale = quantise_tiles(x)
    for t, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 257)]):
        assert torch.allclose(scale[:, t], x[:, lo:hi].abs().amax(dim=1) / 448, rtol=1e-6, atol=0)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((5,), 448.0))  # each row's largest maps to 448
    err = (dequantise_tiles(q, scale) - x).abs()
    tile_scale = scale.repeat_interleave(128, dim=1)[:, :257]
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 relative for normal values, 2^-10 absolute below 2^-6
    assert (err <= torch.maximum(x.abs() * 2 ** -4, tile_scale * 2 ** -10) * (1 + 1e-6)).all()


def test_blocks_scale_each_128x128_block_of_each_matrix():
    torch.manual_seed(1)
    w = torch.randn(2, 200, 300)
    w[1, 130:, 260:] *= 1000  # one corner block of the second matrix much larger
    q, scale = quantise_blocks(w)
    assert q.shape == w.shape and scale.shape == (2, 2, 3)
    for e in range(2):
        for i, (r0, r1) in enumerate([(0, 128), (128, 200)]):
            for j, (c0, c1) in enumerate([(0, 128), (128, 256), (256, 300)]):
                block = w[e, r0:r1, c0:c1]
                assert scale[e, i, j] == pytest.approx(float(block.abs().max()) / 448, rel=1e-6)
                assert float(q[e, r0:r1, c0:c1].float().abs().max()) == 448.0
    back = dequantise_blocks(q, scale)
    assert ((back - w).abs() <= w.abs() * 2 ** -4 + scale.repeat_interleave(128, 1).repeat_interleave(128, 2)
            [:, :200, :300] * 2 ** -10).all()
    # a transposed matrix has the transposed blocks: the input-gradient GEMM reuses them
    qt, st = quantise_blocks(w[0].t())
    assert torch.equal(qt.float(), q[0].t().float()) and torch.equal(st, scale[0].t())


def test_block_scales_are_deepseek_checkpoints_weight_scale_inv():
    """DeepSeek's FP8 checkpoints store q and weight_scale_inv with weight = q * scale_inv per 128x128 block: the
    checkpoint loader's dequantisation (model/hf.py) reads our blocks back as ours does."""
    from seekforge.model.hf import _dequantize_fp8

    torch.manual_seed(7)
    q, scale = quantise_blocks(torch.randn(300, 130))
    assert torch.equal(_dequantize_fp8(q, scale, (128, 128)), dequantise_blocks(q, scale))


def test_segment_tiles_down_the_rows_restart_at_each_expert():
    """Rows sorted by expert, counts 3, 0, 130: the weight gradient's 128x1 tiles (`quantise_segments`' transposed
    operand) are expert 0's 3 rows, one empty tile for expert 1 (scale 1), then expert 2's 128 rows and its last 2."""
    offsets = torch.tensor([3, 3, 133], dtype=torch.int32)
    expert_of_row = torch.tensor([0] * 3 + [2] * 130)
    x = torch.randn(133, 5)
    x[131, 4] = 100.0
    _, _, q_t, scale_t, ends = quantise_segments(x, offsets, expert_of_row)
    assert ends.tolist() == [128, 256, 512] and scale_t.shape == (5, 4) and q_t.shape == (5, 512)
    assert torch.allclose(scale_t[:, 0], x[:3].abs().amax(0) / 448)
    assert torch.equal(scale_t[:, 1], torch.ones(5))
    assert torch.allclose(scale_t[:, 2], x[3:131].abs().amax(0) / 448)
    assert scale_t[4, 3] == 100.0 / 448
    at = torch.tensor([0, 1, 2, *range(256, 386)])  # each row's column in the padded transpose
    scale = scale_t.repeat_interleave(128, dim=1)[:, at].t()
    err = (q_t[:, at].t().float() * scale - x).abs()
    assert (err <= x.abs() * 2 ** -4 + scale * 2 ** -10).all()


# ---------------------------------------------------------------- the reference GEMMs, written here
def _q_tiles(x):
    """x quantised in 1x128 tiles and dequantised, fp64."""
    return dequantise_tiles(*quantise_tiles(x)).double()


def _q_blocks(w):
    return dequantise_blocks(*quantise_blocks(w)).double()


def _reference_linear(x, w, dy):
    """y, dx, dW of y = x W^T with V3's quantisation: x and dy in 1x128 tiles, W in 128x128 blocks, and for dW
    dy and x in 128x1 tiles (1x128 tiles of their transposes)."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    y = _q_tiles(x2) @ _q_blocks(w).t()
    dx = _q_tiles(dy2) @ _q_blocks(w)
    dw = _q_tiles(dy2.t()) @ _q_tiles(x2.t()).t()
    return y.view(*x.shape[:-1], w.shape[0]), dx.view(x.shape), dw


def _reference_grouped(x, w, counts, dy):
    """The same for routed experts, one expert at a time: rows [start, start + count) are expert e's."""
    ys, dxs, dws, start = [], [], [], 0
    for e, count in enumerate(counts):
        y, dx, dw = _reference_linear(x[start:start + count], w[e], dy[start:start + count])
        ys.append(y), dxs.append(dx), dws.append(dw)
        start += count
    return torch.cat(ys), torch.cat(dxs), torch.stack(dws)


def _rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("shape", [(3, 7, 300, 200), (1, 130, 128, 64)])
def test_fp8_linear_forward_and_gradients_match_the_reference(shape):
    *lead, k, n = shape
    torch.manual_seed(2)
    x = torch.randn(*lead, k, requires_grad=True)
    w = (torch.randn(n, k) * 0.05).requires_grad_()
    dy = torch.randn(*lead, n)
    y = fp8_linear(x, w)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = _reference_linear(x.detach(), w.detach(), dy)
    for got, want in ((y, y_ref), (x.grad, dx_ref), (w.grad, dw_ref)):
        assert got.dtype == torch.float32
        assert _rel(got, want) < 1e-6
    # and against the unquantised GEMMs: FP8's error, a few percent, not zero
    y_hp = x.detach() @ w.detach().t()
    dx_hp, dw_hp = dy @ w.detach(), dy.reshape(-1, n).t() @ x.detach().reshape(-1, k)
    for got, want in ((y, y_hp), (x.grad, dx_hp), (w.grad, dw_hp)):
        assert 1e-3 < _rel(got, want) < 0.06


def test_a_frozen_weight_or_input_still_gets_the_other_gradient_as_the_reference():
    """The forward quantises x's transposed tiles only where the weight gradient is wanted, and the backward dy's
    only then: with the weight frozen dx is still the reference's, and with x frozen dW is."""
    torch.manual_seed(11)
    counts = [150, 0, 140]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    rows = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    x, dy = torch.randn(290, 136), torch.randn(290, 132)
    cases = ((lambda a, b: fp8_linear(a, b), torch.randn(132, 136) * 0.05, _reference_linear),
             (lambda a, b: fp8_grouped_linear(a, b, offsets, rows), torch.randn(3, 132, 136) * 0.05,
              lambda a, b, d: _reference_grouped(a, b, counts, d)))
    for fn, w, reference in cases:
        _, dx_ref, dw_ref = reference(x, w, dy)
        for frozen in ("w", "x"):
            xg, wg = x.clone().requires_grad_(frozen == "w"), w.clone().requires_grad_(frozen == "x")
            fn(xg, wg).backward(dy)
            got, want = (xg.grad, dx_ref) if frozen == "w" else (wg.grad, dw_ref)
            assert _rel(got, want) < 1e-6


def test_fp8_linear_under_bf16_autocast_returns_bf16_as_nn_linear_does():
    torch.manual_seed(3)
    x, w = torch.randn(4, 256, requires_grad=True), torch.randn(64, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x, w)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    y_ref, _, _ = _reference_linear(x.detach(), w.detach(), torch.ones(4, 64))
    assert _rel(y.float(), y_ref) < 1e-2  # the reference, rounded to bf16


def test_fp8_grouped_linear_forward_and_gradients_match_the_reference():
    torch.manual_seed(4)
    counts = [150, 0, 5, 140]  # an empty expert, partial row tiles, one expert over a tile boundary
    m, k, n = sum(counts), 136, 132  # rows of 16 bytes, as torch._grouped_mm needs
    x = torch.randn(m, k, requires_grad=True)
    w = (torch.randn(len(counts), n, k) * 0.05).requires_grad_()
    dy = torch.randn(m, n)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    y = fp8_grouped_linear(x, w, offsets, expert_of_row)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = _reference_grouped(x.detach(), w.detach(), counts, dy)
    for got, want in ((y, y_ref), (x.grad, dx_ref), (w.grad, dw_ref)):
        assert _rel(got, want) < 1e-6
    assert torch.equal(w.grad[1], torch.zeros(n, k))


def test_segment_ends_pad_each_expert_to_a_positive_multiple_of_128_rows_within_the_bound():
    """`segment_ends` (the weight-gradient operands' layout: each expert's rows in whole 128-row tiles, at least one)
    and `padded_tiles`, the buffer's bound known without reading the counts (a multiple of 4 tiles)."""
    from seekforge.ops.quant import padded_tiles, segment_ends

    counts = torch.tensor([3, 0, 128, 129])
    ends = segment_ends(counts.cumsum(0).to(torch.int32))
    assert ends.tolist() == [128, 256, 384, 640] and ends.dtype == torch.int32  # 1, 1 (none), 1, 2 tiles
    assert padded_tiles(260, 4) == 8  # ceil(260 / 128) + 3 = 6 tiles -> 8
    assert padded_tiles(0, 2) == 4 and padded_tiles(8192, 1) == 64
    for trial in range(50):  # the bound holds for any counts
        g = torch.Generator().manual_seed(trial)
        counts = torch.randint(0, 300, (7,), generator=g) * torch.randint(0, 2, (7,), generator=g)
        assert int(segment_ends(counts.cumsum(0))[-1]) <= 128 * padded_tiles(int(counts.sum()), 7)


def test_expert_gemms_on_cuda_refuse_to_run_without_their_kernels():
    """On CUDA the Triton kernels are the expert GEMMs' only path (torch has no grouped GEMM with block scales): a
    choice that leaves them off is a ConfigError naming the way out, while the CPU runs the reference."""
    from seekforge import ops
    from seekforge.fp8.gemm import grouped_kernels

    with ops.backend("torch", ops=["fp8_grouped"]):
        with pytest.raises(ConfigError, match="expert GEMMs on CUDA run Triton kernels.*'auto' or 'triton'"):
            grouped_kernels(torch.device("cuda"))
        assert grouped_kernels(torch.device("cpu")) is None


# ---------------------------------------------------------------- several weights of one input
def _one_by_one_and_together(together, one, x, ws, dys):
    """(outputs, dx, dWs) of `one(x, w)` per weight, summed by autograd as today's model did, and of
    `together(x, ws)`."""
    results = []
    for run in (lambda a, b: [one(a, w) for w in b], together):
        xa, wa = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws]
        ys = run(xa, wa)
        torch.autograd.backward(ys, dys)
        results.append(([y.detach() for y in ys], xa.grad, [w.grad for w in wa]))
    return results


def _count_quantisations(monkeypatch):
    """Patches `quantise_both` and `quantise_weights` of seekforge.fp8.gemm to count their calls."""
    from seekforge.fp8 import gemm

    calls = {"quantise_both": 0, "quantise_weights": 0}
    for name in calls:
        def counted(*args, _name=name, _fn=getattr(gemm, name), **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(gemm, name, counted)
    return calls


@pytest.mark.parametrize("ns", [(256, 128), (128, 128, 384), (128, 100), (192, 136), (100, 128)])
def test_linears_of_one_input_equal_each_weights_own_fp8_linear(ns, monkeypatch):
    """`fp8_linears` quantises x once (both ways) for all the weights. Each out but the last a multiple of 128: one
    GEMM a pass over the weights joined along out, whose quantisation is each weight's own, so the outputs and the
    weight gradients are bit for bit those of `fp8_linear` per weight, and dx (sum of dy_w W_w in one fp32
    accumulation, where autograd added the per-weight products) is within fp32 rounding of both that sum and the
    fp64 reference. Otherwise a GEMM a weight, and dx too is the per-weight sum, exactly."""
    from seekforge.fp8.gemm import fp8_linears

    torch.manual_seed(12)
    k, joined = 200, all(n % 128 == 0 for n in ns[:-1])
    x = torch.randn(3, 50, k) * torch.logspace(-1, 1, 50).unsqueeze(1)
    ws, dys = [torch.randn(n, k) * 0.05 for n in ns], [torch.randn(3, 50, n) for n in ns]
    calls = _count_quantisations(monkeypatch)
    (ys_one, dx_one, dws_one), (ys, dx, dws) = _one_by_one_and_together(fp8_linears, fp8_linear, x, ws, dys)
    assert calls == {"quantise_both": 2 * len(ns) + (1 + 1 if joined else 1 + len(ns)),
                     "quantise_weights": len(ns) + (1 if joined else len(ns))}
    for got, want in zip([*ys, *dws], [*ys_one, *dws_one]):
        assert torch.equal(got, want)
    if joined:
        dx_ref = sum(_reference_linear(x, w, dy)[1] for w, dy in zip(ws, dys))
        assert _rel(dx, dx_ref) < 1e-6 and _rel(dx, dx_one) < 1e-6
    else:
        assert torch.equal(dx, dx_one)


@pytest.mark.parametrize("ns", [(128, 128), (256, 256), (136, 136), (128, 256)])
def test_grouped_linears_of_one_input_equal_each_weights_own_fp8_grouped_linear(ns, monkeypatch):
    """`fp8_grouped_linears` alike for the routed experts: joined where the weights share one out, a multiple of 128
    (a SwiGLU's w1 and w3), one grouped GEMM a pass, the weight gradient written weight by weight."""
    from seekforge.fp8.gemm import fp8_grouped_linears

    torch.manual_seed(13)
    counts, k, joined = [150, 0, 5, 140], 136, len(set(ns)) == 1 and ns[0] % 128 == 0
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    rows = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    x = torch.randn(sum(counts), k)
    ws = [torch.randn(len(counts), n, k) * 0.05 for n in ns]
    dys = [torch.randn(sum(counts), n) for n in ns]
    calls = _count_quantisations(monkeypatch)
    (ys_one, dx_one, dws_one), (ys, dx, dws) = _one_by_one_and_together(
        lambda a, b: fp8_grouped_linears(a, b, offsets, rows), lambda a, b: fp8_grouped_linear(a, b, offsets, rows),
        x, ws, dys)
    # the experts quantise W again, transposed, in the backward
    assert calls == {"quantise_both": 2 * len(ns) + (1 + 1 if joined else 1 + len(ns)),
                     "quantise_weights": 2 * len(ns) + (2 if joined else 2 * len(ns))}
    for got, want in zip([*ys, *dws], [*ys_one, *dws_one]):
        assert torch.equal(got, want)
    if joined:
        dx_ref = sum(_reference_grouped(x, w, counts, dy)[1] for w, dy in zip(ws, dys))
        assert _rel(dx, dx_ref) < 1e-6 and _rel(dx, dx_one) < 1e-6
    else:
        assert torch.equal(dx, dx_one)


def test_linears_of_one_input_give_only_the_gradients_asked_for():
    """A frozen weight among several (or a frozen x) gets no gradient, and the others get theirs as before."""
    from seekforge.fp8.gemm import fp8_grouped_linears, fp8_linears

    torch.manual_seed(14)
    counts = [100, 60]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    rows = torch.repeat_interleave(torch.arange(2), torch.tensor(counts))
    x = torch.randn(160, 256)
    for fn, one, ws in ((fp8_linears, fp8_linear, [torch.randn(128, 256) * 0.05 for _ in range(2)]),
                        (lambda a, b: fp8_grouped_linears(a, b, offsets, rows),
                         lambda a, b: fp8_grouped_linear(a, b, offsets, rows),
                         [torch.randn(2, 128, 256) * 0.05 for _ in range(2)])):
        dys = [torch.randn(160, 128) for _ in ws]
        for frozen in ("x", "w0"):
            xa = x.clone().requires_grad_(frozen != "x")
            wa = [w.clone().requires_grad_(not (frozen == "w0" and i == 0)) for i, w in enumerate(ws)]
            torch.autograd.backward(fn(xa, wa), dys)
            assert (xa.grad is None) == (frozen == "x") and (wa[0].grad is None) == (frozen == "w0")
            wb = ws[1].clone().requires_grad_()
            one(x, wb).backward(dys[1])
            assert torch.equal(wa[1].grad, wb.grad)


def test_projections_hands_fp8_linears_of_one_input_to_fp8_linears():
    """`seekforge.ops.projections` (the MLP's w1 and w3, MLA's two input projections) runs converted layers through
    FP8Linear's hook: one `fp8_linears` call; layers of mixed kinds each as they compute."""
    from seekforge.fp8.gemm import fp8_linears
    from seekforge.ops import projections

    torch.manual_seed(15)
    a, b = nn.Linear(256, 128, bias=False), nn.Linear(256, 256, bias=False)
    x = torch.randn(2, 9, 256)
    plain = projections(x, a, b)
    assert all(torch.equal(got, want) for got, want in zip(plain, (a(x), b(x))))
    a.__class__ = b.__class__ = FP8Linear
    got, want = projections(x, a, b), fp8_linears(x, (a.weight, b.weight))
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    c = nn.Linear(256, 64, bias=False)
    mixed = projections(x, a, c)
    assert torch.equal(mixed[0], fp8_linear(x, a.weight)) and torch.equal(mixed[1], c(x))


# ---------------------------------------------------------------- the converter
def _tiny() -> Transformer:
    torch.manual_seed(5)
    cfg = ModelConfig.preset("tiny").replace(dim=192, inter_dim=160, moe_inter_dim=136, n_layers=2, vocab_size=64)
    return Transformer(cfg)


def test_converter_swaps_the_blocks_gemms_and_keeps_the_rest():
    model = _tiny()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    convert_to_fp8(model)
    assert dict(model.named_parameters()) == params and list(model.state_dict()) == keys  # the same tensors
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["embed"] is nn.Embedding and kinds["head"] is nn.Linear
    assert kinds["mtp.0.eh_proj"] is nn.Linear
    for block in ("layers.0", "layers.1", "mtp.0.block"):
        for proj in ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo"):
            assert kinds[f"{block}.attn.{proj}"] is FP8Linear
    for proj in ("w1", "w2", "w3"):
        assert kinds[f"layers.0.ffn.{proj}"] is FP8Linear  # dense
        assert kinds[f"layers.1.ffn.shared_experts.{proj}"] is FP8Linear
    assert kinds["layers.1.ffn.experts"] is FP8Experts
    assert all(kinds[n] is RMSNorm for n in kinds if n.endswith("norm"))
    assert type(model.layers[1].ffn.gate).__name__ == "Gate"
    assert convert_to_fp8(_tiny(), "none").layers[0].attn.wo.__class__ is nn.Linear


def test_converter_errors():
    with pytest.raises(ConfigError, match="fp8 must be one of none, blockwise"):
        convert_to_fp8(_tiny(), "e5m2")
    model = _tiny()
    model.layers[0].attn.wo = nn.Linear(64, 192, bias=True)
    with pytest.raises(ConfigError, match="bias"):
        convert_to_fp8(model)


class _Checked(torch.autograd.Function):
    """`gemm(x, w)`, one FP8 GEMM of the converted model, run as the step's own op; on the way it records the relative
    error of its output and of both its gradients against `reference(x, w, dy)` (-> y, dx, dw) on the very operands
    it got, so that each GEMM is checked on its own inputs: rounding differences upstream that move one value across
    an e4m3 rounding boundary (a 1/16 jump in it, carried downstream at ~1e-3) never reach the comparison."""

    @staticmethod
    def forward(ctx, x, w, gemm, reference, errors):
        with torch.enable_grad():
            xa, wa = x.detach().requires_grad_(), w.detach().requires_grad_()
            y = gemm(xa, wa)
        ctx.graph, ctx.reference, ctx.errors = (xa, wa, y), reference, errors
        errors.append(_rel(y, reference(xa.detach(), wa.detach(), torch.zeros_like(y))[0]))
        return y.detach()

    @staticmethod
    def backward(ctx, dy):
        xa, wa, y = ctx.graph
        dx, dw = torch.autograd.grad(y, (xa, wa), dy)
        _, dx_ref, dw_ref = ctx.reference(xa.detach(), wa.detach(), dy)
        ctx.errors.extend((_rel(dx, dx_ref), _rel(dw, dw_ref)))
        return dx, dw, None, None, None


def _counts(offsets):
    return torch.diff(offsets.long(), prepend=offsets.new_zeros(1).long()).tolist()


def test_a_converted_models_training_step_runs_every_fp8_gemm_as_the_reference(monkeypatch):
    """Every FP8 GEMM of a converted model's training step (each FP8Linear's and each expert matmul's forward, input
    and weight gradient) against the reference GEMMs above on that GEMM's own operands, one weight at a time: the
    same step, bit for bit, as the model's own (its widths are no multiples of 128, so the layers of one input share
    x's quantisation but no GEMM); the step's loss and every gradient within FP8's error of the unconverted
    model's."""
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(6))
    labels = tokens.roll(-1, 1)

    def step(model):
        out = model.loss(tokens, labels, mtp_weight=0.3, balance_alpha=1e-4)
        out.loss.backward()
        return float(out.loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_fp8, grads_fp8 = step(convert_to_fp8(_tiny()))
    loss_hp, grads_hp = step(_tiny())
    errors = []
    monkeypatch.setattr(FP8Linear, "forward",
                        lambda self, x: _Checked.apply(x, self.weight, fp8_linear, _reference_linear, errors))
    monkeypatch.setattr(FP8Linear, "projections", staticmethod(lambda x, linears: tuple(l(x) for l in linears)))
    monkeypatch.setattr(FP8Experts, "matmul", lambda self, x, weights, offsets, rows: tuple(_Checked.apply(
        x, w, lambda a, b: fp8_grouped_linear(a, b, offsets, rows),
        lambda a, b, dy: _reference_grouped(a, b, _counts(offsets), dy), errors) for w in weights))
    model = convert_to_fp8(_tiny())
    loss_checked, grads_checked = step(model)
    assert loss_checked == loss_fp8 and all(torch.equal(grads_checked[n], grads_fp8[n]) for n in grads_fp8)
    kinds = [type(m) for m in model.modules()]
    assert len(errors) == 3 * (kinds.count(FP8Linear) + 3 * kinds.count(FP8Experts))  # 3 GEMMs a matmul, all run
    # fp32 against the reference's fp64: ~1e-7; the bound leaves room for one value that the two sides' layouts
    # convert to e4m3 on opposite sides of a rounding tie (torch's scalar and vectorised CPU conversions differ
    # within ~1e-5 of a tie), while a scale from a wrong tile or block, or a wrong transpose, is off by far more
    assert max(errors) < 1e-3 and sorted(errors)[len(errors) // 2] < 1e-6, sorted(errors)[-5:]
    assert grads_fp8.keys() == grads_hp.keys()
    assert loss_fp8 != loss_hp and loss_fp8 == pytest.approx(loss_hp, rel=1e-2)
    # e4m3 keeps 3 mantissa bits (relative rounding error up to 1/16, ~3.6% rms) and a gradient passes through
    # several quantised operands: ~0.06 to 0.1 here, depending on the CPU's fp32 rounding as above
    for name in ("layers.0.attn.wkv_b.weight", "layers.1.ffn.experts.w2", "embed.weight", "head.weight"):
        assert 0 < _rel(grads_fp8[name], grads_hp[name]) < 0.15, name


def test_a_converted_models_step_with_joined_gemms_is_the_one_weight_at_a_time_step():
    """Widths that are multiples of 128 (but wkv_a's, which comes last): the layers of one input run joined GEMMs,
    and the step is the one weight at a time: the same loss (the forward is bit for bit the same), gradients within
    the fp32 rounding of the joined input gradients' sums (which an e4m3 rounding downstream may magnify on a few
    values)."""
    torch.manual_seed(5)
    cfg = ModelConfig.preset("tiny").replace(dim=256, inter_dim=256, moe_inter_dim=128, q_lora_rank=128, n_layers=2,
                                             vocab_size=64)
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(6))

    def step():
        torch.manual_seed(5)
        model = convert_to_fp8(Transformer(cfg))
        out = model.loss(tokens, tokens.roll(-1, 1), mtp_weight=0.3, balance_alpha=1e-4)
        out.loss.backward()
        return float(out.loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FP8Linear, "projections", staticmethod(lambda x, linears: tuple(l(x) for l in linears)))
        patch.setattr(FP8Experts, "matmul", lambda self, x, weights, offsets, rows: tuple(
            fp8_grouped_linear(x, w, offsets, rows) for w in weights))
        loss_one, grads_one = step()
    assert loss == loss_one and grads.keys() == grads_one.keys()
    for name in grads:
        assert _rel(grads[name], grads_one[name]) < 1e-5, name


def test_train_config_fp8(tmp_path):
    from seekforge.train.pretrain import load_train_config

    with pytest.raises(ConfigError, match="fp8 must be one of"):
        load_train_config("tiny", ["fp8=fp16"])
    assert load_train_config("tiny", ["fp8=blockwise"]).fp8 == "blockwise"
    base = load_train_config("tiny")
    assert load_train_config("tiny", ["fp8=blockwise"]).fingerprint() == base.fingerprint()  # a resume may switch


@pytest.mark.slow  # two short training runs: about 20 s on a busy 2-core CPU
def test_bench_parity_runs_on_a_cpu_and_writes_its_json_and_plot(tmp_path):
    """bench/fp8.py's CPU mode at a tiny size: both runs train on the same batches, and the reported differences
    are those of the curves it records."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "fp8.py"
    spec = importlib.util.spec_from_file_location("bench_fp8", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = {"dim": 64, "inter_dim": 64, "moe_inter_dim": 32, "n_layers": 2, "n_mtp_modules": 0}
    out = tmp_path / "fp8.json"
    result = bench.main(["parity", "--steps", "3", "--docs", "60", "--batch", "2", "--seq", "16", "--device", "cpu",
                         "--model-overrides", json.dumps(model), "--json", str(out)])
    saved = json.loads(out.read_text())
    assert (tmp_path / saved["plot"]).stat().st_size > 0
    base, fp8 = (saved["curves"][r]["main_loss"] for r in ("none", "blockwise"))
    assert len(base) == len(fp8) == 3
    assert base[0] == pytest.approx(fp8[0], rel=0.02) and base != fp8  # one initialisation, one batch; FP8 differs
    assert saved["final_rel_diff"] == pytest.approx((fp8[-1] - base[-1]) / base[-1])
    assert result["late_mean_rel_diff"] == saved["late_mean_rel_diff"]


# Hopper's FP8 tensor cores sum a 128-wide k block keeping about 14 bits (DeepSeek-V3, section 3.3.2) before the
# scaled fp32 accumulation across blocks: an H100 measures 1.27e-4 relative against the fp32 product of the same
# FP8 values, where an fp32 accumulation would give ~1e-7.
FP8_TENSOR_CORES = 4e-4


@pytest.mark.gpu
@pytest.mark.parametrize("b_blocks", [True, False])
def test_scaled_mm_on_cuda_matches_the_reference(b_blocks):
    """On an sm90 GPU with a CUDA 12.9+ torch, the blockwise GEMM runs on torch._scaled_mm (shapes that need its
    padding included) and agrees with dequantise-and-multiply; elsewhere the probe says why not."""
    from seekforge.ops.blockwise_mm import blockwise_mm, reference_mm, scaled_mm_layout

    device = torch.device("cuda")
    if scaled_mm_layout(device, b_blocks) is None:
        pytest.skip("torch._scaled_mm does not run block scales here (the probe warned why)")
    torch.manual_seed(8)
    for m, k, n in [(4096, 2048, 1408), (37, 1408, 2048), (300, 200, 130)]:
        a, sa = quantise_tiles(torch.randn(m, k, device=device))
        b, sb = quantise_blocks(torch.randn(n, k, device=device)) if b_blocks else quantise_tiles(
            torch.randn(n, k, device=device))
        got = blockwise_mm(a, sa, b, sb, b_blocks, torch.float32)
        assert _rel(got, reference_mm(a, sa, b, sb, b_blocks, torch.float32)) < FP8_TENSOR_CORES


@pytest.mark.gpu
def test_fp8_linear_and_experts_on_cuda_match_the_cpu_reference():
    """The linear layer eager and compiled, with a weight [512, 384] whose input gradient's GEMM needs no padding (its
    transposed block scales reach torch._scaled_mm as they are), then the experts."""
    torch.manual_seed(9)
    for (n, k), compiled in (((384, 512), False), ((512, 384), False), ((512, 384), True)):
        x, w, dy = torch.randn(256, k), torch.randn(n, k) * 0.05, torch.randn(256, n)
        y_ref, dx_ref, dw_ref = _reference_linear(x, w, dy)
        fn = torch.compile(fp8_linear, fullgraph=True) if compiled else fp8_linear
        xc, wc = x.cuda().requires_grad_(), w.cuda().requires_grad_()
        y = fn(xc, wc)
        y.backward(dy.cuda())
        for got, want in ((y, y_ref), (xc.grad, dx_ref), (wc.grad, dw_ref)):
            assert _rel(got.detach().cpu(), want) < FP8_TENSOR_CORES
    counts = [300, 0, 212]
    xg, wg, dyg = torch.randn(512, 256), torch.randn(3, 128, 256) * 0.05, torch.randn(512, 128)
    y_ref, dx_ref, dw_ref = _reference_grouped(xg, wg, counts, dyg)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32).cuda()
    rows = torch.repeat_interleave(torch.arange(3), torch.tensor(counts)).cuda()
    xc = xg.cuda().bfloat16().requires_grad_()
    wc = wg.cuda().bfloat16().requires_grad_()
    out = fp8_grouped_linear(xc, wc, offsets, rows)
    out.backward(dyg.cuda().bfloat16())
    # bf16 inputs and outputs, dequantised values rounded to bf16: bf16's error on top of FP8's
    for got, want in ((out, y_ref), (xc.grad, dx_ref), (wc.grad, dw_ref)):
        assert _rel(got.float().cpu(), want) < 2e-2
    assert torch.equal(wc.grad[1].float().cpu(), torch.zeros(128, 256))  # an expert without rows


@pytest.mark.gpu
def test_experts_on_cuda_compile_with_any_row_counts_through_the_kernels():
    """The expert GEMMs as the trainer runs them on CUDA (the default backend: the Triton kernels), compiled as it
    compiles a block, in bf16: counts that are multiples of nothing and an empty expert."""
    torch.manual_seed(10)
    counts = [37, 0, 5, 141, 21]
    x, w, dy = torch.randn(sum(counts), 256), torch.randn(5, 128, 256) * 0.05, torch.randn(sum(counts), 128)
    y_ref, dx_ref, dw_ref = _reference_grouped(x, w, counts, dy)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32).cuda()
    rows = torch.repeat_interleave(torch.arange(5), torch.tensor(counts)).cuda()
    xc, wc = x.cuda().bfloat16().requires_grad_(), w.cuda().bfloat16().requires_grad_()
    compiled = torch.compile(lambda a, b: fp8_grouped_linear(a, b, offsets, rows), fullgraph=True)
    out = compiled(xc, wc)
    out.backward(dy.cuda().bfloat16())
    torch.cuda.synchronize()
    for got, want in ((out, y_ref), (xc.grad, dx_ref), (wc.grad, dw_ref)):
        assert _rel(got.float().cpu(), want) < 2e-2
    assert torch.equal(wc.grad[1].float().cpu(), torch.zeros(128, 256))


@pytest.mark.gpu
def test_weights_of_one_input_on_cuda_compile_and_match_the_reference():
    """The joined GEMMs as the trainer runs them on CUDA, compiled: MLA's two input projections (the second's width no
    multiple of 128: torch._scaled_mm's padding) and the experts' w1 and w3, against the reference per weight."""
    from seekforge.fp8.gemm import fp8_grouped_linears, fp8_linears

    torch.manual_seed(16)
    x, dys = torch.randn(256, 512), [torch.randn(256, 384), torch.randn(256, 72)]
    ws = [torch.randn(384, 512) * 0.05, torch.randn(72, 512) * 0.05]
    xc, wc = x.cuda().requires_grad_(), [w.cuda().requires_grad_() for w in ws]
    ys = torch.compile(fp8_linears, fullgraph=True)(xc, wc)
    torch.autograd.backward(ys, [dy.cuda() for dy in dys])
    refs = [_reference_linear(x, w, dy) for w, dy in zip(ws, dys)]
    for y, w, (y_ref, _, dw_ref) in zip(ys, wc, refs):
        assert _rel(y.detach().cpu(), y_ref) < FP8_TENSOR_CORES and _rel(w.grad.cpu(), dw_ref) < FP8_TENSOR_CORES
    assert _rel(xc.grad.cpu(), sum(r[1] for r in refs)) < FP8_TENSOR_CORES
    counts = [37, 0, 5, 141, 21]
    x, dys = torch.randn(sum(counts), 256), [torch.randn(sum(counts), 128) for _ in range(2)]
    ws = [torch.randn(5, 128, 256) * 0.05 for _ in range(2)]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32).cuda()
    rows = torch.repeat_interleave(torch.arange(5), torch.tensor(counts)).cuda()
    xc, wc = x.cuda().bfloat16().requires_grad_(), [w.cuda().bfloat16().requires_grad_() for w in ws]
    ys = torch.compile(lambda a, b: fp8_grouped_linears(a, b, offsets, rows), fullgraph=True)(xc, wc)
    torch.autograd.backward(ys, [dy.cuda().bfloat16() for dy in dys])
    refs = [_reference_grouped(x, w, counts, dy) for w, dy in zip(ws, dys)]
    for y, w, (y_ref, _, dw_ref) in zip(ys, wc, refs):  # bf16's error on top of FP8's, as above
        assert _rel(y.float().cpu(), y_ref) < 2e-2 and _rel(w.grad.float().cpu(), dw_ref) < 2e-2
        assert w.grad.is_contiguous()
    assert _rel(xc.grad.float().cpu(), sum(r[1] for r in refs)) < 2e-2
