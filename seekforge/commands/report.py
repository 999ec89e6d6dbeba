"""`seekforge report DIR`: plots and a markdown summary of a training run's metrics.jsonl."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="plot a run's metrics and write DIR/report.md")
    p.add_argument("run_dir", metavar="DIR", help="the run's output directory (holding metrics.jsonl)")
    p.set_defaults(func=run)


def run(args) -> int:
    from seekforge.train.report import write_report

    print(write_report(args.run_dir))
    return 0
