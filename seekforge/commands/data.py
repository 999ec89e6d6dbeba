"""`seekforge data prepare|builtin`: token shards for pretraining, from files or the built-in math corpus."""

from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare pretraining data")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    prep = sub.add_parser("prepare", help="tokenize .txt/.jsonl/.parquet files into train/val shards")
    prep.add_argument("--tokenizer", required=True, type=Path, metavar="DIR", help="directory with tokenizer.json")
    prep.add_argument("--input", nargs="+", required=True, type=Path, metavar="FILE", help="input files")
    prep.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    prep.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the train/val assignment")
    prep.set_defaults(func=run_prepare)
    b = sub.add_parser("builtin", help="generate the built-in math corpus, train a tokenizer, prepare shards")
    b.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    b.add_argument("--docs", type=int, default=20_000, help="number of documents (default 20000)")
    b.add_argument("--vocab-size", type=int, default=1024, help="tokenizer size when training one (default 1024)")
    b.add_argument("--tokenizer", type=Path, metavar="DIR", help="use this tokenizer instead of training one")
    b.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=run_builtin)


def _summary(meta: dict, out: Path) -> str:
    return json.dumps({"out": str(out), "dtype": meta["dtype"], "vocab_size": meta["vocab_size"],
                       **{f"{name}_tokens": s["tokens"] for name, s in meta["splits"].items()},
                       **{f"{name}_docs": s["docs"] for name, s in meta["splits"].items()}}, indent=2)


def run_prepare(args) -> int:
    from seekforge.data.prepare import prepare
    from seekforge.tokenizer import Tokenizer

    meta = prepare(args.input, Tokenizer.from_pretrained(args.tokenizer), args.out,
                   val_fraction=args.val_fraction, seed=args.seed)
    print(_summary(meta, args.out))
    return 0


def run_builtin(args) -> int:
    from seekforge.data.corpus import build_builtin_dataset
    from seekforge.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
    ds = build_builtin_dataset(args.out, n_docs=args.docs, seed=args.seed, vocab_size=args.vocab_size,
                               tokenizer=tok, val_fraction=args.val_fraction, progress=True)
    print(_summary(ds.meta, ds.data_dir))
    return 0
