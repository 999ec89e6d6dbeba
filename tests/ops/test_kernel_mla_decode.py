"""The Triton MLA decode kernel against the PyTorch reference `seekforge.ops.paged_mla_decode_reference`.

Without CUDA the kernel runs under Triton's interpreter on small shapes (tests/triton_setup.py). With CUDA
the same cases run natively, plus full-size bf16 shapes and a CUDA-graph replay that changes context
lengths and block tables between replays.
"""

import pytest
import torch
from triton_setup import DEVICE, HALF, patch_interpreter

triton = pytest.importorskip("triton")
patch_interpreter()

from seekforge.errors import ConfigError  # noqa: E402
from seekforge.ops import paged_mla_decode_reference, plan_paged_attention  # noqa: E402
from seekforge.ops.triton.mla_decode import DecodeConfig, default_config, paged_mla_decode_triton  # noqa: E402


def _problem(b, s, h, c, r, page, lens, dtype, seed):
    """Random q and cache; each sequence's blocks scattered over the cache; the s queries of sequence i
    at its last s positions (lens[i] - s .. lens[i] - 1). The block table has a spare column."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // page) for n in lens) + 1
    num_blocks = b * max_blocks + 3
    cache = torch.randn(num_blocks, page, c + r, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[:b * max_blocks].view(b, max_blocks)
    pos = torch.tensor([[n - s + j for j in range(s)] for n in lens])
    q = torch.randn(b, s, h, c + r, generator=g)
    return q.to(DEVICE, dtype), cache.to(DEVICE, dtype), tables.to(DEVICE), pos.to(DEVICE)


def _decode(q, cache, tables, pos, scale, c, **kw):
    """The kernel, after leaving NaN in the memory its output will most likely be given (the allocator
    hands back the block just freed), so an element it fails to write shows."""
    torch.full((*q.shape[:3], c), float("nan"), device=q.device, dtype=q.dtype)
    return paged_mla_decode_triton(q, cache, tables, pos, scale, c, **kw)


def _reference(q, cache, tables, pos, scale, c):
    plan = plan_paged_attention(tables, pos, cache.shape[1], tables.shape[1] * cache.shape[1])
    wide = torch.float64 if q.numel() < 1 << 22 else torch.float32
    return paged_mla_decode_reference(q.to(wide), cache.to(wide), plan, scale, c)


def _rel_err(out, ref):
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return ((out.to(ref.dtype) - ref).norm() / ref.norm()).item()


TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1.5e-2}

# (b, s, h, c, r, page, context lengths, num_splits, softmax_scale); lengths end mid-block, on a block
# edge, inside the first block; more splits than tiles leaves some splits empty; 64 splits are combined a
# column block at a time.
CASES = {
    "one_head": (2, 1, 1, 32, 16, 16, [37, 5], None, 0.2),
    "mtp_pairs_three_splits": (3, 2, 4, 32, 16, 16, [50, 16, 2], 3, 0.2),
    "sixteen_heads_page64_peaky": (2, 1, 16, 32, 16, 64, [100, 64], 4, 1.0),
    "more_splits_than_tiles": (1, 1, 4, 32, 16, 16, [70], 6, 0.2),
    "padded_rank_48": (2, 1, 4, 48, 16, 16, [33, 20], 2, 0.2),
    "odd_dims_24_8": (2, 1, 3, 24, 8, 16, [33, 20], 2, 0.2),
    "sixty_four_splits": (2, 1, 4, 32, 16, 16, [300, 40], 64, 0.2),  # combined in column blocks
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case):
    b, s, h, c, r, page, lens, splits, scale = CASES[case]
    q, cache, tables, pos = _problem(b, s, h, c, r, page, lens, torch.float32, seed=len(case))
    out = _decode(q, cache, tables, pos, scale, c, num_splits=splits)
    assert out.dtype == q.dtype and out.shape == (b, s, h, c)
    assert _rel_err(out, _reference(q, cache, tables, pos, scale, c)) < TOL[torch.float32]


def test_tiles_across_blocks_and_split_heads():
    """Tiles wider than a cache block gather their rows block by block; 8 heads in 2 programs of 4."""
    b, s, h, c, r, page = 2, 2, 8, 32, 16, 8
    q, cache, tables, pos = _problem(b, s, h, c, r, page, [45, 19], torch.float32, seed=3)
    cfg = DecodeConfig(block_h=4, block_n=32, num_splits=2, num_warps=4, num_stages=2)
    out = _decode(q, cache, tables, pos, 0.2, c, config=cfg)
    assert _rel_err(out, _reference(q, cache, tables, pos, 0.2, c)) < TOL[torch.float32]


@pytest.mark.parametrize("splits", [1, 3])
def test_half_precision(splits):
    q, cache, tables, pos = _problem(2, 2, 4, 32, 16, 16, [40, 9], HALF, seed=splits)
    out = _decode(q, cache, tables, pos, 0.25, 32, num_splits=splits)
    assert out.dtype == HALF
    assert _rel_err(out, _reference(q, cache, tables, pos, 0.25, 32)) < TOL[HALF]


def test_queries_see_only_their_past():
    """A key written after a query's position must not change that query's output (s = 2: the first
    query is one position behind the second)."""
    q, cache, tables, pos = _problem(1, 2, 2, 32, 16, 16, [21], torch.float32, seed=7)
    before = _decode(q, cache, tables, pos, 0.2, 32, num_splits=2)
    last = 20  # the second query's own position: visible to it, not to the first query
    cache[tables[0, last // 16], last % 16] = 50.0
    after = _decode(q, cache, tables, pos, 0.2, 32, num_splits=2)
    assert torch.equal(after[:, 0], before[:, 0])
    assert not torch.allclose(after[:, 1], before[:, 1])


def test_heuristic_splits_only_when_the_grid_is_small():
    few = default_config(4, 1, 16, 64, 4096, DEVICE)
    many = default_config(64, 1, 128, 64, 4096, DEVICE)
    short = default_config(1, 1, 16, 64, 128, DEVICE)
    assert few.num_splits > 1 and many.num_splits == 1 and short.num_splits == 1
    for cfg, s, h in ((few, 1, 16), (many, 1, 128), (default_config(8, 2, 128, 64, 4096, DEVICE), 2, 128)):
        assert 16 <= triton.next_power_of_2(s) * cfg.block_h <= 64 and cfg.block_h <= h


@pytest.mark.parametrize("bad, match", [
    (dict(table_rows=3), "block_tables"),
    (dict(pos_shape=(2, 3)), "query_positions"),
    (dict(cache_width=64), "kv_lora_rank"),
    (dict(cache_dtype=torch.float16), "share one of"),
])
def test_bad_inputs_name_the_problem(bad, match):
    c = 32
    q = torch.zeros(2, 1, 4, 48)
    cache = torch.zeros(4, 16, bad.get("cache_width", 48), dtype=bad.get("cache_dtype", torch.float32))
    pos = torch.zeros(bad.get("pos_shape", (2, 1)), dtype=torch.long)
    with pytest.raises(ConfigError, match=match):
        paged_mla_decode_triton(q, cache, torch.zeros(bad.get("table_rows", 2), 3, dtype=torch.long), pos, 0.1, c)


# ------------------------------------------------------------------------- GPU: real sizes, graphs

@pytest.mark.gpu
@pytest.mark.parametrize("h, s, page", [(16, 1, 64), (16, 2, 64), (128, 1, 64), (128, 2, 64), (16, 1, 16),
                                        (128, 1, 16), (32, 1, 64)])
def test_full_size_bf16(h, s, page):
    b, c, r = 6, 512, 64
    lens = [1000, 64, 3, 777, 2048, 130]
    q, cache, tables, pos = _problem(b, s, h, c, r, page, lens, torch.bfloat16, seed=h + s + page)
    scale = 192 ** -0.5
    ref = _reference(q, cache, tables, pos, scale, c)
    for splits in (None, 1, 5):
        out = _decode(q, cache, tables, pos, scale, c, num_splits=splits)
        assert _rel_err(out, ref) < TOL[torch.bfloat16], splits


@pytest.mark.gpu
def test_cuda_graph_replay_follows_new_lengths_and_tables():
    """Captured once over a wide block table; replays with other positions and tables in the same
    tensors give the reference's answer for the new values (no host sync, no value-dependent grid)."""
    b, s, h, c, r, page = 8, 1, 16, 512, 64, 64
    q, cache, tables, pos = _problem(b, s, h, c, r, page, [2000] * b, torch.bfloat16, seed=1)
    scale = 192 ** -0.5
    paged_mla_decode_triton(q, cache, tables, pos, scale, c)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _decode(q, cache, tables, pos, scale, c)
    for seed, lens in ((2, [1, 5, 64, 65, 700, 1999, 2000, 1024]), (3, [2048, 1, 1, 300, 90, 4, 1500, 63])):
        q2, _, _, pos2 = _problem(b, s, h, c, r, page, lens, torch.bfloat16, seed=seed)
        q.copy_(q2)
        pos.copy_(pos2)
        tables.copy_(tables[torch.randperm(b, device=DEVICE)])
        graph.replay()
        assert _rel_err(out, _reference(q, cache, tables, pos, scale, c)) < TOL[torch.bfloat16]
