"""`seekforge quickstart --out DIR`: the whole R1 story on the built-in tasks, on a laptop CPU.

1. Pretraining (built-in config "quickstart": a small MLA + MoE + MTP model on the generated math corpus,
   whose documents are task problems in the R1-Zero format, 40% of them careless) -> DIR/base.
2. R1-Zero: GRPO straight from the base model with the accuracy and format rewards, rollouts on the
   inference engine -> DIR/rl. Its step-0 and final evaluations are the held-out accuracy before and
   after RL (R1's pass@1 on the task's test split: the mean accuracy of 4 samples at temperature 1).
3. Distillation: the RL model's correct traces on training problems (rejection sampling) train a
   smaller student cut down from it by SFT -> DIR/student, evaluated on the same held-out problems.
Greedy accuracy of all three is reported beside.

Each of DIR/base, DIR/rl, DIR/student is a run directory: final/ (Hugging Face layout with the
tokenizer, whose chat template is R1-Zero's, the format the models learned, so that `seekforge chat
DIR/rl/final` and `seekforge serve` pose questions that way), metrics.jsonl, report.md and plots/.
DIR/report.md puts the numbers side by side with the seeds and the time of every stage; DIR/summary.json
holds the same. --resume continues where an interrupted quickstart stopped (finished stages are kept).
"""

from __future__ import annotations

# The RL and distillation stages of the quickstart (the task and its difficulty are those of the pretraining
# corpus, BUILTIN_CONFIGS["quickstart"]); `--grpo key=value` / `--distill key=value` override them.
# Held-out accuracy is R1's pass@1: the mean accuracy of several samples per problem at the policy's own
# temperature (greedy accuracy is reported beside it).
EVAL = dict(eval_n=500, eval_seed=0, eval_samples=4, eval_temperature=1.0)
GRPO = dict(steps=80, prompts_per_step=32, group_size=8, max_tokens=96, lr=1e-4, warmup_steps=10,
            loss_type="dr_grpo", scale_rewards="none", eval_every=20, save_every=20, **EVAL)
# The student is the teacher cut down (half the routed experts of each MoE layer, the most used ones, and no
# MTP module), then trained on the teacher's correct traces.
DISTILL = dict(n_prompts=2000, n_per_prompt=1, temperature=0.0, max_tokens=96, student_init="teacher",
               students=[{"model": "teacher", "name": "student",
                          "model_overrides": {"n_routed_experts": 4, "n_mtp_modules": 0}}],
               train=dict(steps=100, lr=1e-3, final_lr=1e-4, warmup_steps=5, constant_steps=45, decay_steps=50,
                          seq_len=256, batch_size=16, eval_every=50, save_every=50),
               kd_weight=0.0, eval_n=EVAL["eval_n"], eval_seed=EVAL["eval_seed"])


