"""FP8 weights (`seekforge.model.fp8_weights`) past the GEMV's rows: the input quantised in 1x128 tiles and the blockwise
FP8 GEMMs (`seekforge.ops.blockwise_mm`: torch._scaled_mm for the dense projections, the Triton grouped GEMM for the
routed experts) against the e4m3 weights and block scales as stored.

Each is checked twice: against the input and the weights quantised and dequantised by hand (the GEMM's own
numerics, where a scale read from a wrong tile or block shows), and against the dequantising reference
(`ops.backend("torch")`: the exact input times the weights dequantised) within e4m3's rounding of the input.
Shapes are not multiples of 128. Then the engine's prefill logits over an FP8 model through these GEMMs against the
engine on the reference. On a CPU the kernels run under Triton's interpreter and the dense GEMM is its fp32
reference (`reference_mm`); on CUDA the same tests run torch._scaled_mm.
"""

import pytest
import torch
import torch.nn.functional as F
from fp8_checkpoint import FP8, dequantise_by_hand
from scaled_mm_torch_2_11 import scaled_mm_as_torch_2_11
from triton_setup import CUDA, DEVICE, HALF, patch_interpreter

triton = pytest.importorskip("triton")
patch_interpreter()

from seekforge import ops  # noqa: E402
from seekforge.model.fp8_weights import FP8WeightLinear, _convert_experts  # noqa: E402
from seekforge.model.moe import Experts  # noqa: E402
from seekforge.ops import blockwise_mm  # noqa: E402
from seekforge.ops.quant import cdiv  # noqa: E402

# e4m3 keeps 3 mantissa bits: rounding x moves each element by at most 2^-4 of itself, so the product's norm-wise
# error against the exact x stays below that (the elements' errors are independent); the experts' second GEMM
# rounds its input (the SwiGLU of the first two's) again: twice that.
INPUT_ROUNDING = 2 ** -4
# Hopper's FP8 MMA sums a 128-wide k step keeping about 14 bits (tests/fp8 measures 1.3e-4 relative on an H100);
# the CPU multiplies in fp32. Both then round to the output's dtype.
ACCUMULATION = {torch.float32: 1e-3 if CUDA else 1e-5, HALF: 1e-2 if CUDA else 2e-3}


def _tiles_by_hand(x: torch.Tensor) -> torch.Tensor:
    """x [m, k] rounded through e4m3 in 1x128 tiles, fp32: each tile's scale = amax / 448 (1 for zeros), its values
    x / scale in e4m3, times the scale."""
    m, k = x.shape
    tiles = F.pad(x.float(), (0, -k % 128)).view(m, -1, 128)
    amax = tiles.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    return ((tiles / scale).to(FP8).float() * scale).flatten(1)[:, :k]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("lead, n, k, dtype", [((37,), 200, 300, torch.float32), ((3, 11), 130, 260, HALF),
                                               ((5,), 300, 100, HALF)], ids=str)
def test_linear_past_the_gemv_quantises_x_in_tiles_against_the_stored_weight(lead, n, k, dtype):
    torch.manual_seed(n + k)
    linear = FP8WeightLinear(torch.randn(n, k) * 0.05).to(DEVICE)
    x = torch.randn(*lead, k).to(DEVICE, dtype)
    w = dequantise_by_hand(linear.weight.cpu(), linear.weight_scale_inv.cpu())
    with ops.backend("triton"):
        under_grad = linear(x)  # under autograd: the reference, whose gradient reaches x
        with torch.no_grad():
            got = linear(x)
    with torch.no_grad(), ops.backend("torch"):
        reference = linear(x)
    assert got.shape == (*lead, n) and got.dtype == dtype
    x2, got2 = x.reshape(-1, k), got.reshape(-1, n)
    assert _rel(got2, _tiles_by_hand(x2.cpu()).double() @ w.double().t()) < ACCUMULATION[dtype]
    assert _rel(got, reference) < INPUT_ROUNDING
    assert _rel(reference.reshape(-1, n), x2.cpu().double() @ w.double().t()) < ACCUMULATION[dtype]
    assert torch.equal(under_grad, reference)


