"""Reinforcement learning on rule-based rewards and a reward model (DeepSeek-R1), and what builds on it.

rollout.py (rollouts on the inference engine), loss.py (the GRPO objective as pure tensor functions),
grpo.py (the GRPO trainer, on the training loop of seekforge.train), mixture.py (several tasks in one run,
each with its own reward sources), reward_model.py (the reward model as GRPO scores with it: in-process or
over HTTP), rejection.py (rejection sampling into SFT data), distill.py (students trained by SFT on a
teacher's traces), evaluate.py (held-out accuracy by rollouts). The reward functions themselves are
seekforge.rewards; the reward model's training is seekforge.train.reward.

May import seekforge.errors, configio, model, engine, tokenizer, data, tasks, rewards and train; nothing
below it imports this package. Import submodules directly."""
