"""`seekforge chat PATH`: an interactive conversation through the chat template, streamed.

Each turn renders the whole conversation with the checkpoint's chat template (a seekforge-trained model's
is the one it was trained with, e.g. R1-Zero's for the quickstart models; DeepSeek's drops the reasoning
of earlier answers), streams the reply, and shows the reasoning inside <think>...</think> dimmed and apart
from the answer, also where the template itself opened <think>. Commands: /reset (forget the
conversation), /think on|off (ask DeepSeek-style templates to open answers with <think>), /exit.
--dual-chain computes the expressions the model writes exactly as it streams, and prints the rule
chain's decision after each reply.
"""

from __future__ import annotations

import sys

from seekforge.reasoning import OPEN, ReasoningParser, prompt_opens_reasoning

DIM, RESET = "\x1b[2m", "\x1b[0m"


class ThinkRenderer:
    """Writes streamed text, reasoning dimmed, a blank line before the answer, and the tags themselves
    hidden. The split is the server's (`seekforge.reasoning.ReasoningParser`): reasoning only where the
    reply opens with <think> (or the prompt opened it), tags split across deltas held back until complete."""

    def __init__(self, out, color: bool, opened: bool = False):
        self.out, self.color = out, color
        self.parser = ReasoningParser(opened=opened)
        self.dimmed = False
        self.answered = False  # </think> has come (and the blank line with it)
        self.after_reasoning = False  # newlines right after </think> give way to the blank line

    def feed(self, text: str) -> None:
        self._write(*self.parser.feed(text))
        self.out.flush()

    def _write(self, reasoning: str, content: str) -> None:
        if reasoning and not self.dimmed:
            self._style(True)
        self.out.write(reasoning)
        if self.parser.saw_reasoning and self.parser.state == "answer" and not self.answered:  # </think> came
            self.answered = True
            if self.dimmed:
                self._style(False)
            self.out.write("\n\n")
            self.after_reasoning = True
        if self.after_reasoning:
            content = content.lstrip("\n")
            self.after_reasoning = not content
        self.out.write(content)

    def _style(self, dim: bool) -> None:
        self.dimmed = dim
        if self.color:
            self.out.write(DIM if dim else RESET)

    def close(self) -> None:
        self._write(*self.parser.finish())
        if self.dimmed:
            self._style(False)
        self.out.write("\n")
        self.out.flush()


def register(subparsers) -> None:
    from seekforge.commands.generate import add_dual_chain_args, add_engine_args, add_sampling_args

    p = subparsers.add_parser("chat", help="talk to a model interactively (chat template, streamed)")
    add_engine_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--thinking", action="store_true",
                   help="open every answer with <think> (R1-style reasoning; DeepSeek-style chat templates)")
    add_sampling_args(p, temperature=0.6, top_p=0.95, max_tokens=2048)
    add_dual_chain_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from seekforge.commands.generate import (describe_decision, dual_chain_from_args, engine_from_args,
                                             sampling_from_args)
    from seekforge.errors import ConfigError

    params = sampling_from_args(args)
    dual = dual_chain_from_args(args)
    llm = engine_from_args(args)
    tok = llm.tokenizer
    if tok is None:
        raise ConfigError(f"{args.path} has no tokenizer.json: chat needs a tokenizer (use `seekforge generate "
                          f"--token-ids` for token ids)")
    if dual is not None:
        params = dual.sampling_params(params, tok)
    interactive = sys.stdin.isatty()
    color = sys.stdout.isatty()
    thinking = args.thinking
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    if interactive:
        print("seekforge chat: /reset forgets the conversation, /think on|off, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(system)
            continue
        if line.startswith("/think"):
            thinking = line.split()[-1] != "off"
            continue
        messages.append({"role": "user", "content": line})
        try:
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, thinking=thinking)
            opened = prompt_opens_reasoning(prompt)
            ids = tok.encode(prompt)  # no special tokens: the template wrote BOS where it wants one
            renderer = ThinkRenderer(sys.stdout, color, opened)
            reply = ""
            for out in llm.stream([ids], params):
                delta = out.outputs[0].delta_text
                reply += delta
                renderer.feed(delta)
            renderer.close()
            if dual is not None:  # the reply streamed as the model wrote it; the decision follows
                print(describe_decision(dual.decide(out, tok, question=line)))
        except ConfigError as err:  # e.g. the conversation outgrew the context: keep the session alive
            messages.pop()
            print(f"error: {err} (/reset starts over)", file=sys.stderr)
            continue
        # the answer as written, the part of it the template opened (e.g. "<think>\n") included
        messages.append({"role": "assistant", "content": (prompt[prompt.rindex(OPEN):] if opened else "") + reply})
    return 0
