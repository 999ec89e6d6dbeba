"""`seekforge eval CKPT --task NAME --n N --seed S [--k K]`: held-out accuracy (and pass@k) as one JSON line."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="held-out task accuracy (greedy) and pass@k on the inference engine")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory in Hugging Face layout with its tokenizer")
    p.add_argument("--task", required=True, help="task name")
    p.add_argument("--n", type=int, default=500, help="held-out problems (default 500)")
    p.add_argument("--seed", type=int, default=0, help="which held-out problems (default 0)")
    p.add_argument("--k", type=int, default=1, help="report pass@k (k > 1 samples each problem)")
    p.add_argument("--samples", type=int, help="completions per problem for pass@k (>= k; default k)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for pass@k (default 1)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--template", default="r1_zero", choices=["r1_zero", "chat"])
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--device", default="auto")
    p.add_argument("--knobs", nargs="+", default=[], metavar="KNOB=VALUE",
                   help="task difficulty knobs, e.g. --knobs max_value=9 max_terms=3")
    p.set_defaults(func=run)


def parse_knobs(items: list[str]) -> dict:
    """Task knobs from `key=value` words, values read as YAML scalars (3 is an int, +- a string)."""
    from seekforge.configio import parse_override
    from seekforge.errors import ConfigError

    knobs = {}
    for item in items:
        path, value = parse_override(item)
        if len(path) != 1:
            raise ConfigError(f"task knob '{item}': write it as knob=value")
        knobs[path[0]] = value
    return knobs


def run(args) -> int:
    import json

    from seekforge.rl.evaluate import EvalConfig, evaluate, load_llm

    cfg = EvalConfig(task=args.task, task_knobs=parse_knobs(args.knobs), n=args.n, seed=args.seed, split=args.split,
                     k=args.k, samples=args.samples, temperature=args.temperature, max_tokens=args.max_tokens,
                     template=args.template)
    print(json.dumps(evaluate(load_llm(args.checkpoint, args.device), cfg)))
    return 0
