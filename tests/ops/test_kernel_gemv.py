"""The Triton GEMV (`seekforge.ops.triton.gemv`) against F.linear, and the mode that routes small decode steps'
projections to it (`seekforge.ops.FewRowLinears`).

Without CUDA the kernel runs under Triton's interpreter (tests/triton_setup.py), with fp16 standing in for bf16.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from triton_setup import CUDA, DEVICE, HALF, patch_interpreter

triton = pytest.importorskip("triton")
patch_interpreter()

from seekforge import ops  # noqa: E402
from seekforge.errors import ConfigError  # noqa: E402
from seekforge.model.norm import RMSNorm  # noqa: E402
from seekforge.ops import apply_rotary  # noqa: E402
from seekforge.ops.triton import gemv as gemv_module  # noqa: E402
from seekforge.ops.triton import tuning  # noqa: E402
from seekforge.ops.triton.gemv import gemv, head_gemv, last_tuned_tile, norm_gemv  # noqa: E402
from seekforge.ops.triton.latents import latent_query_kernel as latent_query  # noqa: E402
from seekforge.ops.triton.tuning import K_CONTIGUOUS_TILES, N_CONTIGUOUS_TILES, GemvConfig  # noqa: E402


def assert_rounded(got: torch.Tensor, want: torch.Tensor) -> None:
    """`got` is `want` (fp32, or exact in fp32) accumulated in fp32 and rounded once to got's dtype: within one unit
    in the last place of got's dtype. (A fixed tolerance is either loose for fp16 or, where bf16 rounds values just
    above a power of two by up to 2^-8 of themselves, too tight: a choice of kernel must not look like an error.)"""
    rtol = max(torch.finfo(got.dtype).eps, 1e-5)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=rtol)


@pytest.mark.parametrize("lead, n, k", [((1,), 6, 48), ((2,), 33, 600), ((1, 3), 5, 1024), ((4,), 2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=["fp32", "half"])
def test_matches_linear(lead, n, k, dtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(*lead, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(DEVICE, dtype)
    got = gemv(x, w)
    want = F.linear(x.float(), w.float())
    assert got.shape == (*lead, n) and got.dtype == dtype
    assert_rounded(got, want)


def test_strided_rows_and_weight():
    x = torch.randn(3, 64, device=DEVICE)[:, ::2]  # last dim strided: copied to rows
    w = torch.randn(32, 10, device=DEVICE).t()  # a transposed weight: made contiguous by the launch
    torch.testing.assert_close(gemv(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("tile", [*K_CONTIGUOUS_TILES, GemvConfig(1, 16, 1)], ids=str)
def test_every_tuning_candidate_matches(tile):
    """Each tile the tuning may pick, over several K slices (K not a multiple of the slice) and 3 rows; the
    narrow tile walks K in many slices."""
    g = torch.Generator().manual_seed(1)
    k = 2 * min(tile.block_k, 64) + 7
    x = torch.randn(3, k, generator=g).to(DEVICE, HALF)
    w = (torch.randn(5, k, generator=g) * k ** -0.5).to(DEVICE, HALF)
    small = GemvConfig(tile.block_n, min(tile.block_k, 64), tile.num_warps)  # the interpreter's time stays short
    assert_rounded(gemv(x, w, small), F.linear(x.float(), w.float()))


@pytest.mark.parametrize("winner", ["triton", "cublas"])
def test_first_call_of_a_shape_tunes_the_tile_then_keeps_the_faster_of_it_and_cublas(winner, monkeypatch):
    """The GPU's path (under the interpreter, with stand-in clocks): each candidate of the weight's layout, clipped
    to K and deduplicated, is run once and timed; the fastest is then timed beside cuBLAS, and the faster of the
    two is what the shape runs from then on, with nothing timed again."""
    k = {"triton": 41, "cublas": 45}[winner]  # a shape of its own per case: every tile clips to 64 wide
    fitting = list(dict.fromkeys((c.block_n, 64, c.num_warps) for c in K_CONTIGUOUS_TILES))
    tiles_timed, weighed = [], []

    def tile_clock(kernel_call, quantiles):
        kernel_call()
        tiles_timed.append(len(tiles_timed))
        return [1.0 if len(tiles_timed) == 3 else 2.0] * len(quantiles)  # the third candidate is the fastest

    def clock(run):  # what the choice times: the call over the weight's copies, replayed
        run()
        weighed.append(len(weighed))
        return 1.0 if (len(weighed) % 2 == 1) == (winner == "triton") else 2.0  # a shape times its tile first

    # stand-in clocks: one weight copy will do
    with tuning.tuning(timed=True, tile_clock=tile_clock, clock=clock, copies=lambda weight: [weight]):
        _tunes_then_keeps_the_faster(winner, k, fitting, tiles_timed, weighed)


def _tunes_then_keeps_the_faster(winner, k, fitting, tiles_timed, weighed):
    x = torch.randn(3, k, device=DEVICE, dtype=HALF)
    w = torch.randn(7, k, device=DEVICE, dtype=HALF) * k ** -0.5
    assert gemv_module.choice(x, w) is None
    got = gemv(x, w)
    assert len(tiles_timed) == len(fitting) and last_tuned_tile() == GemvConfig(*fitting[2])
    assert len(weighed) == 2 and gemv_module.choice(x, w) == winner
    if winner == "triton":
        assert_rounded(got, F.linear(x.float(), w.float()))
    else:  # cuBLAS's own half-precision product, which may reduce in half precision (PyTorch's default)
        torch.testing.assert_close(got, F.linear(x, w), atol=0, rtol=0)
    again = gemv(x, w)
    assert len(tiles_timed) == len(fitting) and len(weighed) == 2
    assert torch.equal(again, got)  # the same tile again
    # the per-head products: the op's output has the layout its fake promises either way (a compiled graph
    # asserts it), here with N contiguous in the weight as W_UK's is
    xh = torch.randn(2, 3, k, device=DEVICE, dtype=HALF)
    wh = torch.randn(3, k, 24, device=DEVICE, dtype=HALF).transpose(1, 2)
    torch.library.opcheck(gemv_module.launch_gemv, (xh, wh, None), test_utils=("test_faketensor",))
    assert gemv_module.choice(xh, wh) == winner
    if winner == "triton":
        assert_rounded(head_gemv(xh, wh), torch.einsum("nhk,hjk->nhj", xh.float(), wh.float()))
    else:  # the batched GEMM rounds its output to half precision: compared with itself, not with fp32
        torch.testing.assert_close(head_gemv(xh, wh), torch.einsum("nhk,hjk->nhj", xh, wh), atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the L2 cache's size is CUDA's")
def test_the_choice_times_weight_copies_that_pass_the_l2_cache():
    from seekforge.ops.triton.tuning import weight_copies

    l2 = torch.cuda.get_device_properties(DEVICE).L2_cache_size
    w_uk = torch.randn(16, 128, 512, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)  # 2 MB, N contiguous
    copies = weight_copies(w_uk)
    assert copies[0] is w_uk and len(copies) == min(16, -(-2 * l2 // (w_uk.numel() * 2)))
    assert all(c.stride() == w_uk.stride() and torch.equal(c, w_uk) for c in copies)
    assert len({c.data_ptr() for c in copies}) == len(copies)


def test_a_shape_first_met_inside_a_graph_capture_runs_the_untimed_tile():
    x = torch.randn(2, 52, device=DEVICE, dtype=HALF)
    w = torch.randn(5, 52, device=DEVICE, dtype=HALF) * 52 ** -0.5
    with tuning.tuning(timed=True, capturing=lambda: True, clock=lambda *a, **k: pytest.fail("timed in a capture"),
                       tile_clock=lambda *a, **k: pytest.fail("tuned in a capture")):
        assert_rounded(gemv(x, w), F.linear(x.float(), w.float()))
        assert gemv_module.choice(x, w) is None  # still to be weighed outside a capture

@pytest.mark.parametrize("tile", N_CONTIGUOUS_TILES, ids=str)
def test_every_tuning_candidate_matches_n_contiguous(tile):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 70, generator=g).to(DEVICE, HALF)
    w = (torch.randn(3, 70, 40, generator=g) * 70 ** -0.5).to(DEVICE, HALF)  # [h, K, N]: N contiguous
    want = torch.einsum("nhk,hkj->nhj", x.float(), w.float())
    assert_rounded(head_gemv(x, w.transpose(1, 2), tile), want)


@pytest.fixture
def tuner_picks():
    """pick(i): from then on the first call of every tuned kernel at a shape takes the i-th (mod their number) of
    the tiles its tuner would time there; pick.tiles maps each (kernel, tuning key) to the tiles it took. The GEMV
    is weighed against cuBLAS as on the GPU and kept. A tuning choice changes a step's speed, never its result:
    these are the choices the GPU's timing could make, tried on the CPU as well."""
    stack = contextlib.ExitStack()

    def pick(i):
        def one(kernel, key, tiles):
            tile = tiles[i % len(tiles)]
            shape = (kernel, *key)
            pick.tiles.setdefault(shape, set()).add((tile.kwargs["BLOCK_N"], tile.kwargs["BLOCK_K"], tile.num_warps))
            pick.count[shape] = len(tiles)
            return [tile]

        stack.close()  # each pick starts over: no tile or choice kept from the last
        # a tie everywhere: the first listed, the Triton tile, wins the choice beside cuBLAS
        stack.enter_context(tuning.tuning(timed=True, prune=one, tile_clock=lambda fn, quantiles: [1.0] * len(quantiles),
                                          clock=lambda run: 1.0, copies=lambda weight: [weight]))

    pick.tiles, pick.count = {}, {}
    with stack:
        yield pick