def _quantisations(prof) -> int:
    return {e.key: e.count for e in prof.key_averages()}.get("seekforge::fp8_quantise_tiles", 0)


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
def test_projections_of_one_input_quantise_it_once(dtype):
    """Projections of one input (MLA's wq_a and wkv_a, a SwiGLU's w1 and w3) past the GEMV's rows: one quantisation of
    x for all of them, and each output bit for bit the layer's own alone, for inputs whose rows differ in scale by
    orders of magnitude (a tile's scale taken from another row or input shows); partial blocks in n and k."""
    torch.manual_seed(3)
    a = FP8WeightLinear(torch.randn(136, 300) * 0.05).to(DEVICE)
    b = FP8WeightLinear(torch.randn(72, 300) * 0.05).to(DEVICE)
    for seed in (0, 1):
        x = torch.randn(2, 9, 300) * torch.logspace(-2, 2, 9).unsqueeze(-1) * (1 + seed)
        x = x.to(DEVICE, dtype)
        with torch.no_grad(), ops.backend("triton"):
            alone = a(x), b(x)
            with torch.profiler.profile() as prof:
                together = ops.projections(x, a, b)
        assert _quantisations(prof) == 1
        for got, want in zip(together, alone):
            assert got.shape == want.shape and torch.equal(got, want)


def test_the_models_swiglus_and_mla_quantise_their_input_once():
    """In the model (FP8 weights, past the GEMV's rows): the dense MLP's and the shared experts' SwiGLU quantise twice
    (x for w1 and w3 together, then w2's input), MLA's first projections once, each output the layers' own
    alone's bit for bit."""
    from seekforge.model import ModelConfig, Transformer
    from seekforge.model.fp8_weights import to_fp8_weights

    torch.manual_seed(4)
    model = to_fp8_weights(Transformer(ModelConfig.preset("tiny")).to(DEVICE, HALF).eval())
    x = torch.randn(1, 12, model.cfg.dim).to(DEVICE, HALF)
    with torch.no_grad(), ops.backend("triton"):
        for mlp in (model.layers[0].ffn, model.layers[1].ffn.shared_experts):
            with torch.profiler.profile() as prof:
                y = mlp(x)
            assert _quantisations(prof) == 2
            assert torch.equal(y, mlp.w2(F.silu(mlp.w1(x)) * mlp.w3(x)))
        mla = model.layers[0].attn
        with torch.profiler.profile() as prof:
            q, kv_a = mla.project(x)
        assert _quantisations(prof) == 1
        assert torch.equal(q, mla.wq_a(x)) and torch.equal(kv_a, mla.wkv_a(x))


@pytest.mark.skipif(CUDA, reason="torch._scaled_mm's stand-in, for a CPU")
@pytest.mark.parametrize("n, k", [(576, 7168), (2048, 2816), (7, 5)], ids=str)
def test_weights_are_padded_once_and_scaled_mm_reads_them_in_place(monkeypatch, n, k):
    """An FP8 layer keeps its weight and scales zero-padded (the scales with ones) to the shapes torch._scaled_mm
    takes (n to 128, k to 512: 671b's wkv_a, 16b's shared experts' w2, a small odd one), the weight and scales views
    of them in the checkpoint's shapes. Through torch._scaled_mm as torch 2.11 takes it (a stand-in, on the CPU) the
    GEMM reads them where they lie, and the output is that of the weight padded on the call, bit for bit, and the
    reference's within e4m3's rounding of x."""
    seen = []

    def scaled_mm(mat1, mat2, scale_a, scale_b, **kwargs):
        seen.append((mat2.data_ptr(), scale_b.data_ptr()))
        return scaled_mm_as_torch_2_11(mat1, mat2, scale_a, scale_b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm, raising=False)
    monkeypatch.setattr(blockwise_mm, "scaled_mm_layout", lambda device, b_blocks: "kn")
    torch.manual_seed(n + k)
    linear = FP8WeightLinear(torch.randn(n, k) * 0.05)
    w, s = linear.gemm_operands
    assert w.shape == (cdiv(n, 128) * 128, cdiv(k, 512) * 512) and s.shape == (cdiv(n, 128), cdiv(k, 512) * 4)
    assert linear.weight.shape == (n, k) and linear.weight_scale_inv.shape == (cdiv(n, 128), cdiv(k, 128))
    assert linear.weight.data_ptr() == w.data_ptr() and linear.weight_scale_inv.data_ptr() == s.data_ptr()
    outside = torch.ones(w.shape, dtype=torch.bool)
    outside[:n, :k] = False
    scale_outside = torch.ones(s.shape, dtype=torch.bool)
    scale_outside[:, :cdiv(k, 128)] = False
    assert not w.view(torch.uint8)[outside].any() and (s[scale_outside] == 1).all()

    x = torch.randn(37, k)
    with torch.no_grad(), ops.backend("triton"):
        got = linear(x)
        per_call = ops.fp8_linear(x, linear.weight, linear.weight_scale_inv)  # the weight padded on the call
    assert seen[0] == (w.data_ptr(), s.data_ptr()) and seen[1][0] != w.data_ptr()
    assert got.shape == (37, n) and torch.equal(got, per_call)
    with torch.no_grad(), ops.backend("torch"):
        reference = linear(x)
    assert _rel(got, reference) < INPUT_ROUNDING
    by_hand = _tiles_by_hand(x).double() @ dequantise_by_hand(linear.weight, linear.weight_scale_inv).double().t()
    assert _rel(got, by_hand) < ACCUMULATION[torch.float32]


