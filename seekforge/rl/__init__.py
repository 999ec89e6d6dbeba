"""Reinforcement learning on rule-based rewards (DeepSeek-R1): rollouts on the inference engine (rollout.py),
the GRPO objective as pure tensor functions (loss.py), the GRPO trainer (grpo.py), rejection sampling into
SFT data (rejection.py), distillation into students by SFT on a teacher's traces (distill.py) and held-out
accuracy by rollouts (evaluate.py). Built on the training loop (seekforge.train), never imported by it. The reward functions themselves are seekforge.rewards. Import submodules directly."""
