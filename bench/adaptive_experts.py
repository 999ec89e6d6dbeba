"""Adaptive expert activation (`seekforge.engine.adaptive_topk`): its quality cost at each routed top-k, and an
open-loop load test with the controller off and on, in one run.

    python bench/adaptive_experts.py --model runs/tiny16/final --json docs/benchmarks/adaptive-experts-tiny-cpu.json
    python bench/adaptive_experts.py --device cuda --dtype bfloat16 --model DeepSeek-V2-Lite --cuda-graphs \\
        --max-num-seqs 64 --rates 4 8 16 32 64 --stage-seconds 30 --json docs/benchmarks/adaptive-experts-16b-h100.json
    python bench/adaptive_experts.py --device cuda --dtype bfloat16 --preset 16b --cuda-graphs --max-num-seqs 64 \\
        --rates 4 8 16 32 64 --stage-seconds 30     # random 16b weights: the load test alone

Quality (a trained checkpoint with its tokenizer): at each k of the levels, the model's perplexity on the
held-out split of its training data (--data, the run's prepared data; default: the `data` folder beside the
checkpoint), every token of --ppl-batches windows of --seq-len, through the model's forward at that k; and the
greedy accuracy on --n held-out problems of --task (test split, R1-Zero prompt, scored by the task's own checker),
on the engine held at that k.

Load test: requests arrive open loop (Poisson, seeded; the same arrival times for both runs), at each rate of
--rates for --stage-seconds, whatever the engine's backlog; then the engine drains. Each request is a held-out
problem of --task (random token ids with a random --preset model), greedy, up to --max-tokens. Measured per
request from its arrival: time to first token and end-to-end latency (p50/p95/p99), per stage and overall; output
tokens/s over the run; and, with a tokenizer, the accuracy of the answers served, so the cost of the lowered k
is measured in the same run. With the controller on: the engine time and steps at each k.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eplb import build_llm  # noqa: E402

from seekforge.configio import atomic_write_text  # noqa: E402


def engine(args, adaptive: bool):
    return build_llm(args, cuda_graphs=args.cuda_graphs, adaptive_experts=adaptive,
                     adaptive_expert_levels=args.levels, adaptive_step_latency=args.step_latency)


def hold(llm, k: int) -> None:
    """Pin the engine's controller at level k (it never moves again)."""
    c = llm.adaptive
    c.level, c.patience_down, c.patience_up = c.levels.index(k), 10**9, 10**9


def knobs(args) -> dict:
    from seekforge.commands.eval import parse_knobs

    return parse_knobs(args.knobs)


def perplexity(model, data: Path, backend, seq_len: int, batches: int) -> float:
    """Perplexity of every token of `batches` batches of 8 held-out windows of `seq_len`, the model's forward run by
    `backend` (seekforge.model.backend.Backend)."""
    from seekforge.data.loader import eval_batches

    nll, count = 0.0, 0
    device = model.embed.weight.device
    with torch.inference_mode():
        for batch in eval_batches(data, seq_len, 8, batches):
            logits = model(batch["input_ids"].to(device), backend=backend).float()
            labels = batch["labels"].to(device)
            nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
            count += labels.numel()
    return math.exp(nll / count)


def quality(llm, args) -> list[dict]:
    from seekforge.model.backend import Backend
    from seekforge.rl.evaluate import EvalConfig, evaluate

    data = Path(args.data) if args.data else Path(args.model).resolve().parent / "data"
    rows = []
    for k in llm.adaptive.levels:
        hold(llm, k)
        ppl = (perplexity(llm.model, data, Backend(topk=k), args.seq_len, args.ppl_batches)
               if (data / "meta.json").is_file() else None)
        acc = evaluate(llm, EvalConfig(task=args.task, task_knobs=knobs(args), n=args.n, seed=args.seed,
                                       max_tokens=args.max_tokens))
        rows.append({"k": k, "perplexity": ppl, "accuracy": acc["accuracy"], "format": acc["format"],
                     "completion_tokens": acc["completion_tokens"]})
        print(f"  k={k}: perplexity {ppl if ppl is None else round(ppl, 3)}, {args.task} accuracy "
              f"{acc['accuracy']:.3f} (format {acc['format']:.2f})")
    return rows


def arrivals(rates: list[float], stage_seconds: float, seed: int) -> list[tuple[float, int]]:
    """(arrival time, stage) of every request: Poisson at each rate in turn."""
    rng, out, t0 = random.Random(seed), [], 0.0
    for stage, rate in enumerate(rates):
        t = t0 + rng.expovariate(rate)
        while t < t0 + stage_seconds:
            out.append((t, stage))
            t += rng.expovariate(rate)
        t0 += stage_seconds
    return out


def workload(llm, args, n: int):
    """n (prompt ids, row or None) and the sampling params of the load test."""
    from seekforge.engine import SamplingParams

    if llm.tokenizer is None:
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, llm.cfg.vocab_size, (n, args.prompt_tokens), generator=g).tolist()
        return [(p, None) for p in ids], SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    from seekforge.rl.rollout import answer_stop_ids, render_prompt
    from seekforge.tasks import get_task

    rows = get_task(args.task, **knobs(args)).rows("test", n, args.seed + 1)
    prompts = [llm.tokenizer.encode_prompt(render_prompt(r.prompt, "r1_zero", llm.tokenizer)) for r in rows]
    return list(zip(prompts, rows)), SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                                    stop_token_ids=answer_stop_ids(llm.tokenizer))


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    t = torch.tensor(values, dtype=torch.float64)
    return {f"p{q}": round(torch.quantile(t, q / 100).item(), 4) for q in (50, 95, 99)} | {"max": round(max(values), 4)}


