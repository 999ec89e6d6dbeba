"""Dual-chain inference measured: model-only, rule-only and dual-chain (answer-level switch at several
thresholds, in-chain calculator, both) on held-out problems of the built-in tasks (and reasoning-gym's
basic_arithmetic where installed), for a small trained model.

    seekforge train --config quickstart --out runs/dc-base builtin_slip_rate=0 steps=200 batch_size=8 \
        warmup_steps=15 constant_steps=125 decay_steps=60 builtin_docs=12000 \
        builtin_tasks.arithmetic.digits=2 builtin_tasks.word_problem.max_number=10
    python bench/dual_chain.py --model runs/dc-base/final --json docs/benchmarks/dual-chain-cpu.json \
        --plot docs/benchmarks/dual-chain-cpu.png

Two generation runs over the same problems (greedy, R1-Zero prompt, one batched `generate` each): the model
alone, and the model with the in-chain calculator (SamplingParams.inserter). Both record token logprobs, so
the answer-level switch is evaluated after the fact at every threshold, from the same completions, with the
rule chain's answer to every question (seekforge.dual_chain.switch.decide: the decision LLM.generate makes).
Latency is wall time per problem: the batched generation's time (the fastest of --repeats runs) over the
number of problems, plus the rule chain's own time per question where the switch consults it. Tokens per correct answer count the tokens the
model sampled (inserted ones excluded) over the problems answered correctly; rule-only samples none.
"Rule first" is the other order: the rule chain answers where a solver is certain, and only the rest go to
the model. Correctness gate: every answer is scored by its task's own checker (Task.score), the same one
GRPO's reward and `seekforge eval` use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ceilings import machine  # noqa: E402

from seekforge.dual_chain import Calculator, RuleChain, decide  # noqa: E402
from seekforge.dual_chain.switch import span_probability  # noqa: E402
from seekforge.engine import LLM, SamplingParams  # noqa: E402
from seekforge.tasks import get_task, list_tasks, r1_zero_prompt  # noqa: E402
from seekforge.tasks.answers import extract_answer  # noqa: E402

# the difficulty the benchmark model was trained at (the train command above)
TASKS = {"arithmetic": {"digits": 2}, "chain_sum": {"max_value": 9, "min_terms": 2, "max_terms": 4},
         "word_problem": {"max_number": 10}, "countdown": {}}
THRESHOLDS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.01]  # 1.01: the rule chain wherever a solver applies


def generate(llm, rows, max_tokens: int, inserter=None) -> tuple[list, float]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0, inserter=inserter)
    start = time.perf_counter()
    outs = llm.generate([r1_zero_prompt(r.prompt) for r in rows], params)
    return outs, time.perf_counter() - start


def completions(outs, tokenizer) -> list[dict]:
    """Each completion's answer, its span probability and its sampled tokens."""
    out = []
    for o in outs:
        c = o.outputs[0]
        answer = extract_answer(c.text or "")
        p = span_probability(c.text, answer, c.token_ids, c.logprobs, tokenizer) if answer else 0.0
        out.append({"answer": answer, "p": p, "sampled": len(c.token_ids) - c.num_inserted_tokens,
                    "inserted": c.num_inserted_tokens})
    return out


