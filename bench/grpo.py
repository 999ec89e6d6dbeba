"""GRPO step time and rollout tokens/s: seekforge's GRPO trainer vs TRL's GRPOTrainer, side by side in one run.

    python bench/grpo.py --from runs/quickstart/base/final                 # CPU, the quickstart base model
    python bench/grpo.py --preset small --device cuda --prompts 32 --group 16 --max-tokens 256   # H200

Both trainers start from the same checkpoint in Hugging Face layout (TRL loads it with transformers'
DeepseekV3ForCausalLM, MTP layers ignored as transformers does), on the same task rows (R1-Zero prompts),
with the same rewards (accuracy + format), group size, prompts per step, completion budget, stop tokens (EOS
and "</answer>"), temperature 1, learning rate, loss ("grpo": per-sequence token mean), clip 0.2, beta 0, one
update per batch, truncated completions trained on. A random --preset model also gets a dense reward (the
share of digits it writes) on both sides, so that groups differ and every step really updates; its
completions end only at a stop token sampled by chance, so their lengths differ between the two sides from
run to run: compare rollout tokens/s (step times follow the lengths). seekforge generates on its inference
engine with the live policy weights (CUDA graphs on a GPU); TRL with transformers' `generate` (its default
without vLLM).

Measured per step (median over the steps after --warmup): wall time of a whole GRPO step (rollout, rewards,
update), and rollout tokens/s = completion tokens / generation time (TRL: time inside `model.generate`).
TRL must be installed (`pip install trl`, or the `bench` extra); it is not a seekforge dependency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

TASK, KNOBS = "chain_sum", {"max_value": 9, "min_terms": 2, "max_terms": 4}


def digit_share(prompt, completion, **_) -> float:
    """A dense reward for random-weight models (which never answer right): the share of digits written,
    so that groups differ and both trainers really update."""
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


def make_checkpoint(args, where: Path) -> Path:
    """--from as is, or a random --preset model with a tokenizer trained on the task's text."""
    if args.init_from:
        return Path(args.init_from)
    from seekforge.data.corpus import render_example
    from seekforge.model import ModelConfig, Transformer
    from seekforge.tasks import get_task
    from seekforge.tokenizer import Tokenizer

    docs = [render_example(r) for r in get_task(TASK, **KNOBS).rows("train", 2000, 0)]
    tok = Tokenizer.train(docs, args.vocab)
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset).replace(vocab_size=tok.vocab_size, n_mtp_modules=0)
    path = where / "model"
    Transformer(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_seekforge(args, ckpt: Path, out: Path) -> dict:
    from seekforge.rl.grpo import GRPOTrainer, load_grpo_config

    cfg = load_grpo_config(None, [
        f"init_from={ckpt}", f"task={TASK}", f"task_knobs={json.dumps(KNOBS)}", f"steps={args.steps}",
        f"prompts_per_step={args.prompts}", f"group_size={args.group}", f"max_tokens={args.max_tokens}",
        f"lr={args.lr}", "loss_type=grpo", "eps_low=0.2", "eps_high=0.2", "beta=0", "mu=1", "mask_truncated=false",
        f"rewards=[accuracy, format{f', {Path(__file__).resolve()}:digit_share' if not args.init_from else ''}]",
        f"micro_batch_size={args.micro_batch}", f"device={args.device}", f"precision={args.precision}",
        f"eval_every={10**6}", "eval_n=1", "save_every=1000000", "progress=false", "tensorboard=false"])
    trainer = GRPOTrainer(cfg, out)
    trainer.evaluate = lambda: {"accuracy": 0.0}  # timing only: skip the held-out evaluations
    trainer.train()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") != "eval"][args.warmup:]
    return {"step_s": statistics.median(r["step_s"] for r in steps),
            "rollout_tokens_per_s": statistics.median(r["rollout_tokens_per_s"] for r in steps),
            "rollout_s": statistics.median(r["rollout_s"] for r in steps),
            "update_s": statistics.median(r["update_s"] for r in steps),
            "completion_length": statistics.mean(r["completion_length"] for r in steps),
            "accuracy": statistics.mean(r["accuracy"] for r in steps)}


def run_trl(args, ckpt: Path, out: Path) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback

    from seekforge.rewards import accuracy_reward, format_reward
    from seekforge.tasks import get_task, r1_zero_prompt
    from seekforge.tokenizer import Tokenizer
    from seekforge.rl.rollout import answer_stop_ids

    n_rows = args.prompts * (args.steps + 1)
    rows = get_task(TASK, **KNOBS).rows("train", n_rows, 12345)
    data = Dataset.from_list([{"prompt": r1_zero_prompt(r.prompt), "answer": r.answer, "task": r.task} for r in rows])

    def accuracy(prompts, completions, answer, task, **_):
        return [accuracy_reward(p, c, answer=a, task=t) for p, c, a, t in zip(prompts, completions, answer, task)]

    def fmt(prompts, completions, **_):
        return [format_reward(p, c) for p, c in zip(prompts, completions)]

    tok = PreTrainedTokenizerFast.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    # the same stop tokens as seekforge's rollouts (EOS, and "</answer>" where it is one token): equal work
    stops = torch.tensor([tok.eos_token_id, *answer_stop_ids(Tokenizer.from_pretrained(ckpt))])
    gen = {"seconds": 0.0, "tokens": 0, "calls": []}
    real_generate = model.generate

    def timed_generate(*a, **kw):  # TRL's rollouts: count completion tokens up to and including the stop
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        ids = real_generate(*a, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        prompt_len = kw["input_ids"].shape[1] if "input_ids" in kw else a[0].shape[1]
        new = ids[:, prompt_len:]
        is_stop = torch.isin(new, stops.to(new.device))
        ended = is_stop.int().cumsum(-1)
        tokens = int(((ended == 0) | ((ended == 1) & is_stop)).sum())
        gen["calls"].append((dt, tokens))
        return ids

    model.generate = timed_generate
    step_times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t)

    cuda = args.device.startswith("cuda")
    config = trl.GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.prompts * args.group, num_generations=args.group,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.max_tokens, temperature=1.0, top_p=1.0, learning_rate=args.lr,
        lr_scheduler_type="constant", max_steps=args.steps, loss_type="grpo", scale_rewards="group", epsilon=0.2,
        beta=0.0, mask_truncated_completions=False, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=not cuda, bf16=cuda and args.precision != "fp32", seed=0, shuffle_dataset=False,
        dataloader_num_workers=0, generation_kwargs={"eos_token_id": stops.tolist()})
    def digits(prompts, completions, **_):
        return [digit_share(p, c) for p, c in zip(prompts, completions)]

    rewards = [accuracy, fmt] + ([] if args.init_from else [digits])
    trainer = trl.GRPOTrainer(model=model, reward_funcs=rewards, args=config, train_dataset=data,
                              processing_class=tok, callbacks=[Clock()])
    trainer.train()
    steady = slice(args.warmup, None)
    calls = gen["calls"][steady]
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h][steady]
    return {"step_s": statistics.median(step_times[steady]),
            "rollout_tokens_per_s": statistics.median(t / s for s, t in calls),
            "rollout_s": statistics.median(s for s, _ in calls),
            "completion_length": statistics.mean(h["completions/mean_length"] for h in logs),
            "accuracy": statistics.mean(h.get("rewards/accuracy/mean", float("nan")) for h in logs),
            "trl": trl.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="init_from", help="checkpoint (HF layout with tokenizer); default: a random --preset")
    p.add_argument("--preset", default="tiny", help="model preset when no --from (default tiny)")
    p.add_argument("--vocab", type=int, default=1024, help="tokenizer size for a random --preset model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (default 16)")
    p.add_argument("--group", type=int, default=8, help="samples per prompt, G (default 8)")
    p.add_argument("--max-tokens", type=int, default=64, help="completion budget (default 64)")
    p.add_argument("--micro-batch", type=int, default=128, help="seekforge sequences per forward/backward")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    p.add_argument("--only", choices=["seekforge", "trl"], help="run one side only")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()

    import transformers

    results = {"task": TASK, "task_knobs": KNOBS, "prompts": args.prompts, "group": args.group,
               "max_tokens": args.max_tokens, "steps": args.steps, "warmup": args.warmup, "device": args.device,
               "torch": torch.__version__, "transformers": transformers.__version__,
               "threads": torch.get_num_threads(), "model": args.init_from or f"random {args.preset}"}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = make_checkpoint(args, tmp)
        if args.only != "trl":
            results["seekforge"] = run_seekforge(args, ckpt, tmp / "seekforge")
            print("seekforge", json.dumps(results["seekforge"]), flush=True)
        if args.only != "seekforge":
            results["trl"] = run_trl(args, ckpt, tmp / "trl")
            print("trl", json.dumps(results["trl"]), flush=True)
    if "seekforge" in results and "trl" in results:
        s, t = results["seekforge"], results["trl"]
        print(f"\n| measure | seekforge | TRL {t['trl']} | ratio |\n|---|---|---|---|")
        print(f"| GRPO step (s) | {s['step_s']:.2f} | {t['step_s']:.2f} | {t['step_s'] / s['step_s']:.2f}x faster |")
        print(f"| rollout tokens/s | {s['rollout_tokens_per_s']:,.0f} | {t['rollout_tokens_per_s']:,.0f} | "
              f"{s['rollout_tokens_per_s'] / t['rollout_tokens_per_s']:.2f}x |")
        print(f"| mean completion length | {s['completion_length']:.1f} | {t['completion_length']:.1f} | |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