def test_every_tile_the_tuner_can_pick_gives_the_reference(tuner_picks):
    """Each tuned kernel at a shape where its candidate tiles differ (K past the widest slice, several slices for
    most): the GEMV over K-contiguous and N-contiguous weights, the input norm with its two projections, the
    latent query storing the new latents, and the MoE's two GEMV-form kernels, each against its reference."""
    from seekforge.ops.triton.moe import fused_experts
    from seekforge.model import ModelConfig
    from seekforge.model.mla import MLA
    from seekforge.model.moe import Experts

    g = torch.Generator().manual_seed(3)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, HALF)

    k = 2 * 2048 + 7
    x, w = rand(2, k), rand(3, k, scale=k ** -0.5)
    xh, wh = rand(2, 3, 70), rand(3, 70, 40, scale=70 ** -0.5)  # [h, K, N]: N contiguous
    norm = RMSNorm(600).to(DEVICE, HALF)
    norm.weight.data = (torch.rand(600, generator=g) + 0.5).to(DEVICE, HALF)
    xn, wa, wb = rand(2, 600, scale=3.0), rand(6, 600, scale=600 ** -0.5), rand(3, 600, scale=600 ** -0.5)
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(3)
    attn = MLA(cfg).to(DEVICE, HALF)
    w_uk = attn.absorbed_weights()[0]  # [h, d, c]
    q_nope, q_pe = rand(2, cfg.n_heads, cfg.qk_nope_head_dim), rand(2, cfg.n_heads, cfg.qk_rope_head_dim)
    angles = (torch.rand(2, cfg.qk_rope_head_dim // 2, generator=g) * 6).to(DEVICE)
    cos, sin = angles.cos(), angles.sin()
    kv_a = rand(2, cfg.kv_lora_rank + cfg.qk_rope_head_dim, scale=2.0)
    slots = torch.tensor([5, 2], device=DEVICE)
    with torch.no_grad():
        kv, k_pe = attn.latent(kv_a.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0))
    cache_want = torch.zeros(3, 4, cfg.kv_lora_rank + cfg.qk_rope_head_dim, device=DEVICE, dtype=HALF)
    ops.store_latents(cache_want, slots, torch.cat([kv[0], k_pe[0]], dim=-1))
    query_want = torch.cat([torch.einsum("nhd,hdc->nhc", q_nope.float(), w_uk.float()),
                            apply_rotary(q_pe.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0))[0].float()], -1)
    experts = Experts(4, 32, 24)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 32 ** -0.5)
    xe, residual, weights, indices = (torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g),
                                      torch.rand(1, 2, generator=g), torch.tensor([[3, 1]]))
    moe_want = experts(xe, weights, indices)[0] + residual
    experts = experts.to(DEVICE, HALF)

    def latent_query_storing():
        cache = torch.zeros_like(cache_want)
        query = latent_query(q_nope, q_pe, w_uk.transpose(1, 2), cos, sin,
                             (cache, slots, kv_a, attn.kv_norm.weight, attn.kv_norm.eps))
        return torch.cat([query.flatten().float(), cache.flatten().float()])

    cases = {  # name: (what the kernel computes, its reference, tolerance)
        "gemv": (lambda: gemv(x, w), F.linear(x.float(), w.float()), 3e-3),
        "head_gemv": (lambda: head_gemv(xh, wh.transpose(1, 2)),
                      torch.einsum("nhk,hkj->nhj", xh.float(), wh.float()), 3e-3),
        "norm_gemv": (lambda: torch.cat(norm_gemv(xn, norm.weight, norm.eps, wa, wb), -1),
                      F.linear(norm(xn).float(), torch.cat([wa, wb]).float()), 3e-3),
        "latent_query": (latent_query_storing, torch.cat([query_want.flatten(), cache_want.flatten().float()]), 3e-3),
        "moe_rows": (lambda: fused_experts(xe.to(DEVICE, HALF), experts.w1, experts.w2, experts.w3, weights.to(DEVICE),
                                           indices.to(DEVICE), rows=True, residual=residual.to(DEVICE, HALF)).cpu(),
                     moe_want, 3e-2),
    }
    for name, (run, want, tol) in cases.items():
        i, before = 0, set(tuner_picks.count)
        while i == 0 or i < max(n for shape, n in tuner_picks.count.items() if shape not in before):
            tuner_picks(i)
            with torch.no_grad():
                got = run()
            torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol, msg=lambda m: f"{name}, pick {i}: {m}")
            i += 1
    assert all(len(tuner_picks.tiles[shape]) == n for shape, n in tuner_picks.count.items())  # each tile ran
    assert sorted(n for n in tuner_picks.count.values()) == [5, 5, 5, 6, 7, 9]  # the candidates of each shape


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=["fp32", "half"])
@pytest.mark.parametrize("n", [1, 3])
def test_head_gemv_is_mlas_absorbed_products(n, dtype):
    """Both of absorbed MLA's per-head products, on slices of one wkv_b as the engine takes them: W_UK applied to
    the query (N contiguous in the weight) and W_UV to the attended latent (K contiguous)."""
    g = torch.Generator().manual_seed(n)
    heads, d, dv, c = 3, 16, 8, 40
    wkv_b = (torch.randn(heads, d + dv, c, generator=g) * c ** -0.5).to(DEVICE, dtype)
    w_uk, w_uv = wkv_b[:, :d], wkv_b[:, d:]
    q_nope = torch.randn(n, heads, d, generator=g).to(DEVICE, dtype)
    latent = torch.randn(n, heads, c, generator=g).to(DEVICE, dtype)
    for x, w, eq in ((q_nope, w_uk.transpose(1, 2), "nhd,hdc->nhc"), (latent, w_uv, "nhc,hdc->nhd")):
        want = torch.einsum(eq, x.float(), (w_uk if eq[0:3] == "nhd" else w_uv).float())
        got = head_gemv(x, w)
        assert got.shape == want.shape and got.dtype == dtype
        assert_rounded(got, want)


