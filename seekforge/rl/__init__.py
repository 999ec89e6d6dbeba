"""Reinforcement learning on rule-based rewards (DeepSeek-R1): rollouts on the inference engine (rollout.py),
the GRPO objective as pure tensor functions (loss.py), the GRPO trainer (grpo.py) and rejection sampling into
SFT data (rejection.py). The reward functions themselves are seekforge.rewards. Import submodules directly."""
