"""`seekforge sft --from CKPT --data FILE.jsonl --out DIR [--resume] [key=value ...]`: supervised fine-tuning."""

from __future__ import annotations

from seekforge.commands import add_run_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sft", help="supervised fine-tuning on prompt/completion or chat rows (loss on the answers only)",
        description="Any SFTConfig field can be set as key=value, e.g. steps=500 lr=5e-5 seq_len=1024 "
                    "packing=false teacher=CKPT kd_weight=0.5. Packed examples (packing=true, the default) share "
                    "rows but never see each other: each attends to itself only, from position 0.")
    p.add_argument("--from", dest="init_from", required=True, metavar="CKPT",
                   help="checkpoint directory in Hugging Face layout with its tokenizer")
    p.add_argument("--data", required=True, metavar="FILE.jsonl",
                   help='rows {"prompt", "completion"} or {"messages": [...]} (e.g. from `seekforge sample`)')
    add_run_arguments(p, "SFTConfig")
    p.set_defaults(func=run)


def run(args) -> int:
    from seekforge.parallel.mesh import is_main
    from seekforge.train.sft import load_sft_config, run as sft

    cfg = load_sft_config(args.config, [f"init_from={args.init_from}", f"data={args.data}", *args.overrides])
    last = sft(cfg, args.out, resume=args.resume)
    if is_main():  # under torchrun: rank 0 speaks for the run
        print(f"done: loss {last.get('loss', float('nan')):.4f}"
              + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else "")
              + f"; model in {args.out}/final, report in {args.out}/report.md")
    return 0
