"""Prompt templates for reasoning RL."""

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>.\nUser: {question}\nAssistant: <think>"
)


def r1_zero_prompt(question: str) -> str:
    """DeepSeek-R1-Zero's training template; it ends inside an opened <think> block, so the
    completion continues the reasoning and format_reward accepts it without its own <think>."""
    return R1_ZERO_TEMPLATE.format(question=question)