def register(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="pretrain, R1-Zero GRPO and distill a small model on the built-in "
                                                 "tasks, with a report")
    p.add_argument("--out", default="runs/quickstart", help="run directory (default: runs/quickstart)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted quickstart in --out")
    p.add_argument("--grpo", action="append", default=[], metavar="key=value", help="GRPO config override")
    p.add_argument("--distill", action="append", default=[], metavar="key=value", help="distillation override")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pretraining config overrides")
    p.set_defaults(func=run)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run(args) -> int:
    import json
    import os
    import time
    from pathlib import Path

    import torch

    from seekforge.configio import apply_overrides, atomic_write_text, from_dict
    from seekforge.rl import distill, grpo
    from seekforge.rl.evaluate import evaluate, load_llm
    from seekforge.train.pretrain import load_train_config, run as pretrain

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    started = time.perf_counter()

    # 1. pretraining
    base_dir, rl_dir, student_dir = out / "base", out / "rl", out / "student"
    pt_cfg = load_train_config("quickstart", args.overrides)
    t = time.perf_counter()
    if not (args.resume and (base_dir / "final" / "config.json").is_file()):
        pretrain(pt_cfg, base_dir, resume=args.resume and (base_dir / "checkpoints").is_dir())
    times["pretraining"] = time.perf_counter() - t
    print(f"[1/3] pretrained in {_minutes(times['pretraining'])}: {base_dir / 'final'}", flush=True)

    # 2. R1-Zero GRPO from the base model, on the task of its corpus
    task, knobs = next(iter(pt_cfg.builtin_tasks.items()), ("chain_sum", {}))
    g_data = dict(GRPO, task=task, task_knobs=knobs, init_from=str(base_dir / "final"), seed=pt_cfg.seed,
                  progress=pt_cfg.progress, tensorboard=pt_cfg.tensorboard)
    g_cfg = from_dict(grpo.GRPOConfig, apply_overrides(grpo.GRPOConfig, g_data, args.grpo), where="quickstart grpo")
    t = time.perf_counter()
    if not (args.resume and (rl_dir / "final" / "config.json").is_file()):
        grpo.run(g_cfg, rl_dir, resume=args.resume and (rl_dir / "checkpoints").is_dir())
    times["grpo"] = time.perf_counter() - t
    evals = [r for r in _read(rl_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    before, after = evals[0], evals[-1]
    print(f"[2/3] GRPO in {_minutes(times['grpo'])}: held-out accuracy {before['accuracy']:.3f} -> "
          f"{after['accuracy']:.3f} on {after['n']} problems", flush=True)

    # 3. distillation: a smaller student, cut down from the RL model, trained on its correct traces
    d_data = dict(DISTILL, task=g_cfg.task, task_knobs=g_cfg.task_knobs, teacher=str(rl_dir / "final"),
                  seed=pt_cfg.seed, progress=pt_cfg.progress)
    d_cfg = from_dict(distill.DistillConfig, apply_overrides(distill.DistillConfig, d_data, args.distill),
                      where="quickstart distill")
    (label, model, overrides), *_ = distill.student_specs(d_cfg)
    t = time.perf_counter()
    student_dir.mkdir(parents=True, exist_ok=True)
    traces = student_dir / "traces.jsonl"
    trace_stats = None
    rl_llm = load_llm(rl_dir / "final", d_cfg.device)
    if not (args.resume and traces.is_file()):
        trace_stats = distill.sample_traces(d_cfg, rl_llm, traces)
    if not (args.resume and (student_dir / "final" / "config.json").is_file()):
        distill.train_student(d_cfg, model, overrides, traces, student_dir, resume=args.resume)
    student_llm = load_llm(student_dir / "final", d_cfg.device)
    student_eval = evaluate(student_llm, g_cfg.eval_config())
    times["distillation"] = time.perf_counter() - t
    greedy = {name: evaluate(llm, g_cfg.eval_config(greedy=True))["accuracy"] for name, llm in
              (("base", load_llm(base_dir / "final", d_cfg.device)), ("rl", rl_llm), ("student", student_llm))}
    times["total"] = time.perf_counter() - started

    sizes = {name: distill.parameter_count(d / "final") for name, d in
             (("base", base_dir), ("rl", rl_dir), ("student", student_dir))}
    retention = student_eval["accuracy"] / after["accuracy"] if after["accuracy"] else None
    summary = {
        "task": g_cfg.task, "task_knobs": g_cfg.task_knobs, "slip_rate": pt_cfg.builtin_slip_rate,
        "held_out": {"split": "test", "n": after["n"], "seed": g_cfg.eval_seed,
                     "decoding": f"{g_cfg.eval_samples} samples per problem at temperature {g_cfg.eval_temperature}"},
        "seeds": {"pretraining": pt_cfg.seed, "grpo": g_cfg.seed, "distillation": d_cfg.seed},
        "accuracy": {"base": before["accuracy"], "rl": after["accuracy"], "student": student_eval["accuracy"]},
        "greedy_accuracy": {k: greedy[k] for k in ("base", "rl", "student")},
        "rl_gain_points": 100 * (after["accuracy"] - before["accuracy"]),
        "student_retention": retention, "parameters": sizes, "traces": trace_stats,
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": str(g_cfg.device if g_cfg.device != "auto" else
                                  ("cuda" if torch.cuda.is_available() else "cpu"))},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "report.md", _report(summary, g_cfg, d_cfg))
    print(f"[3/3] distilled in {_minutes(times['distillation'])}: student accuracy {student_eval['accuracy']:.3f} "
          f"({'n/a' if retention is None else f'{100 * retention:.0f}%'} of the teacher's)")
    print(f"done in {_minutes(times['total'])}: report in {out / 'report.md'}; talk to the RL model with "
          f"`seekforge chat {rl_dir / 'final'}`")
    return 0


