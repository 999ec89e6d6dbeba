"""A reward model for a preference the rules cannot express, and GRPO with mixed rewards, on a CPU in minutes.

    python bench/reward_model.py --out /tmp/rm-demo --json docs/benchmarks/reward-model-cpu.json

1. The policy: a small MLA + MoE model trained from scratch (SFT, seekforge.train.sft) on chain sums posed
   in the chat template (a think block, then the answer tags), a share of them careless (a slip, a wrong
   answer), half of them closing their reasoning with the word "indeed" ("So the answer is 12 indeed."), half
   without ("So the answer is 12.").
2. The preference, which the demo knows and the rule rewards (accuracy, format) cannot see: a completion whose
   reasoning ends with "indeed" is preferred. Pairs {prompt, chosen, rejected} are drawn on training problems,
   each side right or careless independently (so correctness says nothing about which is chosen), and a
   reward model (seekforge.train.reward: the policy's backbone with a scalar head, Bradley-Terry loss) learns
   them; its pairwise accuracy on pairs of held-out (test-split) problems is reported (`seekforge rm eval`).
3. GRPO with mixed rewards in one run: chain sums rewarded by the rules (accuracy + format, 3/4 of each step's
   prompts) and chain sums rewarded by the reward model alone (1/4), with a KL term to the initial policy
   (beta 0.1); beside it the same run at learning rate 0, and the rule-rewarded task alone (the control for
   accuracy). On held-out problems, before and after each run: the share of sampled completions (temperature
   1) that close with "indeed", the reward model's mean score of them, and accuracy by the accuracy rule,
   greedy and R1's pass@1 (the mean of 4 samples at temperature 1).
Everything is seeded; the JSON records the numbers, the settings and the seconds of each stage.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

TASK, KNOBS = "chain_sum", {"max_value": 9, "min_terms": 2, "max_terms": 3}
WORD = "indeed"
SLIP_RATE = 0.3
SHAPE = dict(dim=64, n_layers=2, inter_dim=192, moe_inter_dim=32, max_seq_len=256, n_mtp_modules=0)
TEMPLATE = "chat"  # the chat template's prompt is ~15 tokens, R1-Zero's ~95: short sequences keep the CPU busy less


def phases(steps: int) -> dict:
    """The learning-rate schedule's phases over `steps`: a short warm-up, a constant half, a decay."""
    warmup = max(1, steps // 20)
    return dict(steps=steps, warmup_steps=warmup, constant_steps=steps // 2, decay_steps=steps - warmup - steps // 2)


def styled(solution: str, answer: str, preferred: bool) -> str:
    """The completion after the prompt's "<think>\n": the worked solution, closing with WORD when `preferred`."""
    if preferred:
        solution = solution.removesuffix(".") + f" {WORD}."
    return f"{solution}\n</think>\n<answer>{answer}</answer>"


def prefers(completion: str) -> bool:
    """The demo's preference: the reasoning's last line ends with WORD."""
    think = completion.split("</think>")[0].rstrip()
    return think.endswith(f" {WORD}.")


def policy_data(path: Path, tokenizer_dir: Path, n: int, seed: int):
    """SFT rows: chain sums, SLIP_RATE of them careless, half of them in the preferred style; and the tokenizer
    (trained on their text). Returns the tokenizer."""
    from seekforge.rl.rollout import render_prompt
    from seekforge.tasks import get_task
    from seekforge.tokenizer import Tokenizer

    task, rng = get_task(TASK, **KNOBS), random.Random(seed)
    examples = []
    for row in task.rows("train", n, seed):
        if rng.random() < SLIP_RATE:
            row = task.careless(row, rng)
        examples.append((row.prompt, styled(row.solution, row.answer, rng.random() < 0.5)))
    tokenizer = Tokenizer.train([f"{q}\n{c}" for q, c in examples], 512)
    tokenizer.save_pretrained(tokenizer_dir)
    with open(path, "w") as f:
        for q, c in examples:
            f.write(json.dumps({"prompt": render_prompt(q, TEMPLATE, tokenizer), "completion": c}) + "\n")
    return tokenizer


def pairs(path: Path, tokenizer, split: str, n: int, seed: int) -> None:
    """Preference pairs on `split`'s problems (posed as GRPO poses them): chosen in the preferred style, rejected
    not; each side right or careless independently."""
    from seekforge.rl.rollout import render_prompt
    from seekforge.tasks import get_task

    task, rng = get_task(TASK, **KNOBS), random.Random(seed)
    with open(path, "w") as f:
        for row in task.rows(split, n, seed):
            sides = [task.careless(row, rng) if rng.random() < 0.5 else row for _ in range(2)]
            f.write(json.dumps({"prompt": render_prompt(row.prompt, TEMPLATE, tokenizer),
                                "chosen": styled(sides[0].solution, sides[0].answer, True),
                                "rejected": styled(sides[1].solution, sides[1].answer, False)}) + "\n")


def measure(trainer, scorer, n: int, seed: int, max_tokens: int) -> dict:
    """On held-out problems: the preferred share of 4 samples each at temperature 1, the reward model's mean
    score of them, and accuracy by the accuracy rule: greedy, and R1's pass@1 (the mean of 4 samples at
    temperature 1)."""
    from seekforge.rl.evaluate import EvalConfig, evaluate
    from seekforge.rl.rollout import generate
    from seekforge.tasks import get_task

    llm, rows = trainer.llm, get_task(TASK, **KNOBS).rows("test", n, seed)
    llm.reset_prefix_cache()
    with trainer.autocast(cache=False):
        r = generate(llm, rows, n=4, temperature=1.0, max_tokens=max_tokens, seed=seed, template=TEMPLATE)
        greedy = evaluate(llm, EvalConfig(task=TASK, task_knobs=KNOBS, n=n, seed=seed, max_tokens=max_tokens,
                                          template=TEMPLATE))
        sampled = evaluate(llm, EvalConfig(task=TASK, task_knobs=KNOBS, n=n, seed=seed, max_tokens=max_tokens,
                                           template=TEMPLATE, samples=4, temperature=1.0))
    texts = [(r.prompts[i], c.text) for i, g in enumerate(r.groups) for c in g]
    scores = scorer.score([p for p, _ in texts], [t for _, t in texts])
    return {"preferred_share": sum(prefers(t) for _, t in texts) / len(texts),
            "reward_model_score": sum(scores) / len(scores), "greedy_accuracy": greedy["accuracy"],
            "sampled_accuracy": sampled["accuracy"],
            "samples": len(texts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/rm-demo", help="working directory (its stages' run directories)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--sft-steps", type=int, default=250)
    ap.add_argument("--rm-steps", type=int, default=80)
    ap.add_argument("--grpo-steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4, help="GRPO learning rate")
    ap.add_argument("--temperature", type=float, default=1.0, help="GRPO's rollout temperature")
    ap.add_argument("--scale-rewards", default="group", help="GRPO's advantage scaling: group, batch or none (the "
                                                            "group mean is subtracted in every case)")
    ap.add_argument("--loss-type", default="grpo", help="GRPO's loss aggregation")
    ap.add_argument("--rule-share", type=float, default=3.0, help="the rule-rewarded task's share of the prompts "
                                                                  "(the reward model's task: 1)")
    ap.add_argument("--beta", type=float, default=0.1, help="GRPO's KL weight to the initial policy")
    ap.add_argument("--keep", action="store_true", help="reuse the policy and the reward model already in --out "
                                                        "(their seconds are then not recorded); GRPO runs again")
    ap.add_argument("--eval-n", type=int, default=100, help="held-out problems measured after GRPO")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from seekforge.configio import from_dict
    from seekforge.rl.grpo import GRPOTrainer, load_grpo_config
    from seekforge.rl.reward_model import LocalRewardModel
    from seekforge.train.reward import RMConfig, evaluate_checkpoint, run as train_rm
    from seekforge.tokenizer import Tokenizer
    from seekforge.train.sft import SFTConfig, run as sft

    seconds, quiet = {}, dict(progress=False, tensorboard=False, seed=args.seed, device="cpu")
    policy, rm = out / "policy" / "final", out / "rm" / "final"
    keep_policy = args.keep and (policy / "config.json").is_file()
    keep_rm = keep_policy and (rm / "config.json").is_file()
    start = time.perf_counter()
    if keep_policy:
        tokenizer = Tokenizer.from_pretrained(out / "tokenizer")
    else:
        shutil.rmtree(out / "policy", ignore_errors=True)
        tokenizer = policy_data(out / "sft.jsonl", out / "tokenizer", 6000, args.seed)
    sft(from_dict(SFTConfig, dict(model="tiny", model_overrides=SHAPE, tokenizer=str(out / "tokenizer"),
                                  data=str(out / "sft.jsonl"), seq_len=128, batch_size=16, **phases(args.sft_steps),
                                  lr=3e-3, final_lr=3e-4, mtp_weight=0.0,
                                  eval_every=args.sft_steps, save_every=args.sft_steps, val_fraction=0.02, **quiet)),
        out / "policy") if not keep_policy else None
    if not keep_policy:
        seconds["policy_sft"] = time.perf_counter() - start

    start = time.perf_counter()
    start = time.perf_counter()
    pairs(out / "pairs.jsonl", tokenizer, "train", 1200, args.seed)
    pairs(out / "pairs_held_out.jsonl", tokenizer, "test", 300, args.seed + 1)
    rm_steps = args.rm_steps
    if not keep_rm:
        shutil.rmtree(out / "rm", ignore_errors=True)
        train_rm(from_dict(RMConfig, dict(init_from=str(policy), data=str(out / "pairs.jsonl"), seq_len=128,
                                          batch_size=16, **phases(rm_steps), lr=1e-4, final_lr=1e-5,
                                          eval_every=rm_steps, save_every=rm_steps, val_fraction=0.1, **quiet)),
                 out / "rm")
    last = [json.loads(x) for x in (out / "rm" / "metrics.jsonl").read_text().splitlines()][-1]
    held_out = evaluate_checkpoint(rm, out / "pairs_held_out.jsonl", device="cpu")
    if not keep_rm:
        seconds["reward_model"] = time.perf_counter() - start

    knobs = json.dumps(KNOBS)
    rules = f"{{task: {TASK}, knobs: {knobs}, rewards: [accuracy, format], share: {args.rule_share}}}"
    preference = f"{{task: {TASK}, knobs: {knobs}, label: preference, rewards: reward_model, share: 1.0}}"
    grpo = [f"init_from={policy}", f"reward_model.path={rm}", f"steps={args.grpo_steps}",
            f"template={TEMPLATE}", "prompts_per_step=8", "group_size=8", "max_tokens=48", f"lr={args.lr}",
            f"temperature={args.temperature}", f"scale_rewards={args.scale_rewards}", f"loss_type={args.loss_type}",
            f"beta={args.beta}", "eval_every=1000", "eval_n=50", f"save_every={args.grpo_steps}", "progress=false",
            "tensorboard=false", f"seed={args.seed}", "device=cpu"]
    scorer = LocalRewardModel(rm, "cpu")
    runs = {}
    # the mixed run; the same at learning rate 0; the rule-rewarded task alone (the control for accuracy)
    for name, tasks in (("trained", [rules, preference]), ("lr0", [rules, preference]), ("rules_only", [rules])):
        start = time.perf_counter()
        shutil.rmtree(out / f"grpo_{name}", ignore_errors=True)
        trainer = GRPOTrainer(load_grpo_config(None, [*grpo, f"tasks=[{', '.join(tasks)}]"]), out / f"grpo_{name}")
        if name == "lr0":  # the schedule refuses a peak of 0: the same run with every update at learning rate 0
            trainer.schedule = SimpleNamespace(lr=lambda step: 0.0)
        before = measure(trainer, scorer, args.eval_n, args.seed, 48)
        trainer.train()
        after = measure(trainer, scorer, args.eval_n, args.seed, 48)
        records = [json.loads(x) for x in (out / f"grpo_{name}" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if r.get("kind") != "eval"]
        runs[name] = {"after": after, "reward_accuracy_first_last": [steps[0].get("reward_accuracy"),
                                                                     steps[-1].get("reward_accuracy")],
                      "reward_model_first_last": [steps[0].get("reward_reward_model"),
                                                  steps[-1].get("reward_reward_model")]}
        runs[name]["before"] = before
        seconds[f"grpo_{name}"] = time.perf_counter() - start
    result = {
        "task": TASK, "task_knobs": KNOBS, "preference": f"the reasoning's last line ends with {WORD!r}",
        "policy": {"shape": SHAPE, "sft_steps": args.sft_steps, "slip_rate": SLIP_RATE, "preferred_share_in_data": 0.5},
        "reward_model": {"steps": rm_steps, "train_pairs": 1200, "val_accuracy": last.get("eval_accuracy"),
                         "held_out": held_out},
        "grpo": {"steps": args.grpo_steps, "prompts_per_step": 8, "template": TEMPLATE,
                 "temperature": args.temperature, "scale_rewards": args.scale_rewards, "loss_type": args.loss_type,
                 "beta": args.beta, "group_size": 8, "lr": args.lr,
                 "tasks": "chain_sum by accuracy + format, chain_sum by the reward model",
                 "rule_share": args.rule_share / (args.rule_share + 1)},
        "trained": runs["trained"], "lr0": runs["lr0"], "rules_only": runs["rules_only"],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "machine": {"device": "cpu", "threads": args.threads, "torch": torch.__version__}, "seed": args.seed,
        "command": " ".join(["python bench/reward_model.py", *sys.argv[1:]]),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
