"""`seekforge eval-long CKPT [CKPT ...] --data DATA --out DIR`: perplexity against context length and passkey
retrieval against length and depth, for one or more checkpoints side by side."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-long", help="long-context evaluation: perplexity against context length, passkey retrieval grid",
        description="Perplexity of each checkpoint on DATA's held-out tokens read in windows of each length, and "
                    "greedy passkey retrieval at each length and key depth. Writes DIR/long_context.json, "
                    "DIR/plots/perplexity_by_length.png and DIR/plots/passkey_<label>.png, and the report: "
                    "DIR/report.md gets the section (a training run's report is rendered again with it).")
    p.add_argument("checkpoints", nargs="+", metavar="[LABEL=]CKPT",
                   help="checkpoint directories in Hugging Face layout with their tokenizer, optionally labelled")
    p.add_argument("--data", required=True, help="a prepared data directory tokenized with the checkpoints' "
                                                 "tokenizer (e.g. an extension's DIR/data-<len>); its val split is read")
    p.add_argument("--out", required=True, help="directory for the results, plots and report")
    p.add_argument("--original-len", type=int, required=True, help="the original context the lengths multiply")
    p.add_argument("--multiples", default="1,2,4,8,16", help="lengths as multiples of --original-len "
                                                             "(default 1,2,4,8,16)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--samples", type=int, default=8, help="passkey documents per cell (default 8)")
    p.add_argument("--windows", type=int, default=4, help="windows of the longest length perplexity reads (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--model-overrides", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="ModelConfig fields set over every checkpoint's config.json, e.g. rope_factor=16 "
                        "original_seq_len=64 max_seq_len=1024 (YaRN without training)")
    p.set_defaults(func=run)


def _floats(text: str, flag: str) -> list[float]:
    from seekforge.errors import ConfigError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ConfigError(f"{flag}: write numbers separated by commas ({err})") from err


def run(args) -> int:
    import json
    from pathlib import Path

    from seekforge.commands.eval import parse_knobs
    from seekforge.configio import atomic_write_text
    from seekforge.train import long_eval
    from seekforge.train.metrics import METRICS_FILE

    changes = parse_knobs(args.model_overrides) or None
    models = {}
    for item in args.checkpoints:
        label, _, path = item.rpartition("=")
        models[label or path] = (Path(path), changes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = long_eval.evaluate_models(models, args.data, args.original_len, _floats(args.multiples, "--multiples"),
                                        _floats(args.depths, "--depths"), args.samples, args.windows, args.seed,
                                        args.device, out)
    if (out / METRICS_FILE).is_file():
        from seekforge.train.report import write_report

        write_report(out)
    else:
        atomic_write_text(out / "report.md", "\n".join(["# Long-context evaluation", "", *long_eval.section(out)]))
    print(json.dumps({label: r["rise"] for label, r in results["models"].items()}))
    return 0
