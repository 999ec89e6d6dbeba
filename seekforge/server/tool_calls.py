"""DeepSeek-V3's tool calls: parsing them out of the model's answer (whole, or as it streams), and the
grammar that makes the model call a tool when tool_choice requires one.

The format (DeepSeek-V3's chat template writes earlier calls this way, and the model answers in kind):

    TEXT<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

TEXT before the calls is the message's content; each call gives a name and its arguments (the JSON text
as written). As with the reasoning split (seekforge.reasoning), the parser is fed the text as it streams
and holds back what may be the start of a marker, so the concatenated deltas equal the whole-text parse:
a call's first delta carries its id and name, later ones pieces of its arguments.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from seekforge.reasoning import partial_tag

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
ARGS_OPEN, ARGS_CLOSE = "\n```json\n", "\n```" + CALL_END


@dataclass
class CallDelta:
    index: int
    arguments: str
    id: str | None = None  # set on a call's first delta, with its name
    name: str | None = None


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str


class ToolCallParser:
    def __init__(self):
        # "content": answer text; "calls": between calls (after the opening marker); "header": inside
        # <｜tool▁call▁begin｜>TYPE<｜tool▁sep｜>NAME```json; "args": a call's arguments
        self.state = "content"
        self.pending = ""
        self.calls: list[ParsedCall] = []

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        """Returns (content, call deltas) that `text` completes; a possible partial marker stays pending."""
        text = self.pending + text
        self.pending = ""
        content, deltas = [], []
        while text:
            if self.state == "content":
                at = text.find(CALLS_BEGIN)
                if at < 0:
                    keep = partial_tag(text, CALLS_BEGIN)
                    content.append(text[:len(text) - keep])
                    self.pending = text[len(text) - keep:]
                    break
                content.append(text[:at])
                text, self.state = text[at + len(CALLS_BEGIN):], "calls"
            elif self.state == "calls":
                text = text.lstrip()
                if text.startswith(CALL_BEGIN):
                    text, self.state = text[len(CALL_BEGIN):], "header"
                elif text.startswith(CALLS_END):  # what follows the calls is answer text again
                    text, self.state = text[len(CALLS_END):], "content"
                elif CALL_BEGIN.startswith(text) or CALLS_END.startswith(text):
                    self.pending = text
                    break
                else:  # stray text between calls: not part of any call
                    text = text[1:]
            elif self.state == "header":
                at = text.find(ARGS_OPEN)
                if at < 0:
                    self.pending = text
                    break
                kind, _, name = text[:at].rpartition(SEP)
                call = ParsedCall(f"call_{uuid.uuid4().hex[:24]}", name.strip(), "")
                self.calls.append(call)
                deltas.append(CallDelta(len(self.calls) - 1, "", call.id, call.name))
                text, self.state = text[at + len(ARGS_OPEN):], "args"
            else:  # args
                at = text.find(ARGS_CLOSE)
                piece = text[:at] if at >= 0 else text[:len(text) - partial_tag(text, ARGS_CLOSE)]
                if piece:
                    self.calls[-1].arguments += piece
                    deltas.append(CallDelta(len(self.calls) - 1, piece))
                if at < 0:
                    self.pending = text[len(piece):]
                    break
                text, self.state = text[at + len(ARGS_CLOSE):], "calls"
        return "".join(content), _merged(deltas)

    def finish(self) -> tuple[str, list[CallDelta]]:
        """Flush what was held back: answer text stays content, a cut-off call keeps the arguments it got,
        and an unfinished call header is dropped (it names no call)."""
        text, self.pending = self.pending, ""
        if self.state == "content":
            return text, []
        if self.state == "args" and text:
            self.calls[-1].arguments += text
            return "", [CallDelta(len(self.calls) - 1, text)]
        return "", []

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        """The whole text at once: (content, calls)."""
        c1, _ = self.feed(text)
        c2, _ = self.finish()
        return c1 + c2, self.calls


def _merged(deltas: list[CallDelta]) -> list[CallDelta]:
    """Consecutive deltas of one call as one."""
    out: list[CallDelta] = []
    for d in deltas:
        if out and out[-1].index == d.index and d.id is None:
            out[-1].arguments += d.arguments
        else:
            out.append(d)
    return out


def forced_call_tag(tools: list[dict], parallel: bool) -> dict:
    """An xgrammar structural tag for an answer that is nothing but calls of `tools` (OpenAI tool dicts) in
    DeepSeek-V3's format, each call's arguments valid under its function's parameters schema: one call, or
    one or more when `parallel`."""
    tags = [{"type": "tag", "begin": f"{CALL_BEGIN}function{SEP}{t['function']['name']}{ARGS_OPEN}",
             "content": {"type": "json_schema", "json_schema": t["function"].get("parameters") or {"type": "object"}},
             "end": ARGS_CLOSE} for t in tools]
    calls = ({"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True} if parallel
             else tags[0] if len(tags) == 1 else {"type": "or", "elements": tags})
    return {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "const_string", "value": CALLS_BEGIN}, calls, {"type": "const_string", "value": CALLS_END}]}}
