"""Splitting a reasoning model's output into `reasoning_content` (inside <think> ... </think>) and `content`.

DeepSeek-R1 style: the answer may open with <think> (after optional whitespace), or the chat template
may already have opened it, in which case everything up to </think> is reasoning. The tags themselves
belong to neither part. The parser is fed the text as it streams: a tag split across deltas is held
back until it is complete (or proven not to be a tag), so concatenating the streamed parts gives
exactly what parsing the whole text at once gives. The server's `reasoning_content` and the chat
command's dimmed rendering both split here.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether a rendered chat prompt ends inside an open <think> block (the template opened it)."""
    return prompt.rstrip().endswith(OPEN)


class ReasoningParser:
    def __init__(self, opened: bool = False):
        # "start": before any output, an opening tag may still come; "think": inside; "answer": after.
        self.state = "think" if opened else "start"
        self.pending = ""
        self.saw_reasoning = opened

    def feed(self, text: str) -> tuple[str, str]:
        """Returns (reasoning, content) that `text` completes; a possible partial tag stays pending."""
        text = self.pending + text
        self.pending = ""
        reasoning, content = [], []
        while text:
            if self.state == "start":
                stripped = text.lstrip()
                if stripped.startswith(OPEN):
                    self.state, self.saw_reasoning = "think", True
                    text = stripped[len(OPEN):]
                elif OPEN.startswith(stripped):  # whitespace or a prefix of the tag: wait for more
                    self.pending = text
                    return "".join(reasoning), "".join(content)
                else:
                    self.state = "answer"
            elif self.state == "think":
                at = text.find(CLOSE)
                if at >= 0:
                    reasoning.append(text[:at])
                    text = text[at + len(CLOSE):]
                    self.state = "answer"
                    continue
                keep = partial_tag(text, CLOSE)
                reasoning.append(text[:len(text) - keep])
                self.pending = text[len(text) - keep:]
                break
            else:
                content.append(text)
                break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Flush what was held back: an unfinished tag is text of the part it was in."""
        text, self.pending = self.pending, ""
        if self.state == "think":
            return text, ""
        return "", text

    def parse(self, text: str) -> tuple[str, str]:
        """The whole text at once: (reasoning, content)."""
        r1, c1 = self.feed(text)
        r2, c2 = self.finish()
        return r1 + r2, c1 + c2


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    return next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:n])), 0)
