"""Reinforcement learning on rule-based rewards (DeepSeek-R1), and what builds on it.

rollout.py (rollouts on the inference engine), loss.py (the GRPO objective as pure tensor functions),
grpo.py (the GRPO trainer, on the training loop of seekforge.train), rejection.py (rejection sampling into
SFT data), distill.py (students trained by SFT on a teacher's traces), evaluate.py (held-out accuracy by
rollouts). The reward functions themselves are seekforge.rewards.

May import seekforge.errors, configio, model, engine, tokenizer, data, tasks, rewards and train; nothing
below it imports this package. Import submodules directly."""
