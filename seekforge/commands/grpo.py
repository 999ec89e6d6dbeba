"""`seekforge grpo --from CKPT --task NAME --out DIR [--resume] [key=value ...]`: reasoning RL with GRPO (or, with
tasks=[...] in place of --task, several tasks with their own reward sources in one run)."""

from __future__ import annotations

from seekforge.commands import add_run_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "grpo", help="GRPO with rule-based rewards (R1-Zero from a base checkpoint), or mixed with a reward model",
        description="Any GRPOConfig field can be set as key=value, e.g. steps=200 group_size=16 lr=1e-5 "
                    "loss_type=dapo eps_high=0.28 dynamic_sampling=true beta=0.001 rewards=accuracy,format "
                    "task_knobs.max_terms=3. Rollouts run on the inference engine with the policy's live weights. "
                    "loss_type: grpo (mean of sequence means), bnpo (token mean of each micro-batch), dapo (token "
                    "mean of the batch) or dr_grpo (token sum / (sequences x max_tokens)). temperature, top_p and "
                    "top_k shape the rollouts and the update's log-probabilities alike. On a GPU the rollout "
                    "engine's KV cache takes gpu_memory_utilization (default 0.4) of the GPU's total memory less "
                    "what is in use; lower it if the update runs out of memory. Under torchrun (data parallelism: "
                    "parallel.dp_shard / dp_replicate; tp, ep and pp are refused) each rank samples its share of "
                    "the step's groups on its own engine and the update is one process's on the whole batch. "
                    "Mixed rewards: in place of --task, "
                    "'tasks=[{task: chain_sum, rewards: [accuracy, format]}, {task: chain_sum, label: open, rewards: "
                    "reward_model}]' with reward_model.path=RM (a `seekforge rm train` checkpoint, scored in this "
                    "process) or reward_model.url=URL (`seekforge rm serve`); each task may set knobs, "
                    "reward_weights and share (of each step's prompts).")
    p.add_argument("--from", dest="init_from", required=True, metavar="CKPT",
                   help="checkpoint directory in Hugging Face layout with its tokenizer")
    p.add_argument("--task", help="task name (arithmetic, chain_sum, countdown, word_problem, rg:...); required "
                                  "unless tasks=[...] lists the run's tasks")
    add_run_arguments(p, "GRPOConfig")
    p.set_defaults(func=run)


def run(args) -> int:
    from seekforge.parallel.mesh import is_main
    from seekforge.rl.grpo import load_grpo_config, run as grpo

    from seekforge.errors import ConfigError

    task = [f"task={args.task}"] if args.task else []
    cfg = load_grpo_config(args.config, [f"init_from={args.init_from}", *task, *args.overrides])
    if not args.task and not cfg.tasks:
        raise ConfigError("grpo: say which task to train on (--task NAME), or list the run's tasks (tasks=[...])")
    last = grpo(cfg, args.out, resume=args.resume)
    if is_main():  # under torchrun: rank 0 speaks for the run
        eval_part = f", held-out accuracy {last['eval_accuracy']:.3f}" if "eval_accuracy" in last else ""
        print(f"done: reward {last.get('reward', float('nan')):.3f}{eval_part}; model in {args.out}/final, "
              f"report in {args.out}/report.md")
    return 0