def summary(name, correct, seconds, sampled, n) -> dict:
    c = sum(correct)
    return {"mode": name, "accuracy": c / n, "correct": c, "n": n, "seconds_per_problem": seconds / n,
            "tokens_sampled": sampled, "tokens_per_correct": sampled / c if c else None,
            "seconds_per_correct": seconds / c if c else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained checkpoint directory with its tokenizer")
    ap.add_argument("--n", type=int, default=50, help="held-out problems per task")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each generation (the fastest counts)")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    torch.manual_seed(0)
    tasks = dict(TASKS)
    if "rg:basic_arithmetic" in list_tasks():
        tasks["rg:basic_arithmetic"] = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}
    rows, task_of = [], []
    for name, knobs in tasks.items():
        task = get_task(name, **knobs)
        for row in task.rows("test", args.n, args.seed):
            rows.append(row)
            task_of.append(task)
    n = len(rows)
    llm = LLM(args.model, dtype="float32", max_num_seqs=64, max_model_len=512)
    tok = llm.tokenizer
    score = [lambda a, t=t, r=r: bool(a is not None and t.score(a, r.answer, r.meta)) for t, r in zip(task_of, rows)]

    rules = RuleChain(timeout_s=2.0)
    rule_answers, rule_seconds = [], []
    for row in rows:
        start = time.perf_counter()
        rule_answers.append(rules.solve(row.prompt))
        rule_seconds.append(time.perf_counter() - start)

    generate(llm, rows[:4], 8)  # warm up
    plain_s, calc_s = float("inf"), float("inf")
    for _ in range(args.repeats):  # alternated, best of: the host is shared (greedy: the same outputs each time)
        plain_outs, seconds = generate(llm, rows, args.max_tokens)
        plain_s = min(plain_s, seconds)
        calc_outs, seconds = generate(llm, rows, args.max_tokens, Calculator(tok))
        calc_s = min(calc_s, seconds)
    runs = {"model": (completions(plain_outs, tok), plain_s), "model+in-chain": (completions(calc_outs, tok), calc_s)}

    results = {"modes": [], "curves": {}, "per_task": {}}
    plain = runs["model"][0]
    results["modes"].append(summary("model only", [score[i](c["answer"]) for i, c in enumerate(plain)], plain_s,
                                    sum(c["sampled"] for c in plain), n))
    results["modes"].append(summary("rule only", [score[i](s.answer if s else None) for i, s in enumerate(rule_answers)],
                                    sum(rule_seconds), 0, n))
    cin = runs["model+in-chain"][0]
    results["modes"].append(summary("in-chain calculator", [score[i](c["answer"]) for i, c in enumerate(cin)], calc_s,
                                    sum(c["sampled"] for c in cin), n))
    # rule first: a certain solver answers alone; the model (its plain run) answers the rest
    first = [rule_answers[i].answer if rule_answers[i] and rule_answers[i].certainty >= 1.0 else plain[i]["answer"]
             for i in range(n)]
    model_needed = [i for i in range(n) if not (rule_answers[i] and rule_answers[i].certainty >= 1.0)]
    results["modes"].append(summary(
        "rule first", [score[i](a) for i, a in enumerate(first)], sum(rule_seconds) + plain_s * len(model_needed) / n,
        sum(plain[i]["sampled"] for i in model_needed), n))

    for run_name, (comps, seconds) in runs.items():
        for override in (2.0, 1.0):
            label = f"{run_name}, switch" + (" + certain override" if override <= 1.0 else "")
            curve = []
            for threshold in THRESHOLDS:
                decisions = [decide([(c["answer"], c["p"])], rule_answers[i], threshold, override)
                             for i, c in enumerate(comps)]
                consulted = [i for i, c in enumerate(comps) if override <= 1.0 or c["answer"] is None
                             or c["p"] < threshold]  # where the switch needs the rule chain's answer
                point = summary(label, [score[i](d.answer) for i, d in enumerate(decisions)],
                                seconds + sum(rule_seconds[i] for i in consulted), sum(c["sampled"] for c in comps), n)
                point["threshold"] = threshold
                point["rule_answered"] = sum(d.chain == "rule" for d in decisions)
                curve.append(point)
            results["curves"][label] = curve
    for name in tasks:
        idx = [i for i, t in enumerate(task_of) if t.name == name]
        results["per_task"][name] = {
            "model": sum(score[i](plain[i]["answer"]) for i in idx) / len(idx),
            "rule": sum(score[i](rule_answers[i].answer if rule_answers[i] else None) for i in idx) / len(idx),
            "rule_applies": sum(rule_answers[i] is not None for i in idx) / len(idx),
            "in-chain": sum(score[i](cin[i]["answer"]) for i in idx) / len(idx),
            "inserted_per_problem": sum(cin[i]["inserted"] for i in idx) / len(idx),
            "dual(in-chain, switch 0.5, override)": sum(score[i](decide(
                [(cin[i]["answer"], cin[i]["p"])], rule_answers[i], 0.5, 1.0).answer) for i in idx) / len(idx),
        }
    results["config"] = {"model": str(args.model), "tasks": tasks, "n_per_task": args.n, "seed": args.seed,
                         "max_tokens": args.max_tokens, "repeats": args.repeats, "thresholds": THRESHOLDS, "greedy": True,
                         "machine": machine(torch.device("cpu")), "rule_chain_counters": vars(rules.counters)}
    rules.close()
    base = results["modes"][0]
    best = max((p for c in results["curves"].values() for p in c), key=lambda p: p["accuracy"])
    results["efficiency"] = {
        "model_tokens_per_correct": base["tokens_per_correct"], "best_dual": best,
        "tokens_per_correct_ratio": (base["tokens_per_correct"] / best["tokens_per_correct"]
                                     if base["tokens_per_correct"] and best["tokens_per_correct"] else None),
        "seconds_per_correct_ratio": (base["seconds_per_correct"] / best["seconds_per_correct"]
                                      if base["seconds_per_correct"] and best["seconds_per_correct"] else None)}
    print(json.dumps({"modes": results["modes"], "per_task": results["per_task"],
                      "efficiency": results["efficiency"]}, indent=1))
    for label, curve in results["curves"].items():
        print(label, [(p["threshold"], round(p["accuracy"], 3), p["rule_answered"]) for p in curve])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)
    return 0


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in results["curves"].items():
        ax.plot([1000 * p["seconds_per_problem"] for p in curve], [p["accuracy"] for p in curve], marker=".",
                label=label)
        for p in curve[::2]:
            ax.annotate(f"{p['threshold']:g}", (1000 * p["seconds_per_problem"], p["accuracy"]), fontsize=6)
    for m in results["modes"]:
        ax.scatter([1000 * m["seconds_per_problem"]], [m["accuracy"]], marker="s", zorder=3)
        ax.annotate(m["mode"], (1000 * m["seconds_per_problem"], m["accuracy"]), fontsize=7,
                    xytext=(4, -8), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("ms per problem (batched greedy generation + rule chain; log scale)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("dual chain: accuracy vs latency (threshold annotated)")
    ax.legend(fontsize=6, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    raise SystemExit(main())