def _read(path):
    from seekforge.train.metrics import read_metrics

    return read_metrics(path)


def _report(s: dict, g_cfg, d_cfg) -> str:
    acc, greedy, secs, sizes = s["accuracy"], s["greedy_accuracy"], s["seconds"], s["parameters"]
    knobs = ", ".join(f"{k}={v}" for k, v in s["task_knobs"].items()) or "default difficulty"
    ret = "n/a" if s["student_retention"] is None else f"{100 * s['student_retention']:.1f}%"
    lines = [
        "# seekforge quickstart: pretraining, R1-Zero GRPO, distillation", "",
        f"Task `{s['task']}` ({knobs}); held-out accuracy is the mean accuracy of "
        f"{s['held_out']['decoding']} (R1's pass@1) on the same {s['held_out']['n']} problems of the test split "
        f"(seed {s['held_out']['seed']}), which no training split shares; greedy accuracy beside it. "
        f"{100 * s['slip_rate']:.0f}% of the pretraining documents are careless (one slip in the worked steps, "
        f"carried on to a wrong answer): the base model samples such slips, and RL with the accuracy reward "
        f"removes them.", "",
        "| stage | model | parameters | held-out accuracy | greedy | time |", "|---|---|---|---|---|---|",
        f"| pretrained base | base/final | {sizes['base']:,} | {acc['base']:.3f} | {greedy['base']:.3f} | "
        f"{secs['pretraining'] / 60:.1f} min |",
        f"| R1-Zero GRPO | rl/final | {sizes['rl']:,} | {acc['rl']:.3f} ({s['rl_gain_points']:+.1f} points) | "
        f"{greedy['rl']:.3f} | {secs['grpo'] / 60:.1f} min |",
        f"| distilled student | student/final | {sizes['student']:,} | {acc['student']:.3f} ({ret} of the teacher) | "
        f"{greedy['student']:.3f} | {secs['distillation'] / 60:.1f} min |", "",
        f"Total {secs['total'] / 60:.1f} min on {s['machine']['device']} ({s['machine']['cpus']} CPUs, "
        f"{s['machine']['torch_threads']} torch threads).", "",
        f"Seeds: pretraining (corpus, initialisation, data order) {s['seeds']['pretraining']}, GRPO "
        f"{s['seeds']['grpo']}, distillation {s['seeds']['distillation']}, held-out problems {s['held_out']['seed']}.",
        "",
        f"GRPO: {g_cfg.steps} steps of {g_cfg.prompts_per_step} problems x {g_cfg.group_size} samples, loss "
        f"{g_cfg.loss_type}, clip {g_cfg.eps_low}/{g_cfg.eps_high}, lr {g_cfg.lr}, beta {g_cfg.beta}, rewards "
        f"{g_cfg.rewards}. Distillation: the GRPO model answered {d_cfg.n_prompts} training problems "
        f"({'greedy' if d_cfg.temperature == 0 else f'temperature {d_cfg.temperature}'}); "
        + (f"{s['traces']['kept']} correct traces were kept; " if s.get("traces") else "")
        + ("the student started from the teacher's own weights cut down to its shape (the first "
           "layers, each MoE layer's most used routed experts, no MTP module) and trained on them"
           if d_cfg.student_init == "teacher" else "the student trained on them from scratch")
        + f" for {d_cfg.train.get('steps', '?')} steps (logit distillation weight {d_cfg.kd_weight}).", "",
        "## Plots", "",
        "![GRPO rewards and held-out accuracy](rl/plots/rewards.png)", "",
        "![pretraining loss](base/plots/loss.png)", "",
        "![student loss](student/plots/loss.png)", "",
        "Each stage's own report: [base](base/report.md), [rl](rl/report.md), [student](student/report.md).", "",
    ]
    return "\n".join(lines)
