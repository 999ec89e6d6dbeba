"""The <think> splitter of the server: whole texts, and streams cut at every possible place."""

import pytest

from seekforge.reasoning import ReasoningParser, prompt_opens_reasoning

CASES = [
    # (opened by the template, output, reasoning, content, saw reasoning)
    (False, "<think>\nplan</think>\n\nanswer", "\nplan", "\n\nanswer", True),
    (False, "  <think>a</think>b", "a", "b", True),
    (False, "no reasoning at all", "", "no reasoning at all", False),
    (False, "text then <think>x</think>", "", "text then <think>x</think>", False),  # only a leading tag opens
    (False, "<thi", "", "<thi", False),  # an unfinished opening tag is content
    (False, "<think>unfinished", "unfinished", "", True),  # cut by max_tokens inside the reasoning
    (False, "<think></think>", "", "", True),
    (True, "plan</think>answer", "plan", "answer", True),
    (True, "plan</thi", "plan</thi", "", True),
    (True, "plan</think>a</think>b", "plan", "a</think>b", True),
    (True, "", "", "", True),
    (False, "", "", "", False),
    (False, "   ", "", "   ", False),
]


@pytest.mark.parametrize("opened, text, reasoning, content, saw", CASES)
def test_whole_text(opened, text, reasoning, content, saw):
    parser = ReasoningParser(opened)
    assert parser.parse(text) == (reasoning, content)
    assert parser.saw_reasoning == saw


@pytest.mark.parametrize("opened, text, reasoning, content, saw", CASES)
def test_streamed_in_pieces_equals_whole(opened, text, reasoning, content, saw):
    for size in (1, 2, 3, 5):
        parser = ReasoningParser(opened)
        parts = [parser.feed(text[i:i + size]) for i in range(0, len(text), size)] + [parser.finish()]
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == (reasoning, content), size
    for cut in range(len(text) + 1):  # every two-piece split
        parser = ReasoningParser(opened)
        parts = [parser.feed(text[:cut]), parser.feed(text[cut:]), parser.finish()]
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == (reasoning, content), cut


def test_tags_are_never_streamed_half():
    parser = ReasoningParser()
    assert parser.feed("<th") == ("", "")
    assert parser.feed("ink>ab</th") == ("ab", "")
    assert parser.feed("ink>c") == ("", "c")


def test_template_detection():
    assert prompt_opens_reasoning("<｜User｜>hi<｜Assistant｜><think>\n")
    assert not prompt_opens_reasoning("<｜User｜>hi<｜Assistant｜>")
    assert not prompt_opens_reasoning("<｜User｜>a <think> b</think><｜Assistant｜>")
