"""Rule-based rewards for reasoning RL, with the R1-Zero prompt they go with.

    rewards = {name: safe_reward(fn, timeout_s=5) for name, fn in load_reward_functions("accuracy,format").items()}
    r = rewards["accuracy"](r1_zero_prompt(row.prompt), completion, **row_fields(row))

rules.py (accuracy, format), shaping.py (length and repetition penalties), safe.py (each call behind a
timeout and an exception barrier, with counters), loading.py (rewards by name or file.py:function),
reward_set.py (a run's weighted set).

May import seekforge.errors, configio and tasks (answers, the task rows' fields); the RL stages use it.
"""

from seekforge.rewards.loading import REWARDS, load_reward_functions, row_fields
from seekforge.rewards.reward_set import RewardSet
from seekforge.rewards.rules import accuracy_reward, format_reward
from seekforge.rewards.safe import RewardCounters, SafeReward, safe_reward
from seekforge.rewards.shaping import length_penalty, repetition_penalty
from seekforge.tasks.answers import extract_answer
from seekforge.tasks.templates import r1_zero_prompt

__all__ = [
    "REWARDS", "RewardCounters", "RewardSet", "SafeReward", "accuracy_reward", "extract_answer", "format_reward",
    "length_penalty", "load_reward_functions", "r1_zero_prompt", "repetition_penalty", "row_fields", "safe_reward",
]
