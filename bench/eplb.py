"""Expert rebalancing (EPLB's policies, `seekforge.engine.expert_placement`) on expert load the engine measured
over a workload: each MoE layer's max/mean load per expert-parallel rank before (experts split contiguously, no
copies) and after the placement, for several rank counts.

    python bench/eplb.py --model runs/tiny/final --json docs/benchmarks/eplb-tiny-cpu.json   # record and place
    python bench/eplb.py --model CKPT --record-load load.json    # record only: tokens per expert, by MoE layer
    python bench/eplb.py --load load.json --ranks 8 16 --redundant 16 --nodes 1 2            # place recorded load
    python bench/eplb.py --device cuda --dtype bfloat16 --model DeepSeek-V2-Lite --requests 512 --max-tokens 256 \\
        --ranks 8 16 32 --redundant 16 --json docs/benchmarks/eplb-16b-h100.json             # the 16b shape

The workload: the last --prompt-tokens tokens of --requests documents of the built-in math corpus (with the
checkpoint's tokenizer; random token ids with a random --preset model), greedy, --max-tokens each. The engine
returns each step's tokens per expert of every MoE layer (`LLM.expert_load`); the run adds them up over every
step, prefill and decode.

Simulation only: seekforge has no expert-parallel serving yet, so the placement is not applied to a running model;
a rank's load is the tokens its slots would receive, each of an expert's r copies taking 1/r of its tokens (what a
dispatcher that spreads an expert's tokens evenly over its copies gives).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from seekforge.configio import atomic_write_text
from seekforge.engine.expert_placement import POLICIES, contiguous, imbalance, rebalance


def record_load(llm, prompts, max_tokens: int) -> torch.Tensor:
    """Tokens per expert [MoE layers, experts] the engine routed over the workload (every step, prefill and decode)."""
    from seekforge.engine import SamplingParams
    from seekforge.model.moe import add_load

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    totals: dict[int, torch.Tensor] = {}
    for prompt in prompts:
        llm.add_request(prompt, params)
    while llm.has_unfinished_requests():
        llm.step()
        add_load(totals, llm.expert_load)
    return torch.stack([totals[layer].cpu() for layer in sorted(totals)])


def build_llm(args, **settings):
    """The engine over --model (a checkpoint), else over a random --preset model built on --device (seed --seed);
    `settings` are the engine's."""
    from seekforge.engine import LLM

    settings = dict(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len) | settings
    if args.model:
        return LLM(args.model, dtype=getattr(torch, args.dtype), device=args.device, **settings)
    from seekforge.model.config import ModelConfig
    from seekforge.model.transformer import Transformer, default_dtype

    torch.manual_seed(args.seed)
    with torch.device(args.device), default_dtype(getattr(torch, args.dtype)):
        model = Transformer(ModelConfig.preset(args.preset))
    return LLM(model.eval(), **settings)


def workload(args) -> tuple[torch.Tensor, dict]:
    llm = build_llm(args)
    cfg = llm.cfg
    if llm.tokenizer is not None:
        from seekforge.data.corpus import generate_documents

        # each document's last tokens: its start is the R1-Zero template, the same in every document
        prompts = [llm.tokenizer.encode(d)[-args.prompt_tokens:] for d in generate_documents(args.requests, args.seed)]
    else:
        g = torch.Generator().manual_seed(args.seed)
        prompts = torch.randint(0, cfg.vocab_size, (args.requests, args.prompt_tokens), generator=g).tolist()
    load = record_load(llm, prompts, args.max_tokens)
    meta = {"model": args.model or f"random {args.preset}", "device": args.device, "dtype": args.dtype,
            "requests": args.requests, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "experts": cfg.n_routed_experts, "top_k": cfg.n_activated_experts, "expert_groups": cfg.n_expert_groups}
    return load, meta


def place(load: torch.Tensor, ranks: int, redundant: int, groups: int, nodes: int, policy: str) -> dict:
    experts = load.shape[1]
    slots = experts + redundant
    placement = rebalance(load, slots, ranks, groups, nodes, policy)
    before = imbalance(contiguous(experts, ranks, load.shape[0]).rank_loads(load))
    after = imbalance(placement.rank_loads(load))
    return {"ranks": ranks, "nodes": nodes, "slots": slots, "redundant": redundant, "policy": placement.policy,
            "imbalance_before": before.tolist(), "imbalance_after": after.tolist(),
            "mean_before": before.mean().item(), "mean_after": after.mean().item(),
            "worst_before": before.max().item(), "worst_after": after.max().item(),
            "replicas": placement.replicas.tolist(), "physical_to_logical": placement.physical_to_logical.tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: a random --preset model)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--load", default=None, help="place recorded load (a --record-load file) instead of running")
    p.add_argument("--record-load", default=None, help="write the recorded load here and stop")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8], help="expert-parallel rank counts")
    p.add_argument("--redundant", type=int, default=None, help="redundant expert slots (default: one a rank)")
    p.add_argument("--nodes", type=int, nargs="+", default=[1], help="nodes the ranks span (hierarchical policy)")
    p.add_argument("--groups", type=int, default=None, help="expert groups (default: the model's)")
    p.add_argument("--policy", default="auto", choices=POLICIES)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    if args.load:
        data = json.loads(open(args.load).read())
        load, meta = torch.tensor(data["load"], dtype=torch.float64), data["workload"]
    else:
        load, meta = workload(args)
    if args.record_load:
        atomic_write_text(args.record_load, json.dumps({"workload": meta, "load": load.tolist()}))
        print(f"recorded {tuple(load.shape)} tokens per expert to {args.record_load}")
        return 0
    groups = args.groups or meta.get("expert_groups", 1)
    results = []
    print(f"{meta['model']}: {load.shape[0]} MoE layers x {load.shape[1]} experts, {int(load[0].sum())} routed "
          f"(token, expert) pairs a layer; max/mean load per rank, mean (worst) over layers")
    for nodes, ranks in ((n, r) for n in args.nodes for r in args.ranks if r % n == 0):
        redundant = ranks if args.redundant is None else args.redundant
        r = place(load, ranks, redundant, groups, nodes, args.policy)
        results.append(r)
        print(f"  {nodes} node(s), {ranks:3d} ranks, {r['slots']} slots ({r['policy']}): before "
              f"{r['mean_before']:.3f} ({r['worst_before']:.3f})  after {r['mean_after']:.3f} ({r['worst_after']:.3f})")
    if args.json:
        atomic_write_text(args.json, json.dumps({"workload": meta, "load": load.tolist(), "placements": results},
                                                indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
