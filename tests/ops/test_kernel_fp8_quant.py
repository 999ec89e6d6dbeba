"""FP8 training's quantisation kernels (`seekforge.ops.triton.fp8_quant`) bit for bit against the PyTorch references
(`seekforge.ops.quant`), whose rounding they reproduce: the same e4m3 bytes, the same fp32 scales.

Inputs spread over orders of magnitude row by row and column by column (so a tile's amax taken over the wrong
elements changes its scale), with exact zero tiles (scale 1), shapes with partial tiles and blocks, values that
land on e4m3 rounding ties after scaling, and -0.0 and negative values that round to zero (e4m3 -0, as the
reference's cast gives). Without CUDA the kernels run under Triton's interpreter.
"""

import pytest
import torch
from triton_setup import CUDA, DEVICE, HALF, patch_interpreter

triton = pytest.importorskip("triton")
patch_interpreter()

from seekforge.errors import ConfigError  # noqa: E402
from seekforge.ops import quant  # noqa: E402
from seekforge.ops.triton import fp8_quant  # noqa: E402

COUNTS = [37, 0, 5, 141, 21, 0]  # m = 204: an empty segment inside and at the end, one past a 128-row tile


def _input(m, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, m).unsqueeze(1) * torch.logspace(0, 1, k)
    x[:, 128:256] = 0  # whole zero tiles (where k > 128)
    ties = torch.tensor([448.0, 416.0, 17.0, -0.5625]) / 448 * 3.0  # e4m3 ties once divided by a scale 3 / 448
    if m and k > 6:
        x[0, :4] = ties
        x[0, 4] = 3.0  # this row tile's amax: scale 3 / 448
        x[0, 5:7] = torch.tensor([-0.0, -1e-6])  # e4m3 -0 both
    return x.to(dtype)


