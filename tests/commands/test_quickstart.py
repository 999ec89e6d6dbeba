"""`seekforge quickstart` end to end at a toy size: every stage runs, hands its model to the next, and the
summary and report state the accuracies, seeds and times.
A toy teacher solves nothing, so its rejection sampling is replaced by the gold solutions."""

import json

import pytest

import seekforge.rl.rejection as sample
from seekforge.cli import main
from seekforge.data.corpus import render_example
from seekforge.tasks import get_task, r1_zero_prompt


def gold_traces(llm, cfg, progress=False):
    rows = get_task(cfg.task, **cfg.task_knobs).rows("train", cfg.n_prompts, cfg.seed)
    prompts = [r1_zero_prompt(r.prompt) for r in rows]
    traces = [{"prompt": p, "completion": render_example(r)[len(p):], "task": r.task, "answer": r.answer}
              for p, r in zip(prompts, rows)]
    return traces, {"prompts": len(rows), "kept": len(rows)}


def test_quickstart_runs_every_stage_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "rejection_sample", gold_traces)
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "steps=3", "warmup_steps=1", "constant_steps=1", "decay_steps=1",
            "builtin_docs=300", "batch_size=4", "seq_len=128", "eval_every=3", "save_every=3", "progress=false",
            "tensorboard=false",
            "--grpo", "steps=2", "--grpo", "warmup_steps=0", "--grpo", "prompts_per_step=2", "--grpo", "group_size=2",
            "--grpo", "max_tokens=16", "--grpo", "eval_n=4", "--grpo", "eval_every=2",
            "--distill", "n_prompts=4", "--distill", "max_tokens=16", "--distill",
            "train={steps: 2, warmup_steps: 1, constant_steps: 1, decay_steps: 0, seq_len: 64, batch_size: 2, "
            "eval_every: 2, save_every: 2}"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["accuracy"]) == set(summary["greedy_accuracy"]) == {"base", "rl", "student"}
    assert summary["held_out"]["n"] == 4 and summary["slip_rate"] == 0.4
    assert summary["parameters"]["student"] < summary["parameters"]["rl"]
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
    question = "What is 3 + 4?"
    for stage in ("base", "rl", "student"):
        final = out / stage / "final"
        assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
        # each model carries R1-Zero's template, the format it learned: chat and serve pose questions in it
        hf = AutoTokenizer.from_pretrained(final)
        assert hf.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                      add_generation_prompt=True) == hf.bos_token + r1_zero_prompt(question), stage
    report = (out / "report.md").read_text()
    assert "pass@1" in report and "greedy" in report and "Seeds:" in report
    # a second call with --resume finds every stage done and only re-evaluates
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["accuracy"] == summary["accuracy"]
