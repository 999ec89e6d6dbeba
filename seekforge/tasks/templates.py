"""Prompt templates for reasoning RL, and the same template as a Jinja chat template."""

R1_ZERO_PREAMBLE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>."
)
R1_ZERO_TEMPLATE = R1_ZERO_PREAMBLE + "\nUser: {question}\nAssistant: <think>"

# R1-Zero's template for chats, saved with the checkpoints trained on it so that `seekforge chat` and the
# server pose questions as the model learned them: one user message with the generation prompt renders
# BOS + r1_zero_prompt(question), the ids that RL rollouts and evaluation feed (a text prompt gets BOS).
# A system message replaces the preamble; an earlier answer is written as it was given, then EOS (where
# the pretraining documents end).
R1_ZERO_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m['content'] -%}"
    "{%- endfor -%}"
    "{{- ns.system if ns.system else " + repr(R1_ZERO_PREAMBLE) + " -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '\\nUser: ' + m['content'] -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- '\\nAssistant: ' + m['content'] + eos_token -}}"
    "{%- elif m['role'] != 'system' -%}"
    "{{- raise_exception('unsupported chat role ' ~ m['role'] ~ ': use system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\nAssistant: <think>' -}}{%- endif -%}"
)


def r1_zero_prompt(question: str) -> str:
    """DeepSeek-R1-Zero's training template; it ends inside an opened <think> block, so the
    completion continues the reasoning and format_reward accepts it without its own <think>."""
    return R1_ZERO_TEMPLATE.format(question=question)