def _same(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.dtype == torch.float8_e4m3fn:
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    assert torch.equal(got.cpu(), want.cpu())


@pytest.mark.parametrize("m,k,dtype", [(204, 300, torch.float32), (7, 128, HALF), (1, 40, torch.float32)])
def test_tiles_match_the_reference_bit_for_bit(m, k, dtype):
    x = _input(m, k, 0, dtype)
    for got, want in zip(fp8_quant.quantise_tiles(x.to(DEVICE)), quant.quantise_tiles(x)):
        _same(got, want)


def test_tiles_read_a_strided_input():
    x = _input(300, 204, 1).t()  # [204, 300], columns contiguous
    for got, want in zip(fp8_quant.quantise_tiles(x.to(DEVICE)), quant.quantise_tiles(x)):
        _same(got, want)


@pytest.mark.parametrize("counts,k,cuts", [(COUNTS, 300, ()), ([130], 136, ()), ([0, 0], 64, ()),
                                           (COUNTS, 300, (128, 256)), ([130], 136, (128,))],
                         ids=["experts", "one-segment", "no-rows", "experts-joined", "one-segment-joined"])
def test_segments_give_both_tilings_bit_for_bit(counts, k, cuts):
    """x given whole, or as parts joined along k (the output gradients of weights joined along n), cut at `cuts`:
    each part quantised into its slice of the join."""
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    segment_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    x = _input(sum(counts), k, 2)
    want = quant.quantise_segments(x, offsets, segment_of_row)
    parts = [part.to(DEVICE) for part in x.tensor_split(list(cuts), dim=1)]
    got = fp8_quant.quantise_segments(parts if cuts else parts[0], offsets.to(DEVICE),
                                      quant.padded_tiles(sum(counts), len(counts)))
    for g, w in zip(got, want[:4]):
        _same(g, w)
    if cuts:
        with pytest.raises(ConfigError, match="each k but the last a multiple of 128"):
            fp8_quant.quantise_segments(parts[::-1], offsets.to(DEVICE), quant.padded_tiles(sum(counts), len(counts)))


@pytest.mark.skipif(CUDA, reason="emulates a Triton frontend's lowering under the interpreter")
def test_quantisation_does_not_depend_on_how_triton_lowers_unary_minus(monkeypatch):
    """Triton before triton-lang/triton#10270 (3.6 among them) lowers a float's `-x` to `0 - x`, so -(+0.0) is
    +0.0: the kernels must give e4m3 -0 for negative values that round to zero all the same."""
    semantic = getattr(pytest.importorskip("triton.language.semantic"), "TritonSemantic", None)
    if semantic is None:
        pytest.skip("this Triton has no TritonSemantic to patch")

    def minus_as_subtraction(self, x):
        zero = self.make_tensor(self.builder.get_null_value(x.type.scalar.to_ir(self.builder)), x.type.scalar)
        return self.sub(zero, x, True)

    monkeypatch.setattr(semantic, "minus", minus_as_subtraction)
    w = _input(130, 129, 3)  # blocks spanning rows five orders of magnitude apart: many -0
    assert (quant.quantise_blocks(w)[0].view(torch.uint8) == 0x80).sum() > 100
    for transposed in (False, True):
        for got, want in zip(fp8_quant.quantise_blocks(w, transposed),
                             quant.quantise_blocks(w.t() if transposed else w)):
            _same(got, want)


def test_segments_layout_against_a_hand_built_transpose():
    """The reference's layout itself: each segment's rows transposed into whole 128-row tiles, zero-padded, the
    tiles' scales the amax of 128 rows of one column."""
    counts = [3, 0, 130]
    offsets = torch.tensor(counts).cumsum(0)
    x = torch.arange(1.0, 134.0).unsqueeze(1) * torch.tensor([1.0, -2.0])  # [133, 2]: row r is (r + 1) * (1, -2)
    _, _, q_t, s_t, ends = quant.quantise_segments(x, offsets, torch.repeat_interleave(torch.arange(3),
                                                                                       torch.tensor(counts)))
    assert ends.tolist() == [128, 256, 512] and q_t.shape == (2, 512) and s_t.shape == (2, 4)
    amax = torch.tensor([[3.0, 1.0, 131.0, 133.0], [6.0, 1.0, 262.0, 266.0]])  # scale 1: the tile without rows
    assert torch.equal(s_t, torch.where(amax == 1.0, 1.0, amax / 448))
    dq = q_t.float() * s_t.repeat_interleave(128, dim=1)
    assert torch.equal(dq[:, 3:256], torch.zeros(2, 253))  # padding and the empty segment
    assert torch.allclose(dq[:, :3], x[:3].t(), rtol=1 / 16) and torch.allclose(dq[:, 256:386], x[3:].t(), rtol=1 / 16)


@pytest.mark.parametrize("shape", [(3, 200, 300), (130, 129)])
@pytest.mark.parametrize("transposed", [False, True])
def test_blocks_and_their_transpose_match_the_reference_bit_for_bit(shape, transposed):
    w = _input(shape[-2], shape[-1], 3)
    if len(shape) == 3:
        w = torch.stack([w * s for s in (1.0, 1e-3, 7.0)])
    want = quant.quantise_blocks(w.transpose(-2, -1) if transposed else w)
    got = fp8_quant.quantise_blocks(w.to(DEVICE), transposed)
    for g, wnt in zip(got, want):
        _same(g, wnt)
    assert got[0].is_contiguous()


@pytest.mark.parametrize("lead", [(), (3,)], ids=["linear", "experts"])
@pytest.mark.parametrize("transposed", [False, True])
def test_weights_of_one_input_quantise_into_their_slices_of_one_buffer(lead, transposed):
    """Several weights joined along n (each n but the last a multiple of 128): each weight's own blocks, bit for bit,
    in its slice of the joined quantisation (along the last dimension of the transposes)."""
    ws = [_input(n, 200, seed).expand(*lead, n, 200).clone() * 10.0 ** seed for seed, n in enumerate((256, 128, 72))]
    got = fp8_quant.quantise_blocks([w.to(DEVICE) for w in ws], transposed)
    wants = [quant.quantise_blocks(w.transpose(-2, -1) if transposed else w) for w in ws]
    dim = -1 if transposed else -2
    for g, parts in zip(got, zip(*wants)):
        _same(g, torch.cat(parts, dim))
    with pytest.raises(ConfigError, match="each n but the last a multiple of 128"):
        fp8_quant.quantise_blocks([w.to(DEVICE) for w in reversed(ws)])
    with pytest.raises(ConfigError, match="of one k and experts"):
        fp8_quant.quantise_blocks([ws[0].to(DEVICE), ws[1][..., :100].to(DEVICE)])


def test_errors():
    with pytest.raises(ConfigError, match="2-d bf16, fp16 or fp32"):
        fp8_quant.quantise_tiles(torch.zeros(2, 3, 4, device=DEVICE))
    with pytest.raises(ConfigError, match="offsets must be 1-d int32 or int64"):
        fp8_quant.quantise_segments(torch.zeros(4, 8, device=DEVICE), torch.tensor([4.0], device=DEVICE), 4)
    with pytest.raises(ConfigError, match=r"w \[n, k\] or \[experts, n, k\]"):
        fp8_quant.quantise_blocks(torch.zeros(8, device=DEVICE))


def test_ops_check_as_custom_ops():
    x = _input(40, 200, 4).to(DEVICE)
    w = _input(168, 200, 5).to(DEVICE).unsqueeze(0)
    offsets, tiles = torch.tensor([30, 40], dtype=torch.int32, device=DEVICE), quant.padded_tiles(40, 2)
    for op, args in ((fp8_quant.launch_quantise_tiles, (x,)),
                     (fp8_quant.launch_quantise_segments, ([x], offsets, tiles)),
                     (fp8_quant.launch_quantise_segments, ([x[:, :128], x[:, 128:]], offsets, tiles)),
                     (fp8_quant.launch_quantise_blocks, ([x.unsqueeze(0)], True)),
                     (fp8_quant.launch_quantise_blocks, ([w[:, :128], w[:, 128:]], False))):
        torch.library.opcheck(op, args, test_utils=("test_faketensor",))


@pytest.mark.skipif(not CUDA, reason="bf16 loads: the interpreter reads bf16 as raw bits")
def test_bf16_inputs_on_cuda():
    x = _input(204, 300, 5, torch.bfloat16)
    for got, want in zip(fp8_quant.quantise_tiles(x.to(DEVICE)), quant.quantise_tiles(x)):
        _same(got, want)


@pytest.mark.skipif(not CUDA, reason="the references on another device than the CPU")
def test_the_references_give_the_cpus_bits_on_cuda():
    """The references round as on the CPU when they run on CUDA (amax / 448 correctly rounded, where a Python scalar
    divisor would run as a multiply by its rounded reciprocal), so a reference run beside the kernels on the GPU, as
    bench/fp8.py's gates run it, checks them bit for bit."""
    x, w = _input(204, 300, 7), _input(300, 260, 8)
    for got, want in ((quant.quantise_tiles(x.to(DEVICE)), quant.quantise_tiles(x)),
                      (quant.quantise_blocks(w.to(DEVICE)), quant.quantise_blocks(w))):
        for g, r in zip(got, want):
            _same(g, r)


def test_fp8_linear_and_experts_through_the_quantisation_kernels_equal_the_reference_path():
    """`fp8_linear` and `fp8_grouped_linear` (forward, both gradients) with the quantisation's kernels (op
    "fp8_quant") against the same functions with its references: bit-exact quantisation, so equal results (the GEMMs
    run their reference on the CPU either way); and so `fp8_linears` and `fp8_grouped_linears` of weights joined
    along n, the kernel writing each weight's blocks into its slice."""
    from seekforge import ops
    from seekforge.fp8.gemm import fp8_grouped_linear, fp8_grouped_linears, fp8_linear, fp8_linears

    torch.manual_seed(6)
    counts = [37, 0, 5, 141, 21]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    rows = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    x = torch.randn(sum(counts), 200) * torch.logspace(-1, 1, sum(counts)).unsqueeze(1)
    cases = ((lambda a, b: [fp8_linear(a, b[0])], [torch.randn(136, 200) * 0.05]),
             (lambda a, b: [fp8_grouped_linear(a, b[0], offsets, rows)], [torch.randn(len(counts), 136, 200) * 0.05]),
             (fp8_linears, [torch.randn(128, 200) * 0.05, torch.randn(72, 200) * 0.05]),
             (lambda a, b: fp8_grouped_linears(a, b, offsets, rows),
              [torch.randn(len(counts), 128, 200) * 0.05, torch.randn(len(counts), 128, 200) * 0.05]))
    results = []
    for kind in ("torch", "triton"):
        out = []
        with ops.backend(kind, ops=["fp8_quant"]), ops.backend("torch", ops=["fp8_grouped"]):
            for fn, ws in cases:
                xd, wd = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws]
                ys = fn(xd, wd)
                torch.autograd.backward(ys, [torch.ones_like(y).normal_(generator=torch.Generator().manual_seed(i))
                                             for i, y in enumerate(ys)])
                out += [*(y.detach() for y in ys), xd.grad, *(w.grad for w in wd)]
        results.append(out)
    for got, want in zip(*results):
        assert torch.equal(got, want)
