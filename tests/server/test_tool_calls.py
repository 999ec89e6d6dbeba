"""The DeepSeek-V3 tool-call parser: whole texts, and streams cut at every possible place."""

import pytest

from seekforge.server.tool_calls import ToolCallParser

CALL = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```<｜tool▁call▁end｜>"
BEGIN, END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
ONE = CALL.format(name="get_weather", args='{"city": "Paris"}')
TWO = CALL.format(name="get_time", args='{"utc": true}')
CASES = [
    # (text, content, [(name, arguments)])
    ("no calls at all", "no calls at all", []),
    (BEGIN + ONE + END, "", [("get_weather", '{"city": "Paris"}')]),
    ("Let me look." + BEGIN + ONE + "\n" + TWO + END, "Let me look.", [("get_weather", '{"city": "Paris"}'),
                                                                       ("get_time", '{"utc": true}')]),
    (BEGIN + ONE + END + " done", " done", [("get_weather", '{"city": "Paris"}')]),
    (BEGIN + ONE[:ONE.index("is")], "", [("get_weather", '{"city": "Par')]),  # cut off by max_tokens
    (BEGIN + "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_we", "", []),  # a header cut off names no call
    ("a <｜tool▁calls▁beg", "a <｜tool▁calls▁beg", []),  # an unfinished marker is text
]


def _parts(text, pieces):
    parser = ToolCallParser()
    outs = [parser.feed(p) for p in pieces] + [parser.finish()]
    content = "".join(c for c, _ in outs)
    args: dict[int, str] = {}
    names: dict[int, str] = {}
    for _, deltas in outs:
        for d in deltas:
            if d.id is not None:
                assert d.index not in names, "only a call's first delta names it"
                names[d.index] = d.name
            args[d.index] = args.get(d.index, "") + d.arguments
    return content, [(names[i], args[i]) for i in sorted(names)], parser


@pytest.mark.parametrize("text, content, calls", CASES)
def test_whole_text(text, content, calls):
    got_content, got_calls = ToolCallParser().parse(text)
    assert (got_content, [(c.name, c.arguments) for c in got_calls]) == (content, calls)
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("text, content, calls", CASES)
def test_streamed_in_pieces_equals_whole(text, content, calls):
    for size in (1, 2, 3, 7):
        got = _parts(text, [text[i:i + size] for i in range(0, len(text), size)])
        assert got[:2] == (content, calls), size
    for cut in range(len(text) + 1):
        assert _parts(text, [text[:cut], text[cut:]])[:2] == (content, calls), cut


def test_markers_are_never_streamed_as_content():
    parser = ToolCallParser()
    assert parser.feed("Hi <｜tool▁calls") == ("Hi ", [])
    content, deltas = parser.feed("▁begin｜>" + ONE[:30])
    assert content == "" and deltas == []
