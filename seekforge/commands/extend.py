"""`seekforge extend --from CKPT --out DIR [--factor F] [--stages 4,16] [key=value ...]`: two-stage YaRN context
extension of a checkpoint, with the long-context evaluation before and after each stage."""

from __future__ import annotations

from seekforge.commands import add_run_arguments


def _multiples(text: str) -> list[float]:
    import argparse

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"write multiples of the original context separated by commas, e.g. "
                                         f"4,16 ({err})") from err


def register(subparsers) -> None:
    from seekforge.train.extend import BUILTIN_CONFIGS

    p = subparsers.add_parser(
        "extend", help="extend a checkpoint's context with YaRN in two stages (as DeepSeek-V3: 4K -> 32K -> 128K)",
        description="Continues pretraining CKPT with YaRN-scaled rotary embeddings (factor F, beta_fast 32, "
                    "beta_slow 1, mscale = mscale_all_dim = 1, as DeepSeek-V3) on long documents (related "
                    "documents joined, passkey retrieval mixed in), one run per stage at stages x the original "
                    "context; then evaluates perplexity against context length and passkey retrieval against "
                    "length and depth for the base model and every stage (DIR/report.md, DIR/plots). Each "
                    "DIR/stageK/final is a Hugging Face checkpoint with rope_scaling in config.json. Built-in "
                    f"configs: {', '.join(BUILTIN_CONFIGS)} (default toy; v3 is V3's recipe for GPUs). Any "
                    "field of the config can be set as key=value (e.g. steps=1000 lr=7.3e-6 "
                    "data=[corpus.jsonl]).")
    p.add_argument("--from", dest="init_from", required=True, metavar="CKPT",
                   help="checkpoint to extend (Hugging Face layout with its tokenizer)")
    p.add_argument("--config", default="toy", help="a built-in config name or a .yaml/.toml file (default toy)")
    p.add_argument("--factor", type=float, help="YaRN scale s: the model's context becomes s x the original "
                                                "(default 16; V3: 40)")
    p.add_argument("--stages", type=_multiples, help="training lengths as multiples of the original context, "
                                                     "comma-separated (default 4,16; V3: 8,32)")
    p.add_argument("--original-len", type=int, help="the context CKPT was trained at (default: its "
                                                    "max_position_embeddings, or its YaRN original length)")
    add_run_arguments(p, None, resume_help="continue an interrupted extension in --out (finished stages are kept)")
    p.set_defaults(func=run)


def run(args) -> int:
    from seekforge.train.extend import load_extend_config, run as extend

    flags = {"init_from": args.init_from, "factor": args.factor, "stages": args.stages,
             "original_seq_len": args.original_len}
    overrides = [f"{key}={value}" for key, value in flags.items() if value is not None] + list(args.overrides)
    summary = extend(load_extend_config(args.config, overrides), args.out, resume=args.resume)
    last = summary["stages"][-1]
    print(f"done: {last['seq_len']}-token model in {last['checkpoint']}; report in {args.out}/report.md")
    return 0
