"""The FP8 GEMV (`seekforge.ops.triton.gemv.fp8_gemv`) and `ops.fp8_linear` against the weight dequantised by hand
(each e4m3 value times its 128x128 block's scale) then F.linear.

Without CUDA the kernel runs under Triton's interpreter (tests/triton_setup.py), with fp16 standing in for bf16.
"""

import pytest
import torch
import torch.nn.functional as F
from triton_setup import CUDA, DEVICE, HALF, patch_interpreter

triton = pytest.importorskip("triton")
patch_interpreter()

from seekforge import ops  # noqa: E402
from seekforge.errors import ConfigError  # noqa: E402
from seekforge.ops.triton import gemv as gemv_module  # noqa: E402
from seekforge.ops.triton import tuning  # noqa: E402
from seekforge.model.norm import RMSNorm  # noqa: E402
from seekforge.ops.triton.gemv import fp8_gemv, fp8_norm_gemv  # noqa: E402
from seekforge.ops.triton.tuning import FP8_TILES, GemvConfig  # noqa: E402

FP8 = torch.float8_e4m3fn


def fp8_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 values and block scales spread over two orders of magnitude, so a wrong block's scale shows."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(FP8)
    scale = torch.rand(-(-n // 128), -(-k // 128), generator=g) * 1e-2 + 1e-4
    return q.to(DEVICE), scale.to(DEVICE)


def by_hand(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Element (i, j) times the scale of block (i // 128, j // 128), in fp32."""
    n, k = q.shape
    rows, cols = torch.arange(n, device=q.device) // 128, torch.arange(k, device=q.device) // 128
    return q.float() * scale[rows][:, cols]


@pytest.mark.parametrize("n, k, lead, dtype", [(130, 300, (1,), torch.float32), (128, 256, (4,), HALF),
                                               (5, 130, (1, 3), HALF), (131, 72, (2,), torch.float32),
                                               (3, 1, (1,), HALF)], ids=str)
def test_matches_the_weight_dequantised_by_hand(n, k, lead, dtype):
    """Shapes that are not multiples of 128 (partial blocks at both edges) and the tuner's untimed tile, whose K
    slice (up to 2048 wide) spans several blocks."""
    q, scale = fp8_weight(n, k, seed=n + k)
    x = torch.randn(*lead, k, device=DEVICE).to(dtype)
    got = fp8_gemv(x, q, scale)
    want = F.linear(x.float(), by_hand(q, scale))
    assert got.shape == (*lead, n) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("tile", [GemvConfig(16, 32, 1), GemvConfig(8, 256, 2)], ids=str)
def test_every_slice_width_takes_its_blocks_scales(tile):
    """K slices narrower than a block (several slices per block) and wider (several blocks per slice)."""
    q, scale = fp8_weight(150, 300, seed=1)
    x = torch.randn(3, 300, device=DEVICE)
    want = F.linear(x, by_hand(q, scale))
    torch.testing.assert_close(fp8_gemv(x, q, scale, tile), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("i, tile", list(enumerate(FP8_TILES)), ids=str)
def test_every_fp8_tuning_candidate_matches(i, tile):
    """Each tile the tuning may pick for e4m3 weights, at 1 to 4 rows of x, over two 128-row blocks and several K
    slices (K not a multiple of the slice nor of 128; slices clipped to 256 wide, so the interpreter's time stays
    short): each chunk of a slice takes its own block's scale."""
    rows = i % 4 + 1
    q, scale = fp8_weight(136, 552, seed=i)
    x = torch.randn(rows, 552, device=DEVICE)
    small = GemvConfig(tile.block_n, min(tile.block_k, 256), tile.num_warps)
    want = F.linear(x, by_hand(q, scale))
    torch.testing.assert_close(fp8_gemv(x, q, scale, small), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


def test_fp8_weights_tune_among_their_own_tiles():
    """On a shape's first call (the GPU's path, here with a stand-in clock) the FP8 GEMV times the e4m3 tiles,
    clipped to K, not the 16-bit ones, and so does the FP8 MoE's GEMV form for both its kernels."""
    from seekforge.ops.triton.moe import fused_experts

    pruned = {}

    def prune(kernel, key, tiles):
        pruned[kernel] = [(t.kwargs["BLOCK_N"], t.kwargs["BLOCK_K"], t.num_warps) for t in tiles]
        return tiles[:1]  # one tile timed keeps the interpreter's time short

    def fitting(k: int) -> list:
        return list(dict.fromkeys((t.block_n, min(t.block_k, k), t.num_warps) for t in FP8_TILES))

    q, scale = fp8_weight(40, 200, seed=5)
    x = torch.randn(1, 200, device=DEVICE, dtype=HALF)
    g = torch.Generator().manual_seed(0)
    experts = [(torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(FP8).to(DEVICE)
               for shape in ((4, 72, 200), (4, 200, 72), (4, 72, 200))]
    scales = [torch.rand(4, -(-shape[1] // 128), -(-shape[2] // 128)).to(DEVICE) * 1e-2 for shape in
              ((4, 72, 200), (4, 200, 72), (4, 72, 200))]
    indices = torch.tensor([[0, 2]], device=DEVICE)
    with tuning.tuning(timed=True, tile_clock=lambda call, quantiles: call() or [1.0] * len(quantiles),
                       prune=prune):
        fp8_gemv(x, q, scale)
        fused_experts(x, *experts, torch.ones(1, 2, device=DEVICE), indices, rows=True, scales=tuple(scales))
    assert pruned == {"fp8_gemv": fitting(256), "gate_up_rows": fitting(256), "down_rows": fitting(128)}


def _norm(k: int, dtype: torch.dtype) -> RMSNorm:
    norm = RMSNorm(k).to(DEVICE, dtype).requires_grad_(False)
    norm.weight.uniform_(0.5, 1.5)
    return norm


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_fp8_norm_gemv_is_the_model_norm_then_both_projections(rows):
    """A block's input norm and MLA's two FP8 input projections in one launch: the model's RMSNorm (its rounding to
    the 16-bit dtype included) then each weight dequantised by hand; K and both N not multiples of 128."""
    qa, sa = fp8_weight(130, 300, seed=rows)
    qb, sb = fp8_weight(40, 300, seed=rows + 10)
    x = (torch.randn(1, rows, 300, device=DEVICE) * 3).to(HALF)
    norm = _norm(300, HALF)
    ya, yb = fp8_norm_gemv(x, norm.weight, norm.eps, qa, sa, qb, sb)
    h = norm(x).float()
    for got, q, scale in ((ya, qa, sa), (yb, qb, sb)):
        want = F.linear(h, by_hand(q, scale))
        assert got.shape == want.shape and got.dtype == HALF
        torch.testing.assert_close(got.float(), want, atol=2e-3 * want.abs().max().item(), rtol=2e-3)


def test_normed_projections_take_the_fused_fp8_kernel_for_few_rows(monkeypatch):
    """`ops.normed_projections` with FP8 weights' scales: the fused kernel under Triton, the norm then `fp8_linear`
    twice under the PyTorch backend (dequantised into x's dtype), which agree."""
    calls = []
    monkeypatch.setattr(gemv_module, "fp8_norm_gemv", lambda *a: calls.append(a) or fp8_norm_gemv(*a))
    qa, sa = fp8_weight(136, 256, seed=7)
    qb, sb = fp8_weight(64, 256, seed=8)
    x = torch.randn(1, 2, 256, device=DEVICE, dtype=HALF)
    norm = _norm(256, HALF)
    with torch.no_grad():
        with ops.backend("triton"):
            fused = ops.normed_projections(x, norm, qa, qb, scales=(sa, sb))
        with ops.backend("torch"):
            reference = ops.normed_projections(x, norm, qa, qb, scales=(sa, sb))
    assert len(calls) == 1
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got.float(), want.float(), atol=3e-3 * want.abs().max().item(), rtol=3e-3)


def test_fp8_norm_gemv_checks_its_inputs():
    qa, sa = fp8_weight(8, 16)
    norm = _norm(16, HALF)
    with pytest.raises(ConfigError, match="fp8_norm_gemv wants"):
        fp8_norm_gemv(torch.randn(1, 16, device=DEVICE, dtype=HALF), norm.weight, norm.eps, qa, sa, qa, sa[:, :0])
    with pytest.raises(ConfigError, match="fp8_norm_gemv wants"):
        fp8_norm_gemv(torch.randn(5, 16, device=DEVICE, dtype=HALF), norm.weight, norm.eps, qa, sa, qa, sa)


def test_bad_inputs_name_the_problem():
    q, scale = fp8_weight(8, 16)
    x = torch.randn(1, 16, device=DEVICE)
    with pytest.raises(ConfigError, match="at most 4 rows"):
        fp8_gemv(torch.randn(5, 16, device=DEVICE), q, scale)
    with pytest.raises(ConfigError, match="float8_e4m3fn"):
        fp8_gemv(x, q.float(), scale)
    with pytest.raises(ConfigError, match="fp32 scale"):
        fp8_gemv(x, q, scale[:, :0])
    with pytest.raises(ConfigError, match="block_n must divide 128"):
        fp8_gemv(x, q, scale, GemvConfig(3, 16, 1))


def test_op_checks_and_compiles_as_one_graph():
    q, scale = fp8_weight(40, 200)
    x = torch.randn(2, 200, device=DEVICE, dtype=HALF)
    torch.library.opcheck(gemv_module.launch_fp8_gemv, (x, q, scale, None), test_utils=("test_faketensor",))
    compiled = torch.compile(fp8_gemv, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x, q, scale), fp8_gemv(x, q, scale), atol=0, rtol=0)
    norm = _norm(200, HALF)
    torch.library.opcheck(gemv_module.launch_fp8_norm_gemv, (x, norm.weight, norm.eps, q, scale, q[:8], scale[:1]),
                          test_utils=("test_faketensor",))


@pytest.mark.parametrize("rows, routed", [(1, True), (4, True), (5, False)])
def test_fp8_linear_takes_the_gemv_for_few_rows_and_the_fp8_gemm_past_them(rows, routed, monkeypatch):
    """Past GEMV_ROWS the blockwise FP8 GEMM on x quantised in 1x128 tiles (tests/ops/test_kernel_fp8_weight_gemms.py
    checks it): the exact x's product within e4m3's rounding of x."""
    calls = []  # a spy on the kernel
    monkeypatch.setattr(gemv_module, "fp8_gemv", lambda x, w, s: calls.append(x.shape) or fp8_gemv(x, w, s))
    q, scale = fp8_weight(130, 200, seed=2)
    x = torch.randn(1, rows, 200, device=DEVICE, dtype=HALF)
    want = F.linear(x.float(), by_hand(q, scale))
    with torch.no_grad(), ops.backend("triton"):
        got = ops.fp8_linear(x, q, scale)
    assert len(calls) == (1 if routed else 0)
    tol = 3e-3 if routed else 2 ** -4
    torch.testing.assert_close(got.float(), want, atol=tol * want.abs().max().item(), rtol=tol)


def test_fp8_linear_reference_is_dequantise_then_linear_exactly():
    """The reference (any device, and many rows): the weight dequantised into x's dtype, then F.linear."""
    q, scale = fp8_weight(300, 260, seed=3)
    x = torch.randn(7, 260, device=DEVICE)
    with ops.backend("torch"):
        got = ops.fp8_linear(x, q, scale)
        half = ops.fp8_linear(x.to(HALF), q, scale)
    torch.testing.assert_close(got, F.linear(x, by_hand(q, scale)), atol=0, rtol=0)
    torch.testing.assert_close(half, F.linear(x.to(HALF), by_hand(q, scale).to(HALF)), atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="16b shapes in bf16")
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("n, k", [(3072, 2048), (576, 2048), (2048, 2048), (10944, 2048), (2048, 10944)])
def test_16b_projections_bf16(rows, n, k):
    q, scale = fp8_weight(n, k, seed=rows)
    x = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16)
    want = F.linear(x.float(), by_hand(q, scale))
    torch.testing.assert_close(fp8_gemv(x, q, scale).float(), want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_engine_with_fp8_weights_runs_the_fp8_kernels(compiled):
    """The engine's Triton paths (on the CPU under the interpreter), eager and compiled, over a model with FP8
    weights: decode's projections run the FP8 GEMV and its MoE blocks the fused experts over the FP8 weights
    (compiled: inside the compiled blocks, with no graph break), and the teacher-forced logits are those of the
    PyTorch reference (the weights dequantised into the 16-bit dtype, then F.linear and the model's experts) within
    e4m3's rounding of the prefill's inputs (its 5 and 6 rows take the FP8 GEMM, x in 1x128 tiles:
    tests/ops/test_kernel_fp8_weight_gemms.py) and the 16-bit dtype's: fp16 on the CPU, bf16 on CUDA, where the
    decode steps are replayed from CUDA graphs too."""
    from torch._dynamo.utils import counters

    from seekforge import LLM, SamplingParams
    from seekforge.engine.parity import forced_logits, logit_error
    from seekforge.model import ModelConfig, Transformer
    from seekforge.model.fp8_weights import to_fp8_weights

    cfg = ModelConfig.preset("tiny").replace(n_mtp_modules=0, n_layers=2)
    torch.manual_seed(0)
    model = to_fp8_weights(Transformer(cfg).to(DEVICE, HALF).eval())
    prompts = [torch.randint(2, cfg.vocab_size, (n,)).tolist() for n in (5, 6)]
    plain = LLM(model, max_num_seqs=2, max_model_len=64, kernels="torch")
    tokens = [o.token_ids for o in plain.generate(prompts, SamplingParams(temperature=0, max_tokens=2,
                                                                            ignore_eos=True))]
    want = forced_logits(plain, prompts, tokens)
    counters.clear()
    llm = LLM(model, max_num_seqs=2, max_model_len=64, compile=compiled, kernels="triton")
    with torch.profiler.profile() as prof:
        got = forced_logits(llm, prompts, tokens)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("seekforge::fp8_norm_gemv", 0) >= cfg.n_layers  # the input norm with wq and wkv_a
    assert counts.get("seekforge::fp8_gemv", 0) >= cfg.n_layers  # wo, the dense and the unjoined shared SwiGLUs
    assert counts.get("seekforge::fused_moe", 0) >= 2 * (cfg.n_layers - cfg.n_dense_layers)
    assert not counters["graph_break"]
    runs = [got]
    if CUDA:  # the decode steps replayed from CUDA graphs
        runs.append(forced_logits(LLM(model, max_num_seqs=2, max_model_len=64, compile=compiled, kernels="triton",
                                      cuda_graphs=True), prompts, tokens))
    for run in runs:
        error = logit_error(want, run)
        assert error.max() < 2 ** -4, error  # measured on the CPU: 0.033
        assert (run.argmax(-1) == want.argmax(-1)).float().mean() >= (0.75 if CUDA else 1.0)


def test_the_gemvs_read_weights_and_scales_in_rows_apart_in_place():
    """FP8 weights and their scales are views of storage padded for the blockwise GEMM (`pad_weight`: k to a multiple
    of 512, so rows lie further apart than k): both GEMVs read them where they lie, copying no more than for
    contiguous ones (the interpreter copies its own), with the storage past each row holding other values, which
    must not be read, and agree with them bit for bit."""
    n, k, kp = 136, 200, 512
    q, scale = fp8_weight(n, kp, seed=9)  # the weight and its scales, then values past their k
    x = torch.randn(3, k, device=DEVICE, dtype=HALF)
    norm = _norm(k, HALF)
    results, copies = [], []
    for w, s in ((q[:, :k], scale[:, :2]), (q[:, :k].contiguous(), scale[:, :2].contiguous())):
        with torch.profiler.profile() as prof:
            results.append((fp8_gemv(x, w, s), *fp8_norm_gemv(x, norm.weight, norm.eps, w, s, w[:64], s[:1])))
        copies.append({e.key: e.count for e in prof.key_averages()}.get("aten::copy_", 0))
    assert q[:, :k].stride(0) == kp and copies[0] == copies[1]
    for got, want in zip(*results):
        assert torch.equal(got, want)
    want = F.linear(x.float(), by_hand(q[:, :k], scale[:, :2]))
    torch.testing.assert_close(results[0][0].float(), want, atol=3e-3 * want.abs().max().item(), rtol=3e-3)