def _fp8_experts(n_experts: int, dim: int, inter: int, seed: int) -> Experts:
    torch.manual_seed(seed)
    experts = Experts(n_experts, dim, inter).to(DEVICE)
    with torch.no_grad():
        for w in (experts.w1, experts.w2, experts.w3):
            w.normal_(0.0, 0.05)
        _convert_experts(experts)  # the converter's step for one module: e4m3 weights, block scales, stored once
    return experts


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=str)
def test_experts_run_the_grouped_gemm_on_their_stored_weights(dtype):
    """The grouped matmuls of w1 and w3, which read the same rows (sorted by expert, one expert without rows, counts
    that are multiples of nothing), from one quantisation of them, by hand; and the experts' forward (prefill's many
    rows: the rows quantised for w1 and w3 once, w2's input once) against the dequantising reference."""
    experts = _fp8_experts(5, 144, 200, seed=1)
    counts = torch.tensor([37, 0, 5, 141, 21])
    offsets = counts.cumsum(0).to(torch.int32).to(DEVICE)
    expert_of_row = torch.repeat_interleave(torch.arange(5), counts).to(DEVICE)
    x = torch.randn(int(counts.sum()), 144).to(DEVICE, dtype)
    with torch.no_grad(), torch.profiler.profile() as prof, ops.backend("triton"):
        gate, up = experts.matmul(x, (experts.w1, experts.w3), offsets, expert_of_row)
    assert {e.key: e.count for e in prof.key_averages()}.get("seekforge::fp8_grouped_mm") == 2
    assert _quantisations(prof) == 1
    xq = _tiles_by_hand(x.cpu()).double()
    for got, w, scale in ((gate, experts.w1, experts.w1_scale_inv), (up, experts.w3, experts.w3_scale_inv)):
        start = 0
        for e, count in enumerate(counts.tolist()):
            w_e = dequantise_by_hand(w[e].cpu(), scale[e].cpu()).double()
            if count:
                assert _rel(got[start:start + count], xq[start:start + count] @ w_e.t()) < ACCUMULATION[dtype]
            start += count

    tokens = torch.randn(120, 144).to(DEVICE, dtype)  # 240 (token, expert) rows, 48 an expert
    weights, indices = torch.rand(120, 2, device=DEVICE), torch.stack([torch.randperm(5)[:2] for _ in range(120)])
    with torch.no_grad():
        with ops.backend("triton"), torch.profiler.profile() as prof:
            y, load = experts(tokens, weights, indices.to(DEVICE))
        assert _quantisations(prof) == 2
        with ops.backend("torch"):
            want, want_load = experts(tokens, weights, indices.to(DEVICE))
    assert y.dtype == dtype and torch.equal(load, want_load)
    assert _rel(y, want) < 2 * INPUT_ROUNDING


