"""`seekforge distill --teacher CKPT --student-config NAME_OR_FILE --task NAME --out DIR`: distillation."""

from __future__ import annotations

from seekforge.commands import add_run_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "distill", help="train smaller students on a teacher's correct reasoning traces (SFT, optional logit KD)",
        description="Any DistillConfig field can be set as key=value, e.g. n_prompts=4000 kd_weight=0.5 "
                    "train.steps=500 train.lr=1e-3 student_overrides.n_layers=2 eval_n=500.")
    p.add_argument("--teacher", required=True, metavar="CKPT", help="teacher checkpoint (HF layout with tokenizer)")
    p.add_argument("--student-config", required=True, action="append", metavar="NAME_OR_FILE",
                   help="student shape: a preset name, a config.json or a checkpoint directory; repeat the flag "
                        "or separate with commas for several sizes")
    p.add_argument("--task", required=True, help="task name")
    add_run_arguments(p, "DistillConfig", out_help="output directory (traces.jsonl, one run directory per student)",
                      resume_help="reuse the traces and continue interrupted students")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from seekforge.rl.distill import load_distill_config, run as distill

    students = [s.strip() for item in args.student_config for s in item.split(",") if s.strip()]
    cfg = load_distill_config(args.config, [f"teacher={args.teacher}", f"task={args.task}", *args.overrides])
    cfg.students = students
    summary = distill(cfg, args.out, resume=args.resume)
    print(json.dumps({"teacher_accuracy": summary.get("teacher_eval", {}).get("accuracy"),
                      "students": {k: {"accuracy": v.get("eval", {}).get("accuracy"), "retention": v.get("retention"),
                                       "parameters": v["parameters"], "dir": v["dir"]}
                                   for k, v in summary["students"].items()}}))
    return 0
