"""Dynamic sparse heads (`EngineConfig.sparse_heads`, docs/EXPERIMENTAL.md): quality and decode speed at each
fraction of skipped heads, against the dense model, in one run.

    python bench/sparse_heads.py --model runs/quickstart/rl/final --data runs/quickstart/base/data \\
        --task-knobs '{"max_value": 9, "min_terms": 2, "max_terms": 4}' --threads 1 --repeats 5 \\
        --json docs/benchmarks/sparse-heads-cpu.json      # CPU: the figures in docs/EXPERIMENTAL.md
    python bench/sparse_heads.py --device cuda --dtype bfloat16 --cuda-graphs --speed-preset 16b \\
        --speed-overrides '{}' --batches 1 8 32 --context 4096 --new 65 --fractions 0 0.25 0.5 \\
        --json docs/benchmarks/sparse-heads-16b-h100.json   # GPU: the whole 16b model, random weights

Quality (a trained checkpoint with its tokenizer), at each fraction: the perplexity of every token of the held-out
split of its training data (--data, the run's prepared data), through the model's forward with every position's
query sparse (`Backend(keep_heads=k)`, as each decoded token is), and, as a control, with the same number of heads
kept at random per query (does the criterion beat chance?); and the greedy accuracy on --n held-out problems of
--task (test split, R1-Zero prompt, the task's own checker) on the engine with `sparse_heads` (prompts prefilled
with every head, each generated token with its kept heads).

Speed, at each fraction and batch size: decode tokens/s on the engine, over the steps of a greedy generation of
--new tokens a sequence after every prompt of --context tokens is prefilled, alternating the fractions over
--repeats rounds (the median counts; on the CPU also tokens per CPU-second of the process, steadier on a shared
machine), on the trained checkpoint and on a random --speed-preset model with --speed-overrides (by default cut to
2 layers with a small MoE, 8 experts, 2 active, 1 shared, keeping the preset's attention: its heads, latent and head
dims; '{}' keeps the whole preset). And the part the option changes, alone: one layer's absorbed decode attention
(W_UK, the attention over the paged cache, W_UV) of --speed-preset's MLA, dense and sparse.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptive_experts import perplexity  # noqa: E402

from seekforge.configio import atomic_write_text  # noqa: E402


def random_kept_heads(mla, q_nope, keep):
    """The control's choice: `keep` heads per query uniformly at random (the global generator), ascending."""
    scores = torch.rand(q_nope.shape[:-1], device=q_nope.device)
    return scores.topk(keep, dim=-1).indices.sort(dim=-1).values


def quality(model, llm_for, args) -> list[dict]:
    from seekforge.model.backend import Backend
    from seekforge.model.mla import MLA
    from seekforge.rl.evaluate import EvalConfig, evaluate

    rows = []
    h = model.cfg.n_heads
    for fraction in args.fractions:
        llm = llm_for(fraction)
        keep = llm.runner.keep_heads or h
        ppl = perplexity(model, Path(args.data), Backend(keep_heads=keep), args.seq_len, args.ppl_batches)
        criterion = MLA.kept_heads
        MLA.kept_heads = random_kept_heads  # the control: as many heads, chosen at random
        try:
            torch.manual_seed(args.seed)
            ppl_random = perplexity(model, Path(args.data), Backend(keep_heads=keep), args.seq_len, args.ppl_batches)
        finally:
            MLA.kept_heads = criterion
        acc = evaluate(llm, EvalConfig(task=args.task, task_knobs=args.task_knobs, n=args.n, seed=args.seed,
                                       max_tokens=args.max_tokens))
        rows.append({"fraction": fraction, "kept_heads": keep, "heads": h, "perplexity": round(ppl, 4),
                     "perplexity_random_heads": round(ppl_random, 4), "accuracy": acc["accuracy"],
                     "format": acc["format"], "completion_tokens": acc["completion_tokens"]})
        print(f"  sparse_heads={fraction} ({keep}/{h} heads): perplexity {ppl:.3f} (random heads {ppl_random:.3f}), "
              f"{args.task} greedy accuracy {acc['accuracy']:.3f} (format {acc['format']:.2f})", flush=True)
    return rows


def decode_rate(llm, prompts: list[list[int]], new: int) -> tuple[float, float]:
    """Decode tokens per second of wall time and of this process's CPU time, in a greedy generation of `new` tokens
    a prompt: the engine's steps from the one after which every prompt is prefilled (each sequence has its first
    token) to the last, and the tokens they made. On a CPU shared with other work the CPU time is the steadier
    measure of the work done."""
    from seekforge import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    for prompt in prompts:
        llm.add_request(prompt, params)
    sched = llm.scheduler
    while sched.waiting or any(len(s.token_ids) == s.num_prompt_tokens for s in sched.running):
        llm.step()
    made = sum(len(s.token_ids) - s.num_prompt_tokens for s in sched.running)
    start, cpu = time.perf_counter(), time.process_time()
    while llm.has_unfinished_requests():
        llm.step()
    tokens = len(prompts) * new - made
    return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu)


