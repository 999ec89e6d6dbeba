"""`seekforge tokenizer train`: a byte-level BPE with DeepSeek's special tokens, saved in the HF layout."""

from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train a tokenizer")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    t = sub.add_parser("train", help="train a byte-level BPE on text files (.txt, .jsonl, .parquet)")
    t.add_argument("--input", nargs="+", required=True, type=Path, metavar="FILE", help="training files")
    t.add_argument("--vocab-size", type=int, required=True, help="total ids, special tokens included")
    t.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory for tokenizer.json")
    t.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often")
    t.add_argument("--model-max-length", type=int, default=4096, help="context length recorded in the config")
    t.set_defaults(func=train)


def train(args) -> int:
    from seekforge.tokenizer import Tokenizer

    tok = Tokenizer.train(args.input, args.vocab_size, min_frequency=args.min_frequency,
                          model_max_length=args.model_max_length, show_progress=True)
    tok.save_pretrained(args.out)
    print(json.dumps({"out": str(args.out), "vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint}, indent=2))
    return 0
