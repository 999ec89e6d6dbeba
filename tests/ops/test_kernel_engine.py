"""The engine with its Triton kernels — the MLA decode, router, fused MoE and GEMV kernels (the input norm fused
into one), each a custom op inside the compiled blocks — run on the CPU under Triton's interpreter (the engine's
`kernels="triton"`, `seekforge.ops.backend`), so that CI, which has no GPU, checks how they are wired: the plain
engine's greedy tokens, every kernel called, no graph break in the compiled blocks.
"""

import pytest
import torch
from triton_setup import CUDA, HALF, patch_interpreter

pytest.importorskip("triton")
patch_interpreter()

from seekforge import LLM, SamplingParams  # noqa: E402
from seekforge import ops  # noqa: E402
from seekforge.model import ModelConfig, Transformer  # noqa: E402
from seekforge.ops.triton import mla_decode as mla_decode_module  # noqa: E402
from seekforge.ops.triton import tuning  # noqa: E402


@pytest.mark.skipif(CUDA, reason="the CUDA tests run these kernels natively")
def test_cuda_paths_on_the_cpu_give_the_plain_engines_tokens(monkeypatch):
    from torch._dynamo.utils import counters

    # greedy routing over one group: what the Triton router takes
    cfg = ModelConfig.preset("tiny").replace(n_mtp_modules=0, n_expert_groups=1, n_limited_groups=1,
                                             topk_method="greedy")
    torch.manual_seed(0)
    model = Transformer(cfg).to(HALF).eval()
    prompts = [torch.randint(2, cfg.vocab_size, (n,)).tolist() for n in (20, 25)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = [o.token_ids for o in LLM(model, max_num_seqs=4, max_model_len=256, kernels="torch").generate(prompts,
                                                                                                           params)]
    decodes = []  # without CUDA graphs decode steps call the MLA kernel outside any op: a spy counts the calls
    kernel = mla_decode_module.paged_mla_decode_triton
    monkeypatch.setattr(mla_decode_module, "paged_mla_decode_triton",
                        lambda *args: decodes.append(1) or kernel(*args))
    # decode's MoE (one block a pair) in its GEMV form, which the GPU keeps where it times faster (the MMA tiles,
    # the interpreter's choice, have tests of their own)
    counters.clear()
    with tuning.tuning(forced={"moe_form": "gemvs"}) as chosen:
        llm = LLM(model, max_num_seqs=4, max_model_len=256, compile=True, kernels="triton")
        with torch.profiler.profile() as prof:
            got = [o.token_ids for o in llm.generate(prompts, params)]
    ran = {e.key for e in prof.key_averages()}
    assert {"seekforge::residual_logits", "seekforge::fused_moe", "seekforge::gemv",
            "seekforge::norm_gemv"} <= ran and decodes
    assert chosen.choices["moe_form"]  # decode's one-block MoE calls ran the GEMV form
    assert not counters["graph_break"]
    assert got == plain


@pytest.mark.skipif(CUDA, reason="the CUDA tests run these kernels natively")
def test_the_captured_steps_load_counts_the_kernels_choice_for_the_sequences_rows():
    """What a decode graph captures (`_graph_step`, on the CPU) with the Triton router and fused MoE: the load it
    returns per MoE layer counts the experts chosen for the sequences' rows, not for the graph's padding rows, as
    the gates choose them in the plain packed forward of the same step."""
    from seekforge.engine.model_runner import Chunk

    cfg = ModelConfig.preset("tiny").replace(n_mtp_modules=0, n_expert_groups=1, n_limited_groups=1,
                                             topk_method="greedy", n_layers=2)
    torch.manual_seed(0)
    llm = LLM(Transformer(cfg).to(HALF).eval(), max_num_seqs=4, max_model_len=32)
    for n in (5, 9, 3):
        llm.add_request(torch.randint(2, cfg.vocab_size, (n,)).tolist(), SamplingParams(temperature=0, max_tokens=4))
    llm.step()  # prefill: the cache now holds the prompts
    chunks = [Chunk(s.block_table, s.num_computed, [s.token_ids[-1]]) for s in llm.scheduler.running]
    runner = llm.runner
    with torch.inference_mode():
        plain = runner.forward(runner.prepare(chunks))[1]
        runner._allocate_static(4)
        runner._fill_static(chunks, 4)  # three sequences and one padding row
        # the routing kernels only: the rest is slow here
        with torch.profiler.profile() as prof, ops.backend("triton", ops=["route", "moe"]):
            loads = runner._graph_step(4)[1]
    assert "seekforge::fused_moe" in {e.key for e in prof.key_averages()}
    assert {k: v.tolist() for k, v in loads.items()} == {k: v.tolist() for k, v in plain.items()}
    assert all(load.sum() == 3 * cfg.n_activated_experts for load in loads.values())


@pytest.mark.skipif(CUDA, reason="the CUDA tests run these kernels natively")
def test_a_captured_step_at_a_lowered_topk_runs_the_fused_experts_at_that_k():
    """A decode step captured at another routed top-k than the gate's (adaptive experts): the Triton router
    (which chooses the gate's k) steps aside, the gate chooses k experts a token and the fused MoE runs that choice;
    the logits and the load are the plain packed forward's at the same k."""
    from seekforge.engine.model_runner import Chunk

    cfg = ModelConfig.preset("tiny").replace(n_mtp_modules=0, n_expert_groups=1, n_limited_groups=1,
                                             topk_method="greedy", n_layers=2, n_activated_experts=3)
    torch.manual_seed(0)
    llm = LLM(Transformer(cfg).to(HALF).eval(), max_num_seqs=4, max_model_len=32)
    for n in (5, 9, 3):
        llm.add_request(torch.randint(2, cfg.vocab_size, (n,)).tolist(), SamplingParams(temperature=0, max_tokens=4))
    llm.step()
    chunks = [Chunk(s.block_table, s.num_computed, [s.token_ids[-1]]) for s in llm.scheduler.running]
    runner = llm.runner
    with torch.inference_mode():
        hidden, plain = runner.forward(runner.prepare(chunks), 1)
        want = runner.logits(hidden)
        runner._allocate_static(4)
        runner._fill_static(chunks, 4)
        with torch.profiler.profile() as prof, ops.backend("triton", ops=["route", "moe"]):
            logits, loads = runner._graph_step(4, topk=1)[:2]
    assert "seekforge::fused_moe" in {e.key for e in prof.key_averages()}
    assert {k: v.tolist() for k, v in loads.items()} == {k: v.tolist() for k, v in plain.items()}
    assert all(load.sum() == 3 for load in loads.values())
    torch.testing.assert_close(logits[:3], want, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(CUDA, reason="the CUDA tests run these kernels natively")
def test_sparse_heads_through_the_decode_kernel_give_the_plain_engines_tokens(monkeypatch):
    """Dynamic sparse heads (2 of 4 heads a decoded token) with the Triton kernels under the interpreter: the MLA
    decode kernel runs on the kept heads only (q of 2 heads) and the greedy tokens are the PyTorch engine's."""
    cfg = ModelConfig.preset("tiny").replace(n_mtp_modules=0, n_expert_groups=1, n_limited_groups=1,
                                             topk_method="greedy", n_layers=2)
    torch.manual_seed(0)
    model = Transformer(cfg).to(HALF).eval()
    prompts = [torch.randint(2, cfg.vocab_size, (n,)).tolist() for n in (9, 14)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    plain = [o.token_ids for o in LLM(model, max_num_seqs=4, max_model_len=64, kernels="torch",
                                      sparse_heads=0.5).generate(prompts, params)]
    heads = []
    kernel = mla_decode_module.paged_mla_decode_triton
    monkeypatch.setattr(mla_decode_module, "paged_mla_decode_triton",
                        lambda q, *args: heads.append(q.shape[2]) or kernel(q, *args))
    got = [o.token_ids for o in LLM(model, max_num_seqs=4, max_model_len=64, kernels="triton",
                                    sparse_heads=0.5).generate(prompts, params)]
    assert heads and set(heads) == {2}
    assert got == plain
