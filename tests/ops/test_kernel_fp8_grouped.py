"""The FP8 expert GEMMs of training (`seekforge.ops.triton.fp8_grouped`) against dequantise-and-multiply in fp64 (each
e4m3 value times its own tile's or block's scale, written here), and `fp8_grouped_linear` through them against its
reference path (`ops.backend("torch")`): the forward and both gradients.

The scales spread over three orders of magnitude, so a scale read from the wrong tile, block, expert or row tile
shows as a large error. Rows: several experts, one without rows, counts that are multiples of nothing, an expert
past one 128-row tile; n and k past one block with partial last blocks.

Without CUDA the kernels run under Triton's interpreter (tests/triton_setup.py).
"""

import pytest
import torch
from triton_setup import CUDA, DEVICE, patch_interpreter

triton = pytest.importorskip("triton")
patch_interpreter()

from seekforge import ops  # noqa: E402
from seekforge.errors import ConfigError  # noqa: E402
from seekforge.fp8.gemm import fp8_grouped_linear, fp8_grouped_linears  # noqa: E402
from seekforge.ops.triton import fp8_grouped  # noqa: E402

FP8 = torch.float8_e4m3fn
COUNTS = [37, 0, 5, 141, 21]  # m = 204
N, K = 200, 320


def _e4m3(shape, g):
    return (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(FP8)


def _scales(shape, g):
    return torch.rand(shape, generator=g) * 1e-2 + 1e-5


def _problem(seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(COUNTS)
    offsets = counts.cumsum(0).to(torch.int32)
    expert_of_row = torch.repeat_interleave(torch.arange(len(COUNTS)), counts)
    return g, offsets, expert_of_row


def _segments():
    start = 0
    for e, count in enumerate(COUNTS):
        yield e, slice(start, start + count)
        start += count


def _tiles(q, scale):
    """q [m, c] times the scale of its row's 1x128 tile, fp64."""
    return q.double() * scale.double()[:, torch.arange(q.shape[1]) // 128]


def _blocks(q, scale):
    """q [n, k] times its 128x128 block's scale, fp64."""
    n, k = q.shape
    return q.double() * scale.double()[torch.arange(n) // 128][:, torch.arange(k) // 128]


def _dev(*tensors):
    return [t.to(DEVICE) for t in tensors]


# Hopper's FP8 MMA sums a 128-wide k step keeping about 14 bits (DeepSeek-V3, section 3.3.2; tests/fp8 measures
# 1.3e-4 relative on an H100) before the scaled fp32 accumulation; the interpreter multiplies in fp32. A scale
# taken from a wrong tile or block is off by orders of magnitude.
TOLERANCE = 1e-3 if CUDA else 1e-5


def _assert_close(got, want):
    got = got.double().cpu()
    assert float((got - want).norm() / want.norm()) < TOLERANCE


@pytest.mark.parametrize("tile", [None, (16, 64, 4, 2), (32, 256, 4, 2)], ids=["tuned", "64-wide", "256-wide"])
def test_forward_against_dequantised_operands(tile):
    g, offsets, _ = _problem(0)
    m = sum(COUNTS)
    a, a_s = _e4m3((m, K), g), _scales((m, 3), g)
    w, w_s = _e4m3((len(COUNTS), N, K), g), _scales((len(COUNTS), 2, 3), g)
    out = fp8_grouped.fp8_grouped_mm(*_dev(a, a_s, w, w_s, offsets), torch.float32, tile=tile)
    want = torch.zeros(m, N, dtype=torch.float64)
    for e, rows in _segments():
        want[rows] = _tiles(a[rows], a_s[rows]) @ _blocks(w[e], w_s[e]).t()
    assert out.shape == (m, N) and out.dtype == torch.float32
    _assert_close(out, want)


def test_input_gradient_through_the_forward_kernel_on_the_transposed_blocks():
    """dx = dy W_e is the forward's product with W's transpose (as `quantise_blocks(w, transposed=True)` lays it
    out: [experts, k, n], the transposed scale grid)."""
    g, offsets, _ = _problem(1)
    m = sum(COUNTS)
    dy, dy_s = _e4m3((m, N), g), _scales((m, 2), g)
    w, w_s = _e4m3((len(COUNTS), N, K), g), _scales((len(COUNTS), 2, 3), g)
    w_t, w_ts = w.transpose(1, 2).contiguous(), w_s.transpose(1, 2).contiguous()
    out = fp8_grouped.fp8_grouped_mm(*_dev(dy, dy_s, w_t, w_ts, offsets), torch.float32, tile=(32, 64, 4, 2))
    want = torch.zeros(m, K, dtype=torch.float64)
    for e, rows in _segments():
        want[rows] = _tiles(dy[rows], dy_s[rows]) @ _blocks(w[e], w_s[e])
    _assert_close(out, want)


def _tile_of_row():
    """Each row's 128x1 tile: 128 consecutive rows of one expert, restarting at each expert; and the tiles."""
    tiles, first = [], 0
    for count in COUNTS:
        tiles += [first + r // 128 for r in range(count)]
        first += -(-count // 128)
    return torch.tensor(tiles), first


def _padded_transpose(q, scale, tile_of_row):
    """q [m, c] e4m3 with 128x1 tile scales [tiles, c] -> its transpose with each expert's rows in a zero-padded
    segment of whole 128-row tiles (at least one), the scales [c, padded rows / 128], the segments' ends."""
    rows_out, scales, ends = [], [], []
    for _, rows in _segments():
        count = rows.stop - rows.start
        padded = max(-(-count // 128), 1) * 128
        zeros = torch.zeros(padded - count, q.shape[1], dtype=torch.uint8)  # e4m3's zero is the byte 0
        rows_out.append(torch.cat([q[rows].view(torch.uint8), zeros]))
        first = tile_of_row[rows.start].item() if count else 0
        scales.append(scale[first:first + padded // 128] if count else torch.ones(1, q.shape[1]))
        ends.append(padded + (ends[-1] if ends else 0))
    return (torch.cat(rows_out).view(FP8).t().contiguous(), torch.cat(scales).t().contiguous(),
            torch.tensor(ends, dtype=torch.int32))


def test_weight_gradient_scales_each_experts_own_row_tiles():
    g, offsets, _ = _problem(2)
    m = sum(COUNTS)
    tile_of_row, n_tiles = _tile_of_row()
    dy, dy_s = _e4m3((m, N), g), _scales((n_tiles, N), g)
    x, x_s = _e4m3((m, K), g), _scales((n_tiles, K), g)
    dy_t, dy_ts, ends = _padded_transpose(dy, dy_s, tile_of_row)
    x_t, x_ts, _ = _padded_transpose(x, x_s, tile_of_row)
    out = fp8_grouped.fp8_grouped_weight_gradient(*_dev(dy_t, dy_ts, x_t, x_ts, ends), torch.float32)
    dy_dq = dy.double() * dy_s.double()[tile_of_row]  # row r, column c: times its tile's scale of column c
    x_dq = x.double() * x_s.double()[tile_of_row]
    want = torch.stack([dy_dq[rows].t() @ x_dq[rows] for _, rows in _segments()])
    assert out.shape == (len(COUNTS), N, K)
    _assert_close(out, want)
    assert torch.equal(out[1].cpu(), torch.zeros(N, K))  # the expert without rows


@pytest.mark.parametrize("n,k", [(N, K), (24, 40)], ids=["past-one-block", "under-one-block"])
def test_grouped_linear_through_the_kernels_matches_its_reference_path(n, k):
    """Forward and both gradients of `fp8_grouped_linear` with the kernels (backend "triton") against the same
    function's dequantise-and-fp32 path (backend "torch", on the CPU), with the quantisation's kernels too."""
    _, offsets, expert_of_row = _problem(3)
    torch.manual_seed(3)
    x = torch.randn(sum(COUNTS), k) * torch.logspace(-1, 1, sum(COUNTS)).unsqueeze(1)
    w = torch.randn(len(COUNTS), n, k) * 0.05
    dy = torch.randn(sum(COUNTS), n)
    results = []
    for kind, device in (("torch", torch.device("cpu")), ("triton", DEVICE)):
        xd, wd = x.to(device, copy=True).requires_grad_(), w.to(device, copy=True).requires_grad_()
        with ops.backend(kind, ops=["fp8_grouped", "fp8_quant"]):
            y = fp8_grouped_linear(xd, wd, offsets.to(device), expert_of_row.to(device))
            y.backward(dy.to(device))
        results.append((y.detach().cpu(), xd.grad.cpu(), wd.grad.cpu()))
    for got, want in zip(results[1], results[0]):
        assert got.dtype == torch.float32
        _assert_close(got, want.double())
    assert torch.equal(results[1][2][1], torch.zeros(n, k))


def test_weight_gradient_of_weights_joined_along_n_writes_each_weights_own():
    """dy of two weights joined along n: `parts=2` gives each weight's gradient in a tensor of its own, bit for bit the
    halves of the joined gradient."""
    g, _, _ = _problem(6)
    m = sum(COUNTS)
    tile_of_row, n_tiles = _tile_of_row()
    dy, dy_s = _e4m3((m, 256), g), _scales((n_tiles, 256), g)
    x, x_s = _e4m3((m, K), g), _scales((n_tiles, K), g)
    dy_t, dy_ts, ends = _padded_transpose(dy, dy_s, tile_of_row)
    x_t, x_ts, _ = _padded_transpose(x, x_s, tile_of_row)
    whole = fp8_grouped.fp8_grouped_weight_gradient(*_dev(dy_t, dy_ts, x_t, x_ts, ends), torch.float32)
    parts = fp8_grouped.fp8_grouped_weight_gradient(*_dev(dy_t, dy_ts, x_t, x_ts, ends), torch.float32, 2)
    assert parts.shape == (2, len(COUNTS), 128, K) and parts.is_contiguous()
    assert torch.equal(parts[0], whole[:, :128]) and torch.equal(parts[1], whole[:, 128:])
    with pytest.raises(ConfigError, match="parts must divide"):
        fp8_grouped.fp8_grouped_weight_gradient(*_dev(dy_t, dy_ts, x_t, x_ts, ends), torch.float32, 3)


def test_grouped_linears_through_the_kernels_are_each_weights_own_gemms():
    """`fp8_grouped_linears` of a SwiGLU's w1 and w3 (one out, a multiple of 128) through the kernels: one GEMM a pass
    over the joined weights, the outputs and weight gradients bit for bit `fp8_grouped_linear`'s per weight, dx
    (one fp32 accumulation over both) within fp32 rounding of their sum; and within the reference path's."""
    _, offsets, expert_of_row = _problem(7)
    torch.manual_seed(7)
    x = torch.randn(sum(COUNTS), K) * torch.logspace(-1, 1, sum(COUNTS)).unsqueeze(1)
    ws = [torch.randn(len(COUNTS), 128, K) * 0.05 for _ in range(2)]
    dys = [torch.randn(sum(COUNTS), 128) for _ in ws]
    results = []
    for kind, device, together in (("triton", DEVICE, True), ("triton", DEVICE, False), ("torch", "cpu", True)):
        xd, wd = x.to(device, copy=True).requires_grad_(), [w.to(device, copy=True).requires_grad_() for w in ws]
        off, rows = offsets.to(device), expert_of_row.to(device)
        with ops.backend(kind, ops=["fp8_grouped", "fp8_quant"]):
            ys = (fp8_grouped_linears(xd, wd, off, rows) if together
                  else [fp8_grouped_linear(xd, w, off, rows) for w in wd])
            torch.autograd.backward(ys, [dy.to(device) for dy in dys])
        results.append([t.detach().cpu() for t in (*ys, xd.grad, *(w.grad for w in wd))])
    (y1, y3, dx, dw1, dw3), one, reference = results
    for got, want in zip((y1, y3, dw1, dw3), (*one[:2], *one[3:])):
        assert torch.equal(got, want)
    _assert_close(dx, one[2].double())
    for got, want in zip(results[0], reference):
        _assert_close(got, want.double())


def test_errors():
    g, offsets, _ = _problem(4)
    a, a_s = _e4m3((204, K), g), _scales((204, 3), g)
    w, w_s = _e4m3((len(COUNTS), N, K), g), _scales((len(COUNTS), 2, 3), g)
    with pytest.raises(ConfigError, match="float8_e4m3fn"):
        fp8_grouped.fp8_grouped_mm(a.float(), a_s, w, w_s, offsets, torch.float32)
    with pytest.raises(ConfigError, match="ceil"):
        fp8_grouped.fp8_grouped_mm(a, a_s, w.transpose(1, 2), w_s.transpose(1, 2), offsets, torch.float32)
    with pytest.raises(ConfigError, match="offsets must be"):
        fp8_grouped.fp8_grouped_mm(a, a_s, w, w_s, offsets[:3], torch.float32)
    with pytest.raises(ConfigError, match="BLOCK_M and BLOCK_N powers of 2"):
        fp8_grouped.fp8_grouped_mm(a, a_s, w, w_s, offsets, torch.float32, tile=(16, 96, 4, 2))
    with pytest.raises(ConfigError, match="a multiple of 128"):  # rows not in whole tiles
        fp8_grouped.fp8_grouped_weight_gradient(a.t(), a_s, a.t(), a_s, offsets, torch.float32)


def test_ops_check_and_compile_as_one_graph():
    g, offsets, expert_of_row = _problem(5)
    m = sum(COUNTS)
    a, a_s, w, w_s, dy_t, dy_s, x_t, x_s, ends, offsets, expert_of_row = _dev(
        _e4m3((m, K), g), _scales((m, 3), g), _e4m3((len(COUNTS), N, K), g), _scales((len(COUNTS), 2, 3), g),
        _e4m3((N, 768), g), _scales((N, 6), g), _e4m3((K, 768), g), _scales((K, 6), g),
        torch.tensor([128, 128, 256, 512, 768], dtype=torch.int32), offsets, expert_of_row)
    torch.library.opcheck(fp8_grouped.launch_grouped_mm, (a, a_s, w, w_s, offsets, torch.float32, [16, 128, 4, 2]),
                          test_utils=("test_faketensor",))
    for parts in (1, 2):
        torch.library.opcheck(fp8_grouped.launch_grouped_weight_gradient,
                              (dy_t, dy_s, x_t, x_s, ends, torch.float32, parts), test_utils=("test_faketensor",))

    def forward(x, w1, w3):  # a SwiGLU's w1 and w3 (n = 256: joined), and one weight
        gate, up = fp8_grouped_linears(x, (w1, w3), offsets, expert_of_row)
        return gate * up + fp8_grouped_linear(x, w1, offsets, expert_of_row)

    x0 = torch.randn(m, K, device=DEVICE)
    ws0 = [torch.randn(len(COUNTS), 256, K, device=DEVICE) * 0.05 for _ in range(2)]
    dy = torch.randn(m, 256, device=DEVICE)
    # inductor on the CPU would compile C++: there dynamo's graph and AOTAutograd's backward alone show that the ops
    # stay in one graph (fullgraph) both ways
    compiled = torch.compile(forward, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    results = []
    with ops.backend("triton", ops=["fp8_grouped", "fp8_quant"]):
        for fn in (compiled, forward):
            x, ws = x0.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws0]
            y = fn(x, *ws)
            y.backward(dy)
            results.append((y.detach(), x.grad, *(w.grad for w in ws)))
    for got, want in zip(*results):
        _assert_close(got, want.double().cpu())