def speed(model, args, name: str) -> list[dict]:
    from seekforge.engine import LLM

    cfg = model.cfg
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    context = min(args.context, cfg.max_seq_len - args.new)  # within the model's positions
    for batch in args.batches:
        prompts = torch.randint(2, cfg.vocab_size, (batch, context), generator=g).tolist()
        bs = 64 if model.embed.weight.is_cuda else 16  # the engine's default block size
        blocks = batch * -(-(context + args.new) // bs) + 1
        llms = {f: LLM(model, max_num_seqs=batch, max_model_len=context + args.new, num_blocks=blocks,
                       block_size=bs, sparse_heads=f, cuda_graphs=args.cuda_graphs) for f in args.fractions}
        rates = {f: [] for f in args.fractions}
        decode_rate(llms[args.fractions[0]], prompts, 4)  # warm up
        for r in range(args.repeats):  # alternate the order, so that a neighbour's load falls on all alike
            for f in (args.fractions if r % 2 == 0 else args.fractions[::-1]):
                rates[f].append(decode_rate(llms[f], prompts, args.new))
        dense = [statistics.median(r[i] for r in rates[args.fractions[0]]) for i in (0, 1)]
        for f in args.fractions:
            wall, cpu = (statistics.median(r[i] for r in rates[f]) for i in (0, 1))
            rows.append({"model": name, "batch": batch, "context": context, "fraction": f,
                         "kept_heads": llms[f].runner.keep_heads or cfg.n_heads, "heads": cfg.n_heads,
                         "decode_tokens_per_s": round(wall, 2), "speedup": round(wall / dense[0], 4),
                         "decode_tokens_per_cpu_s": round(cpu, 2), "speedup_cpu_time": round(cpu / dense[1], 4),
                         "each_repeat_wall_cpu": [[round(x, 2) for x in r] for r in rates[f]]})
            print(f"  {name}, batch {batch}, sparse_heads={f}: {wall:.1f} decode tok/s ({wall / dense[0]:.3f}x "
                  f"dense), {cpu:.1f} tok per CPU-s ({cpu / dense[1]:.3f}x)", flush=True)
    return rows


def attention_speed(args) -> list[dict]:
    """The part sparse heads change, alone: one layer's absorbed decode attention (W_UK, the attention over the paged
    cache, W_UV) of --speed-preset's MLA, one query a sequence over --context cached tokens, dense and at each
    fraction; the median time of a call over --repeats rounds of 20 calls (on the CPU, this process's CPU time:
    steadier than wall time on a shared machine)."""
    from seekforge import ops
    from seekforge.engine.config import EngineConfig
    from seekforge.engine.paged_backend import absorbed_attention
    from seekforge.model.config import ModelConfig
    from seekforge.model.mla import MLA

    cfg = ModelConfig.preset(args.speed_preset)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    mla = MLA(cfg).to(dev, dtype)
    bs = 64 if dev.type == "cuda" else 16
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    clock = time.perf_counter if dev.type == "cuda" else time.process_time
    rows = []
    for batch in args.batches:
        per_seq = -(-args.context // bs)
        cache = torch.randn(batch * per_seq, bs, cfg.kv_lora_rank + cfg.qk_rope_head_dim, device=dev, dtype=dtype)
        tables = torch.arange(batch * per_seq, device=dev).view(batch, per_seq)
        plan = ops.plan_paged_attention(tables, torch.full((batch, 1), args.context - 1, device=dev), bs,
                                        args.context)
        q_nope = torch.randn(batch, cfg.n_heads, cfg.qk_nope_head_dim, device=dev, dtype=dtype)
        q_pe = torch.randn(batch, cfg.n_heads, cfg.qk_rope_head_dim, device=dev, dtype=dtype)
        def call(keep):
            heads = None if keep is None else mla.kept_heads(q_nope, keep)
            absorbed_attention(mla, cache, ops.latent_query(q_nope, q_pe, mla.absorbed_weights()[0]), plan, 1,
                               heads=heads)

        keeps = {f: EngineConfig(sparse_heads=f).kept_heads(cfg.n_heads) for f in args.fractions}
        seconds = {f: [] for f in args.fractions}
        with torch.inference_mode():
            for r in range(args.repeats + 1):  # the first round warms up
                for f in (args.fractions if r % 2 == 0 else args.fractions[::-1]):
                    sync()
                    start = clock()
                    for _ in range(20):
                        call(keeps[f])
                    sync()
                    if r:
                        seconds[f].append((clock() - start) / 20)
        dense = statistics.median(seconds[args.fractions[0]])
        for f in args.fractions:
            med = statistics.median(seconds[f])
            rows.append({"shape": args.speed_preset, "batch": batch, "context": args.context, "fraction": f,
                         "kept_heads": keeps[f] or cfg.n_heads,
                         "heads": cfg.n_heads, "microseconds": round(med * 1e6, 1), "speedup": round(dense / med, 4)})
            print(f"  {args.speed_preset} attention, batch {batch}, context {args.context}, sparse_heads={f}: "
                  f"{med * 1e6:.0f} us a layer ({dense / med:.3f}x dense)", flush=True)
    return rows


SMALL = {"n_layers": 2, "n_dense_layers": 0, "vocab_size": 4096, "n_routed_experts": 8, "n_activated_experts": 2,
         "n_shared_experts": 1, "n_expert_groups": 1, "n_limited_groups": 1}


def speed_model(args):
    """A random --speed-preset model with --speed-overrides, without MTP modules."""
    from seekforge.model.config import ModelConfig
    from seekforge.model.transformer import Transformer, default_dtype

    cfg = ModelConfig.preset(args.speed_preset).replace(**{"n_mtp_modules": 0, **args.speed_overrides,
                                                           "max_seq_len": max(args.context + args.new, 1024)})
    torch.manual_seed(args.seed)
    with torch.device(args.device), default_dtype(getattr(torch, args.dtype)):
        model = Transformer(cfg)
    return model.eval()


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    q = result.get("quality")
    if q:
        x = [100 * r["fraction"] for r in q]
        axes[0].plot(x, [r["perplexity"] for r in q], "o-", label="content-query norm criterion")
        axes[0].plot(x, [r["perplexity_random_heads"] for r in q], "s--", label="random heads (control)")
        axes[0].set(xlabel="heads skipped per token (%)", ylabel="held-out perplexity", title="Perplexity")
        axes[0].legend()
        axes[1].plot(x, [100 * r["accuracy"] for r in q], "o-")
        axes[1].set(xlabel="heads skipped per token (%)", ylabel="greedy accuracy (%)",
                    title=f"Held-out {result['args']['task']} accuracy (n={result['args']['n']})", ylim=(0, 100))
    key, what = ("speedup_cpu_time", "CPU time") if result["device"] == "cpu" else ("speedup", "wall time")
    for name in dict.fromkeys(r["model"] for r in result["speed"]):
        for batch in dict.fromkeys(r["batch"] for r in result["speed"] if r["model"] == name):
            rows = [r for r in result["speed"] if r["model"] == name and r["batch"] == batch]
            axes[2].plot([100 * r["fraction"] for r in rows], [r[key] for r in rows], "o-",
                         label=f"{name}, batch {batch}")
    axes[2].axhline(1.0, color="grey", lw=0.8)
    axes[2].set(xlabel="heads skipped per token (%)", ylabel=f"decode tokens/s vs dense ({what})",
                title=f"Decode speed ({result['card']})")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="trained checkpoint (quality, and speed on it); none: speed alone")
    p.add_argument("--data", default=None, help="prepared data with a val split (default: ../data beside --model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75],
                   help="sparse_heads values, 0 (dense) first")
    p.add_argument("--task", default="chain_sum")
    p.add_argument("--task-knobs", type=json.loads, default={}, help="the task's knobs, JSON (the checkpoint's run's)")
    p.add_argument("--n", type=int, default=200, help="held-out problems for the accuracy at each fraction")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--ppl-batches", type=int, default=100, help="batches of 8 windows at most (default: the split)")
    p.add_argument("--speed-preset", default="16b", help="the random speed model's preset")
    p.add_argument("--speed-overrides", type=json.loads, default=SMALL,
                   help="its config fields set over the preset, JSON (default: 2 layers, a small MoE)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--context", type=int, default=1024,
                   help="prompt tokens of the speed runs (at most the model's positions less --new)")
    p.add_argument("--new", type=int, default=33, help="tokens generated a sequence in the speed runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here, and the plot beside it (.png)")
    args = p.parse_args(argv)
    if args.fractions[0] != 0:
        p.error("--fractions must start with 0, the dense model the others are measured against")
    if args.threads:
        torch.set_num_threads(args.threads)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or None
    result = {"args": vars(args), "commit": commit, "torch": torch.__version__, "device": args.device,
              "threads": torch.get_num_threads(),
              "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "speed": []}
    if args.model:
        from seekforge.engine import LLM
        from seekforge.model.hf import from_pretrained

        model = from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device).eval()
        if not args.skip_quality:
            args.data = args.data or str(Path(args.model).resolve().parent / "data")
            print("quality at each fraction:", flush=True)
            result["quality"] = quality(model, lambda f: LLM(model, tokenizer=args.model, sparse_heads=f), args)
        print("decode speed, trained checkpoint:", flush=True)
        result["speed"] += speed(model, args, f"trained {model.cfg.n_heads}-head checkpoint")
    print(f"one layer's decode attention alone, {args.speed_preset}'s MLA:", flush=True)
    result["attention"] = attention_speed(args)
    model = speed_model(args)
    label = f"random {args.speed_preset} ({model.cfg.n_layers} layers, {model.cfg.n_routed_experts} experts)"
    print(f"decode speed, {label}:", flush=True)
    result["speed"] += speed(model, args, label)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
        plot(result, Path(args.json).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