def test_bad_inputs_name_the_problem():
    x = torch.randn(5, 8, device=DEVICE)
    with pytest.raises(ConfigError, match="at most 4 rows"):
        gemv(x, torch.randn(3, 8, device=DEVICE))
    with pytest.raises(ConfigError, match="weight"):
        gemv(x[:2], torch.randn(3, 7, device=DEVICE))
    with pytest.raises(ConfigError, match="head_gemv wants"):
        head_gemv(torch.randn(2, 3, 8, device=DEVICE), torch.randn(4, 5, 8, device=DEVICE))


def test_compiles_as_one_graph():
    x, w = torch.randn(2, 40, device=DEVICE), torch.randn(12, 40, device=DEVICE)
    compiled = torch.compile(gemv, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x, w), gemv(x, w), atol=0, rtol=0)


@pytest.mark.parametrize("lead, k, tile", [((1, 1), 64, None), ((3,), 200, None), ((1, 4), 48, None),
                                           ((2,), 200, GemvConfig(2, 64, 1))], ids=str)
def test_norm_gemv_is_the_models_norm_then_two_projections(lead, k, tile, monkeypatch):
    """A block's input norm and MLA's two input projections in one launch, against RMSNorm and F.linear; with a
    narrow tile the norm's two passes over x take several slices each."""
    if tile is not None:
        monkeypatch.setattr(gemv_module, "default_config", lambda weight: tile)
    g = torch.Generator().manual_seed(k)
    norm = RMSNorm(k, eps=1e-5).to(DEVICE, HALF)
    norm.weight.data = (torch.rand(k, generator=g) + 0.5).to(DEVICE, HALF)
    x = (torch.randn(*lead, k, generator=g) * 3).to(DEVICE, HALF)
    wa = (torch.randn(40, k, generator=g) * k ** -0.5).to(DEVICE, HALF)
    wb = (torch.randn(9, k, generator=g) * k ** -0.5).to(DEVICE, HALF)
    ya, yb = norm_gemv(x, norm.weight, norm.eps, wa, wb)
    xn = norm(x).float()
    assert ya.shape == (*lead, 40) and yb.shape == (*lead, 9) and ya.dtype == yb.dtype == HALF
    assert_rounded(ya, F.linear(xn, wa.float()))
    assert_rounded(yb, F.linear(xn, wb.float()))
    compiled = torch.compile(norm_gemv, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for got, want in zip(compiled(x, norm.weight, norm.eps, wa, wb), (ya, yb)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_norm_gemv_bad_inputs_name_the_problem():
    x, g, w = (torch.randn(1, 8, device=DEVICE, dtype=HALF), torch.ones(8, device=DEVICE, dtype=HALF),
               torch.randn(3, 8, device=DEVICE, dtype=HALF))
    with pytest.raises(ConfigError, match="at most 4 rows"):
        norm_gemv(torch.randn(5, 8, device=DEVICE, dtype=HALF), g, 1e-6, w, w)
    with pytest.raises(ConfigError, match="one dtype"):
        norm_gemv(x, g.float(), 1e-6, w, w)
    with pytest.raises(ConfigError, match="K contiguous"):
        norm_gemv(x, g, 1e-6, w, torch.randn(8, 3, device=DEVICE, dtype=HALF).t())

@pytest.mark.parametrize("n, heads, d, c, r", [(1, 3, 16, 40, 8), (4, 2, 24, 64, 16), (3, 16, 128, 512, 64)], ids=str)
def test_latent_query_is_w_uk_beside_the_rotated_rope_part(n, heads, d, c, r):
    """Absorbed MLA's latent query in one launch, on slices of one wkv_b and of one query projection as the
    engine takes them, against the einsum and `apply_rotary`."""
    g = torch.Generator().manual_seed(n)
    wkv_b = (torch.randn(heads, d + 8, c, generator=g) * c ** -0.5).to(DEVICE, HALF)
    w_uk = wkv_b[:, :d]  # [h, d, c]
    q = torch.randn(n, heads, d + r, generator=g).to(DEVICE, HALF)
    q_nope, q_pe = q.split([d, r], dim=-1)
    angles = (torch.rand(n, r // 2, generator=g) * 6).to(DEVICE)
    cos, sin = angles.cos(), angles.sin()
    got = latent_query(q_nope, q_pe, w_uk.transpose(1, 2), cos, sin)
    assert got.shape == (n, heads, c + r) and got.dtype == HALF
    assert_rounded(got[..., :c], torch.einsum("nhd,hdc->nhc", q_nope.float(), w_uk.float()))
    torch.testing.assert_close(got[..., c:], apply_rotary(q_pe.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0))[0],
                               atol=1e-3, rtol=1e-3)
    with torch.no_grad():
        compiled = torch.compile(latent_query, fullgraph=True, dynamic=True)
        torch.testing.assert_close(compiled(q_nope, q_pe, w_uk.transpose(1, 2), cos, sin), got, atol=0, rtol=0)


def test_latent_query_bad_inputs_name_the_problem():
    q_nope, q_pe = (torch.randn(1, 2, n, device=DEVICE, dtype=HALF) for n in (8, 4))
    w_uk, angles = torch.randn(2, 16, 8, device=DEVICE, dtype=HALF), torch.zeros(1, 2, device=DEVICE)
    with pytest.raises(ConfigError, match="latent_query wants"):
        latent_query(q_nope.expand(5, 2, 8), q_pe.expand(5, 2, 4), w_uk, angles, angles)
    with pytest.raises(ConfigError, match="latent_query wants"):
        latent_query(q_nope, q_pe, w_uk.float(), angles, angles)
    with pytest.raises(ConfigError, match="latent_query wants"):
        latent_query(q_nope, q_pe, w_uk, angles[:, :1], angles[:, :1])

@pytest.fixture
def triton_here():
    """The ops' Triton paths on this device: on the CPU, under the interpreter."""
    with ops.backend("triton"):
        yield


def projections(dim=64, dtype=HALF):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(dim, 96, bias=False), torch.nn.SiLU(),
                               torch.nn.Linear(96, dim, bias=False)).to(DEVICE, dtype)


@pytest.mark.parametrize("rows, routed", [(1, True), (4, True), (5, False)])
def test_mode_routes_few_row_linears_only(rows, routed, monkeypatch, triton_here):
    calls = []  # a spy on the kernel the mode calls
    monkeypatch.setattr(gemv_module, "gemv", lambda x, w: calls.append(x.shape) or gemv(x, w))
    mlp = projections()
    x = torch.randn(1, rows, 64, device=DEVICE, dtype=HALF)
    with torch.no_grad():
        want = mlp(x)
        with ops.FewRowLinears(DEVICE):
            got = mlp(x)
    assert len(calls) == (2 if routed else 0)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_mode_leaves_training_fp32_and_other_devices_alone(monkeypatch, triton_here):
    monkeypatch.setattr(gemv_module, "gemv", lambda x, w: pytest.fail("routed"))
    with ops.FewRowLinears(DEVICE):
        projections()(torch.randn(1, 64, device=DEVICE, dtype=HALF)).sum()  # grad enabled: training
        with torch.no_grad():
            projections(dtype=torch.float32)(torch.randn(1, 64, device=DEVICE))
    with ops.FewRowLinears(torch.device("meta")), torch.no_grad():
        projections()(torch.randn(1, 64, device=DEVICE, dtype=HALF))


def test_compiled_block_traces_the_mode_into_one_graph(triton_here):
    from torch._dynamo.utils import counters

    counters.clear()
    mlp = projections()
    x = torch.randn(1, 2, 64, device=DEVICE, dtype=HALF)
    compiled = torch.compile(lambda t: mlp(t) * 2, dynamic=True)
    with torch.no_grad():
        with ops.FewRowLinears(DEVICE):
            compiled(x)
            with torch.profiler.profile() as prof:
                got = compiled(x)
        torch.testing.assert_close(got, mlp(x) * 2, atol=2e-3, rtol=2e-3)
    assert not counters["graph_break"]
    assert sum(e.count for e in prof.key_averages() if e.key == "seekforge::gemv") == 2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="16b shapes in bf16")
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("n, k", [(3072, 2048), (576, 2048), (2048, 2048), (10944, 2048), (2048, 10944)])
def test_16b_projections_bf16(rows, n, k):
    x = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * k ** -0.5
    torch.testing.assert_close(gemv(x, w).float(), F.linear(x.float(), w.float()), atol=2e-2, rtol=2e-2)
    tuned = last_tuned_tile()  # the shape's first call timed the candidates (clipped to K) and kept one
    assert any(tuned == GemvConfig(c.block_n, min(c.block_k, k), c.num_warps) for c in K_CONTIGUOUS_TILES)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="16b shapes in bf16")
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_16b_input_norm_and_projections_bf16(rows):
    x = torch.randn(rows, 2048, device=DEVICE, dtype=torch.bfloat16)
    norm = RMSNorm(2048).to(DEVICE, torch.bfloat16)
    norm.weight.data.uniform_(0.5, 1.5)
    wq, wkv_a = (torch.randn(n, 2048, device=DEVICE, dtype=torch.bfloat16) * 2048 ** -0.5 for n in (3072, 576))
    with torch.no_grad():
        got = norm_gemv(x, norm.weight, norm.eps, wq, wkv_a)
        xn = norm(x).float()
    for y, w in zip(got, (wq, wkv_a)):
        torch.testing.assert_close(y.float(), F.linear(xn, w.float()), atol=2e-2, rtol=2e-2)

