"""`seekforge quickstart --out DIR`: the whole story on the built-in data, on a laptop CPU.

Pretrains a small DeepSeek-style model (MLA + MoE + MTP) on the built-in procedurally generated math
corpus into DIR/base (Hugging Face layout, with its tokenizer), evaluates it on held-out text, and
writes the report card DIR/report.md with plots under DIR/plots.
"""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="pretrain a small model on the built-in math corpus, with a report")
    p.add_argument("--out", default="runs/quickstart", help="run directory (default: runs/quickstart)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted quickstart in --out")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pretraining config overrides")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from seekforge.train.pretrain import load_train_config, run as pretrain

    out = Path(args.out)
    cfg = load_train_config("quickstart", args.overrides)
    last = pretrain(cfg, out / "base", resume=args.resume)
    print(f"pretrained: eval loss {last.get('eval_loss', float('nan')):.4f} "
          f"({last.get('eval_bpb', float('nan')):.3f} bits/byte); model in {out / 'base' / 'final'}, "
          f"report in {out / 'base' / 'report.md'}")
    return 0