def _engine_prefill(kernels: str, compiled: bool = False, cuda_graphs: bool = False):
    from seekforge import LLM
    from seekforge.engine.parity import forced_logits
    from seekforge.model import ModelConfig, Transformer
    from seekforge.model.fp8_weights import to_fp8_weights

    cfg = ModelConfig.preset("tiny").replace(n_mtp_modules=0, n_layers=2)
    torch.manual_seed(0)
    model = to_fp8_weights(Transformer(cfg).to(DEVICE, HALF).eval())
    # 150 tokens prefilled together: 300 (token, expert) rows over 8 experts, past the fused kernels' 16 an expert
    prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (70, 80)]
    llm = LLM(model, max_num_seqs=2, max_model_len=128, kernels=kernels, compile=compiled, cuda_graphs=cuda_graphs)
    with torch.profiler.profile() as prof:
        logits = forced_logits(llm, prompts, [[5], [7]])[:, 0]
    return logits, {e.key: e.count for e in prof.key_averages()}, cfg


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_engine_prefill_over_fp8_weights_runs_the_fp8_gemms(compiled):
    """The prefill's projections quantise their input and run the FP8 GEMM, its MoE blocks the grouped FP8 GEMM, and
    its logits are the dequantising engine's within e4m3's rounding of the inputs (fp16 on the CPU, bf16 on CUDA,
    whose own rounding the reference has too)."""
    from seekforge.engine.parity import logit_error

    want, _, _ = _engine_prefill("torch")
    got, counts, cfg = _engine_prefill("triton", compiled)
    moe_layers = cfg.n_layers - cfg.n_dense_layers
    assert counts.get("seekforge::fp8_grouped_mm", 0) >= 3 * moe_layers
    # each FP8 projection's input, once where several read it (MLA's wq_a with wkv_a, wq_b, wo; the dense or shared
    # MLP's w1 with w3, w2; the routed experts' w1 with w3, w2) (compiled: the trace's calls on fake tensors count
    # too)
    quantised, inputs = counts.get("seekforge::fp8_quantise_tiles", 0), 5 * cfg.n_layers + 2 * moe_layers
    assert quantised >= inputs if compiled else quantised == inputs
    error = logit_error(want, got)
    # measured on the CPU: max 0.032
    assert error.max() < INPUT_ROUNDING, error
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="torch._scaled_mm and CUDA graphs")
def test_16b_shapes_and_captured_decode_on_cuda():
    """At the 16b preset's projection shapes (10944 and 576: n and k past whole blocks, padded for torch._scaled_mm)
    and expert shape, for a large decode batch's 64 rows and a prefill's 2048 (the FP8 GEMMs take them only where
    torch._scaled_mm takes block scales: on sm90 with a CUDA 12.9+ torch); then the engine's decode steps past the
    GEMV's rows replayed from CUDA graphs, against the reference engine."""
    from seekforge import LLM
    from seekforge.engine.parity import forced_logits, logit_error
    from seekforge.model import ModelConfig, Transformer
    from seekforge.model.fp8_weights import to_fp8_weights
    from seekforge.ops.blockwise_mm import scaled_mm_layout

    if scaled_mm_layout(DEVICE, True) is None:
        pytest.skip("torch._scaled_mm does not take block scales here (the probe warned why)")
    for n, k in [(3072, 2048), (576, 2048), (10944, 2048), (2048, 10944)]:
        linear = FP8WeightLinear(torch.randn(n, k, device=DEVICE) * 0.02)
        w = dequantise_by_hand(linear.weight.cpu(), linear.weight_scale_inv.cpu()).to(DEVICE, torch.float64)
        for rows in (64, 2048):
            x = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16)
            with torch.no_grad():
                got = linear(x)
            assert got.is_contiguous()
            assert _rel(got, _tiles_by_hand(x).double() @ w.t()) < ACCUMULATION[HALF], (n, k, rows)
    experts = _fp8_experts(64, 2048, 1408, seed=2)
    tokens = torch.randn(2048, 2048, device=DEVICE, dtype=torch.bfloat16)
    weights, indices = torch.rand(2048, 6, device=DEVICE), torch.rand(2048, 64, device=DEVICE).topk(6).indices
    with torch.no_grad():
        y, _ = experts(tokens, weights, indices)
        with ops.backend("torch"):
            want, _ = experts(tokens, weights, indices)
    assert _rel(y, want) < 2 * INPUT_ROUNDING

    cfg = ModelConfig.preset("tiny").replace(n_mtp_modules=0, n_layers=2)
    torch.manual_seed(0)
    model = to_fp8_weights(Transformer(cfg).to(DEVICE, torch.bfloat16).eval())
    prompts = [torch.randint(2, cfg.vocab_size, (n,)).tolist() for n in range(5, 13)]
    tokens = [torch.randint(2, cfg.vocab_size, (3,)).tolist() for _ in prompts]
    want = forced_logits(LLM(model, max_num_seqs=8, max_model_len=64, kernels="torch"), prompts, tokens)
    graphs = LLM(model, max_num_seqs=8, max_model_len=64, cuda_graphs=True)
    got = forced_logits(graphs, prompts, tokens)  # decode steps of 8 rows: the FP8 GEMM inside the graphs
    error = logit_error(want, got)
    assert error.max() < 2 * INPUT_ROUNDING, error
