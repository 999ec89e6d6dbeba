"""`seekforge chat PATH`: an interactive conversation through the chat template, streamed.

Each turn renders the whole conversation with the tokenizer's chat template (earlier answers lose
their reasoning, as DeepSeek-R1's template does), streams the reply, and shows the reasoning inside
<think>...</think> dimmed and apart from the answer. Commands: /reset (forget the conversation),
/think on|off (open answers with <think>), /exit.
"""

from __future__ import annotations

import sys

from seekforge.reasoning import CLOSE, OPEN, partial_tag

DIM, RESET = "\x1b[2m", "\x1b[0m"


class ThinkRenderer:
    """Writes streamed text, reasoning (inside <think>...</think>) dimmed, a blank line before the
    answer, and the tags themselves hidden. Tags split across deltas are held back until complete."""

    def __init__(self, out, color: bool, thinking: bool = False):
        self.out, self.color = out, color
        self.thinking = thinking
        self.pending = ""
        if thinking:
            self._style(True)

    def _style(self, dim: bool) -> None:
        if self.color:
            self.out.write(DIM if dim else RESET)

    def feed(self, text: str) -> None:
        text = self.pending + text
        self.pending = ""
        while text:
            tag = CLOSE if self.thinking else OPEN
            at = text.find(tag)
            if at >= 0:
                self.out.write(text[:at])
                text = text[at + len(tag):]
                self.thinking = not self.thinking
                if self.thinking:
                    self._style(True)
                else:
                    self._style(False)
                    self.out.write("\n\n")
                    text = text.lstrip("\n")
                continue
            keep = partial_tag(text, tag)
            self.out.write(text[:len(text) - keep])
            self.pending = text[len(text) - keep:]
            break
        self.out.flush()

    def close(self) -> None:
        self.out.write(self.pending)
        self.pending = ""
        if self.thinking:
            self._style(False)
        self.out.write("\n")
        self.out.flush()


def register(subparsers) -> None:
    from seekforge.commands.generate import add_engine_args, add_sampling_args

    p = subparsers.add_parser("chat", help="talk to a model interactively (chat template, streamed)")
    add_engine_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--thinking", action="store_true", help="open every answer with <think> (R1-style reasoning)")
    add_sampling_args(p, temperature=0.6, top_p=0.95, max_tokens=2048)
    p.set_defaults(func=run)


def run(args) -> int:
    from seekforge.commands.generate import engine_from_args, sampling_from_args
    from seekforge.errors import ConfigError

    params = sampling_from_args(args)
    llm = engine_from_args(args)
    tok = llm.tokenizer
    if tok is None:
        raise ConfigError(f"{args.path} has no tokenizer.json: chat needs a tokenizer (use `seekforge generate "
                          f"--token-ids` for token ids)")
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
            ids = tok.encode_chat(messages, add_generation_prompt=True, thinking=thinking)
            renderer = ThinkRenderer(sys.stdout, color, thinking)
            reply = ""
            for out in llm.stream([ids], params):
                delta = out.outputs[0].delta_text
                reply += delta
                renderer.feed(delta)
            renderer.close()
        except ConfigError as err:  # e.g. the conversation outgrew the context: keep the session alive
            messages.pop()
            print(f"error: {err} (/reset starts over)", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": (OPEN + "\n" if thinking else "") + reply})
    return 0
