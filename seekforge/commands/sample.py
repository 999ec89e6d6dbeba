"""`seekforge sample --from CKPT --task NAME --n-per-prompt K --keep-correct --out FILE.jsonl`: rejection sampling."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="sample a checkpoint on task problems; keep the correct answers as SFT data")
    p.add_argument("--from", dest="init_from", required=True, metavar="CKPT",
                   help="checkpoint directory in Hugging Face layout with its tokenizer")
    p.add_argument("--task", required=True, help="task name")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="where the kept rows go")
    p.add_argument("--n-prompts", type=int, default=1000, help="problems to sample (default 1000)")
    p.add_argument("--n-per-prompt", type=int, default=4, help="completions per problem (default 4)")
    p.add_argument("--keep-correct", action="store_true", help="keep only completions the accuracy reward scores 1")
    p.add_argument("--max-per-prompt", type=int, default=1, help="distinct kept completions per problem (0 = all)")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--template", default="r1_zero", choices=["r1_zero", "chat"])
    p.add_argument("--device", default="auto")
    p.add_argument("--knobs", nargs="+", default=[], metavar="KNOB=VALUE",
                   help="task difficulty knobs, e.g. --knobs max_value=9 max_terms=3")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from seekforge.commands.eval import parse_knobs
    from seekforge.rl.rejection import SampleConfig, rejection_sample, write_jsonl
    from seekforge.rl.evaluate import load_llm

    cfg = SampleConfig(init_from=args.init_from, task=args.task, task_knobs=parse_knobs(args.knobs), out=args.out,
                       n_prompts=args.n_prompts, n_per_prompt=args.n_per_prompt, keep_correct=args.keep_correct,
                       max_per_prompt=args.max_per_prompt, split=args.split, seed=args.seed,
                       temperature=args.temperature, max_tokens=args.max_tokens, template=args.template,
                       device=args.device)
    rows, stats = rejection_sample(load_llm(args.init_from, args.device), cfg, progress=True)
    write_jsonl(args.out, rows)
    print(json.dumps({"out": args.out, **stats}))
    return 0
