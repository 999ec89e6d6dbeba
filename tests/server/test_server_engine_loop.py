"""The server's engine driver with a real engine in-process: a step that raises fails only the requests in
flight, with an error they can report, and the loop goes on serving."""

import asyncio
import threading
import time

import pytest
import torch

pytest.importorskip("prometheus_client")

import seekforge  # noqa: E402
from seekforge.engine import LLM, QueueFullError, SamplingParams  # noqa: E402
from seekforge.model.moe import MoE  # noqa: E402
from seekforge.server.engine_loop import EngineFailure, EngineLoop, Generation  # noqa: E402
from seekforge.server.metrics import ServerMetrics  # noqa: E402


def make_llm() -> LLM:
    torch.manual_seed(0)
    llm = LLM(seekforge.Transformer(seekforge.ModelConfig.preset("tiny")), max_num_seqs=2, max_waiting=2,
              kv_cache_memory=8 << 20)
    real_step, calls = llm.step, [0]

    def step():  # the first step after start-up raises, as a kernel or an out-of-memory error would
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("injected failure")
        return real_step()

    llm.step = step
    return llm


def test_failed_step_fails_requests_in_flight_and_the_loop_goes_on():
    metrics = ServerMetrics("tiny")
    loop = EngineLoop(make_llm, metrics)
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)

    async def main():
        loop.start(asyncio.get_running_loop())
        assert await asyncio.to_thread(loop.wait_ready, 120) and loop.state == "ready"
        doomed = Generation(loop, [[1, 2, 3], [4, 5]], greedy)
        await doomed.admit()
        with pytest.raises(EngineFailure, match="injected failure"):
            async for _ in doomed:
                pass
        doomed.close()
        after = Generation(loop, [[1, 2, 3]], greedy)
        await after.admit()
        outs = [out async for _, out in after]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 5
        # a full waiting queue refuses at admission and admits nothing of the request
        with pytest.raises(QueueFullError):
            await Generation(loop, [[1]], SamplingParams(n=3, max_tokens=1)).admit()
        await asyncio.to_thread(loop.stop)

    asyncio.run(main())
    value = metrics.registry.get_sample_value
    assert value("seekforge_engine_errors_total") == 1
    assert value("seekforge_request_finished_total", {"finish_reason": "error"}) == 2
    assert value("seekforge_requests_running") == 0 and value("seekforge_requests_waiting") == 0


def test_expert_load_metric_counts_every_choice_of_the_gates():
    """The server's tokens per expert, summed from the load each step returns, equal a count of the experts the
    gates chose while serving (hooks on the gates, the same inputs). Async scheduling on: the step that settles
    the last one in flight runs no forward of its own and must add nothing."""
    torch.manual_seed(0)
    model = seekforge.Transformer(seekforge.ModelConfig.preset("tiny"))
    n_experts, counting, chosen = model.cfg.n_routed_experts, threading.Event(), {}
    for layer, block in enumerate(model.layers):
        if isinstance(block.ffn, MoE):
            def count(gate, args, out, layer=layer):
                if counting.is_set():
                    chosen[layer] = chosen.get(layer, 0) + torch.bincount(out[1].flatten(), minlength=n_experts)
            block.ffn.gate.register_forward_hook(count)
    metrics = ServerMetrics("tiny")
    loop = EngineLoop(lambda: LLM(model, max_num_seqs=4, kv_cache_memory=8 << 20, async_scheduling=True), metrics)

    def served() -> dict[int, list[float]]:
        value = metrics.registry.get_sample_value
        return {layer: [value("seekforge_expert_tokens_total", {"layer": str(layer), "expert": str(e)}) or 0.0
                        for e in range(n_experts)] for layer in chosen}

    async def main():
        loop.start(asyncio.get_running_loop())
        assert await asyncio.to_thread(loop.wait_ready, 120) and loop.state == "ready"
        counting.set()  # from here on: the warm-up generation before readiness is no served traffic
        gen = Generation(loop, [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]],
                         SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        await gen.admit()
        assert [out async for _, out in gen][-1].finished
        want = {layer: c.tolist() for layer, c in chosen.items()}
        deadline = time.monotonic() + 10  # the idle loop publishes its sums within a second
        while served() != want and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.to_thread(loop.stop)
        return want

    want = asyncio.run(main())
    assert sorted(want) == list(range(model.cfg.n_dense_layers, model.cfg.n_layers))
    assert served() == want


def test_adaptive_experts_metrics_and_request_minimum():
    """Under a queue (one slot, four requests) the controller lowers the tiny model's k from 2 to 1: the gauge
    shows the k, the counter the engine time at each k. A request's `min_experts` field reaches its
    SamplingParams, and a bad one is refused by the wire format."""
    from pydantic import ValidationError

    from seekforge.server.protocol import CompletionRequest

    assert CompletionRequest(model="m", prompt="hi", min_experts=2).sampling_kwargs()["min_experts"] == 2
    assert CompletionRequest(model="m", prompt="hi").sampling_kwargs()["min_experts"] is None
    with pytest.raises(ValidationError, match="min_experts"):
        CompletionRequest(model="m", prompt="hi", min_experts=0)

    torch.manual_seed(0)
    metrics = ServerMetrics("tiny")
    loop = EngineLoop(lambda: LLM(seekforge.Transformer(seekforge.ModelConfig.preset("tiny")), max_num_seqs=1,
                                  kv_cache_memory=8 << 20, adaptive_experts=True), metrics)
    value = metrics.registry.get_sample_value

    async def main():
        loop.start(asyncio.get_running_loop())
        assert await asyncio.to_thread(loop.wait_ready, 120) and loop.state == "ready"
        gen = Generation(loop, [[1, 2, 3], [4, 5], [6, 7, 8], [9]],
                         SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        await gen.admit()
        assert [out async for _, out in gen][-1].finished
        deadline = time.monotonic() + 10  # the idle loop publishes the engine's figures within a second
        while not value("seekforge_routed_experts_seconds_total", {"k": "1"}) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.to_thread(loop.stop)

    asyncio.run(main())
    assert value("seekforge_routed_experts") in (1.0, 2.0)
    assert value("seekforge_routed_experts_seconds_total", {"k": "1"}) > 0
    assert value("seekforge_routed_experts_seconds_total", {"k": "2"}) > 0
