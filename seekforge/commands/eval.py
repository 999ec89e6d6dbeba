"""`seekforge eval CKPT`: one JSON object of what the checkpoint scores, on one of
- `--task NAME`: held-out task accuracy (greedy) and pass@k on the inference engine (seekforge.rl.evaluate);
- `--text FILE` or `--data DIR`: perplexity, bits per token and bits per byte (seekforge.train.perplexity);
- `--lm-eval TASK[,TASK]`: lm-evaluation-harness tasks on the checkpoint (seekforge.train.lm_harness)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="task accuracy and pass@k, perplexity on text or prepared data, or lm-eval tasks",
        description="Evaluate a checkpoint; prints one JSON object (also written to --json OUT). Give one of "
                    "--task (held-out accuracy on the engine), --text/--data (perplexity: tokens, mean NLL in nats, "
                    "perplexity, bits per token and per UTF-8 byte, the text read after BOS in non-overlapping "
                    "windows of --seq-len tokens) or --lm-eval (lm-evaluation-harness tasks through its hf "
                    "backend; needs pip install 'seekforge[eval]').")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory in Hugging Face layout with its tokenizer")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="task name: greedy accuracy (and pass@k) on its held-out problems")
    what.add_argument("--text", metavar="FILE", help="perplexity on a UTF-8 text file")
    what.add_argument("--data", metavar="DIR", help="perplexity on a prepared data directory (`seekforge data "
                                                    "prepare`) tokenized with the checkpoint's tokenizer")
    what.add_argument("--lm-eval", metavar="TASK[,TASK]", help="lm-evaluation-harness task names (or groups)")
    p.add_argument("--json", metavar="OUT", help="also write the JSON object to this file")
    p.add_argument("--max-tokens", type=int, help="--task: tokens generated per completion (default 256); "
                                                  "--text/--data: score at most this many tokens (default all)")
    p.add_argument("--device", default="auto")
    ppl = p.add_argument_group("perplexity (--text, --data)")
    ppl.add_argument("--seq-len", type=int, help="window length in tokens (default the model's context)")
    ppl.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")
    ppl.add_argument("--data-split", default="val", help="which split of --data (default val)")
    harness = p.add_argument_group("lm-evaluation-harness (--lm-eval)")
    harness.add_argument("--lm-eval-limit", type=int, metavar="N", help="at most N documents per task")
    harness.add_argument("--include-path", metavar="DIR", help="folder of task YAML files to add to lm-eval's")
    task = p.add_argument_group("task accuracy (--task)")
    task.add_argument("--n", type=int, default=500, help="held-out problems (default 500)")
    task.add_argument("--seed", type=int, default=0, help="which held-out problems (default 0)")
    task.add_argument("--k", type=int, default=1, help="report pass@k (k > 1 samples each problem)")
    task.add_argument("--samples", type=int, help="completions per problem for pass@k (>= k; default k)")
    task.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for pass@k (default 1)")
    task.add_argument("--template", default="r1_zero", choices=["r1_zero", "chat"])
    task.add_argument("--split", default="test", choices=["train", "test"])
    task.add_argument("--knobs", nargs="+", default=[], metavar="KNOB=VALUE",
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


def _task(args) -> dict:
    from seekforge.rl.evaluate import EvalConfig, evaluate, load_llm

    cfg = EvalConfig(task=args.task, task_knobs=parse_knobs(args.knobs), n=args.n, seed=args.seed, split=args.split,
                     k=args.k, samples=args.samples, temperature=args.temperature,
                     max_tokens=256 if args.max_tokens is None else args.max_tokens, template=args.template)
    return evaluate(load_llm(args.checkpoint, args.device), cfg)


def _perplexity(args) -> dict:
    from seekforge.errors import ConfigError
    from seekforge.train import perplexity
    from seekforge.train.long_eval import load
    from seekforge.train.optim import pick_device

    if args.max_tokens is not None and args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    model, tokenizer = load(args.checkpoint, device=str(pick_device(args.device)))
    if args.text is not None:
        ids, n_bytes = perplexity.text_tokens(tokenizer, args.text, args.max_tokens)
        source = {"text": args.text}
    else:
        ids, n_bytes = perplexity.data_tokens(tokenizer, args.data, args.data_split, args.max_tokens)
        source = {"data": args.data, "split": args.data_split}
    return {**source, **perplexity.perplexity(model, tokenizer, ids, n_bytes, args.seq_len, args.batch_size)}


def _lm_eval(args) -> dict:
    from seekforge.train.lm_harness import run_tasks

    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    return run_tasks(args.checkpoint, tasks, args.lm_eval_limit, args.include_path, args.device)


def run(args) -> int:
    import json

    from seekforge.configio import atomic_write_text

    if args.task is not None:
        out = _task(args)
    elif args.lm_eval is not None:
        out = _lm_eval(args)
    else:
        out = _perplexity(args)
    text = json.dumps(out, default=str)
    if args.json:
        atomic_write_text(args.json, text + "\n")
    print(text)
    return 0