def load_test(llm, args) -> dict:
    """One open-loop run: arrivals as scheduled, the engine stepped as fast as it goes."""
    schedule = arrivals(args.rates, args.stage_seconds, args.seed)
    requests, params = workload(llm, args, len(schedule))
    rewards = None
    if llm.tokenizer is not None:
        from seekforge.rewards import RewardSet

        rewards = RewardSet("accuracy")
    first, done, tokens, correct = {}, {}, 0, []
    start = time.perf_counter()
    pending = list(enumerate(schedule))
    while pending or llm.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0][1][0] <= now:
            i, _ = pending.pop(0)
            llm.add_request(requests[i][0], params, request_id=str(i))
        if not llm.has_unfinished_requests():
            time.sleep(max(0.0, pending[0][1][0] - now))
            continue
        for out in llm.step():
            i, t = int(out.request_id), time.perf_counter() - start
            if out.outputs[0].token_ids and i not in first:
                first[i] = t
            if out.finished:
                done[i] = t
                tokens += len(out.outputs[0].token_ids)
                row = requests[i][1]
                if rewards is not None:
                    from seekforge.rl.rollout import Completion

                    c = out.outputs[0]
                    text = llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                    score = rewards.score("", Completion(i, list(c.token_ids), text, False), row)["accuracy"]
                    correct.append(score == 1.0)
    wall = time.perf_counter() - start
    if rewards is not None:
        rewards.close()
    result = {"requests": len(schedule), "wall_s": round(wall, 3), "output_tokens": tokens,
              "output_tokens_per_s": round(tokens / wall, 2),
              "ttft_s": percentiles([first[i] - schedule[i][0] for i in first]),
              "latency_s": percentiles([done[i] - schedule[i][0] for i in done]), "stages": []}
    for stage, rate in enumerate(args.rates):
        ids = [i for i, (_, s) in enumerate(schedule) if s == stage]
        result["stages"].append({"rate": rate, "requests": len(ids),
                                 "latency_s": percentiles([done[i] - schedule[i][0] for i in ids]),
                                 "ttft_s": percentiles([first[i] - schedule[i][0] for i in ids if i in first])})
    if correct:
        result["accuracy"] = sum(correct) / len(correct)
    if llm.adaptive is not None:
        result["adaptive"] = llm.adaptive.stats()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: a random --preset model)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data", default=None, help="prepared data with a val split (default: ../data beside --model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--levels", type=int, nargs="+", default=None, help="routed top-k levels (default: the engine's)")
    p.add_argument("--step-latency", type=float, default=None, help="the controller's step-latency mark, seconds")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--task", default="chain_sum")
    p.add_argument("--knobs", nargs="+", default=[], metavar="KNOB=VALUE",
                   help="the task's difficulty knobs, as the model was trained on them (e.g. max_value=9 max_terms=4)")
    p.add_argument("--n", type=int, default=100, help="held-out problems for the accuracy at each k")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--ppl-batches", type=int, default=16)
    p.add_argument("--rates", type=float, nargs="+", default=[1, 2, 4, 8], help="requests/s, one stage each")
    p.add_argument("--stage-seconds", type=float, default=10.0)
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length with a random --preset model")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="load-test runs of each side, alternating")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    result = {"args": vars(args), "torch": torch.__version__, "device": args.device,
              "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    llm = engine(args, adaptive=True)
    result["levels"] = list(llm.adaptive.levels)
    if llm.tokenizer is not None and not args.skip_quality:
        print("quality at each k:")
        result["quality"] = quality(llm, args)
    result["load"] = {"off": [], "on": []}
    # off and on alternate (off first, then on first, ...), so that a neighbour's load on a shared machine
    # falls on both alike
    for repeat in range(args.repeats):
        for name in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
            llm = None  # the last engine goes before the next is built: two 16b engines do not fit an 80 GB card
            gc.collect()
            llm = engine(args, name == "on")
            r = load_test(llm, args)
            result["load"][name].append(r)
            lat = r["latency_s"]
            print(f"load test {repeat + 1}, adaptive {name}: {r['requests']} requests, {r['output_tokens_per_s']} "
                  f"tok/s, latency p50 {lat['p50']} p95 {lat['p95']} p99 {lat['p99']} max {lat['max']} s"
                  + (f", accuracy {r['accuracy']:.3f}" if "accuracy" in r else "")
                  + (f", steps at k {r['adaptive']['steps_at_k']}" if "adaptive" in r else ""))
    reduction = {}
    for q in ("p50", "p99", "max"):
        off, on = (statistics.median(r["latency_s"][q] for r in result["load"][name]) for name in ("off", "on"))
        reduction[q] = round(1 - on / off, 4)
    result["latency_reduction_median_over_repeats"] = reduction
    print(f"latency reduction (1 - on / off, medians over repeats): p50 {reduction['p50']:.1%}, p99 "
          f"{reduction['p99']:.1%}, max {reduction['max']:.1%} (the seed claims 62% lower peak latency)")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