def test_captured_decode_step_routes_its_projections_in_one_compiled_graph_per_block(triton_here):
    """The runner's graph step (what a CUDA graph captures), compiled, in fp16: the projections go to the GEMV
    with no graph break, and the logits are those of the step without the mode and of the model's own forward.
    Each sequence has its own cache slot, as `_fill_static` gives them: two rows writing one slot (the padding
    rows' scratch slot) race inside the store, and both then read the winner's latent (on an H100 the winner
    changed between the two steps: logits apart by up to 0.92)."""
    from torch._dynamo.utils import counters

    from seekforge import LLM
    from seekforge.engine.model_runner import Chunk
    from seekforge.model import ModelConfig, Transformer

    cfg = ModelConfig.preset("tiny").replace(n_mtp_modules=0, n_layers=2)
    torch.manual_seed(0)
    model = Transformer(cfg).to(DEVICE, HALF).eval()
    runner = LLM(model, max_num_seqs=2, max_model_len=64, compile=True).runner
    runner._allocate_static(2)
    runner._fill_static([Chunk([0], 0, [5]), Chunk([1], 0, [9])], 2)  # first tokens, in blocks 0 and 1
    with torch.no_grad():
        own = model(torch.tensor([[5], [9]], device=DEVICE))[:, 0].float()
    counters.clear()
    with torch.inference_mode():
        with torch.profiler.profile() as prof:
            routed = runner._graph_step(2)[0].clone()
        with ops.backend("torch", ops=["gemv"]):  # the mode then passes everything through
            plain = runner._graph_step(2)[0]
    ran = {e.key: e.count for e in prof.key_averages()}
    assert ran.get("seekforge::gemv", 0) >= 2 * cfg.n_layers  # wo and W_UV
    fused = ("seekforge::norm_gemv", "seekforge::latent_query_storing")
    assert min(ran.get(op, 0) for op in fused) >= cfg.n_layers
    assert not counters["graph_break"]
    torch.testing.assert_close(routed, plain, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(routed, own, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="16b shapes in bf16")
@pytest.mark.parametrize("rows", [1, 4])
def test_16b_absorbed_products_bf16(rows):
    wkv_b = torch.randn(16, 256, 512, device=DEVICE, dtype=torch.bfloat16) * 512 ** -0.5
    w_uk, w_uv = wkv_b[:, :128], wkv_b[:, 128:]
    q_nope = torch.randn(rows, 16, 128, device=DEVICE, dtype=torch.bfloat16)
    latent = torch.randn(rows, 16, 512, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(ops.head_matmul(q_nope, w_uk.transpose(1, 2)).float(),
                               torch.einsum("nhd,hdc->nhc", q_nope.float(), w_uk.float()), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ops.head_matmul(latent, w_uv).float(),
                               torch.einsum("nhc,hdc->nhd", latent.float(), w_uv.float()), atol=2e-2, rtol=2e-2)
