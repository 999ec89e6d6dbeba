"""DualChain through LLM.generate and `seekforge generate --dual-chain`: a decision on every output, and the
tokens of a request the calculator never touched identical to a run without the dual chain."""

from __future__ import annotations

import json

import pytest

from seekforge import LLM, SamplingParams
from seekforge.cli import main
from seekforge.dual_chain import GENERATIVE, RULE, DualChain, RuleChain
from seekforge.tasks import r1_zero_prompt

pytestmark = [pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def dual():
    chain = DualChain(RuleChain(timeout_s=5.0), threshold=0.5)
    yield chain
    chain.close()


def test_generate_with_the_dual_chain(tiny_checkpoint, dual):
    llm = LLM(tiny_checkpoint(), dtype="float32")
    prompts = [r1_zero_prompt("What is 3 + 4 + 5?"), r1_zero_prompt("Tell me a story")]
    params = SamplingParams(temperature=0, max_tokens=12)
    plain = llm.generate(prompts, params)
    outs = llm.generate(prompts, params, dual_chain=dual)
    assert all(o.outputs[0].num_inserted_tokens == 0 for o in outs)  # the random model writes no "3 + 4 ="
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert all(o.dual_chain is None for o in plain) and all(o.logprobs is not None for o in outs)
    first, second = outs[0].dual_chain, outs[1].dual_chain
    assert (first.chain, first.answer, first.rule.derivation) == (RULE, "12", "3 + 4 + 5 = 12")
    assert (second.chain, second.rule) == (GENERATIVE, None)
    assert params.logprobs is None and params.inserter is None  # the caller's params are left as they were


def test_generate_command_prints_the_decision(tiny_checkpoint, capsys):
    path = str(tiny_checkpoint())
    assert main(["generate", path, "--prompt", "What is 6 * 7?", "--max-tokens", "4", "--temperature", "0",
                 "--dual-chain", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["dual_chain"]["chain"] == RULE and record["dual_chain"]["answer"] == "42"
    assert main(["generate", path, "--prompt", "What is 6 * 7?", "--max-tokens", "4", "--dual-chain"]) == 0
    assert "[dual chain] answer: 42 (from the rule chain" in capsys.readouterr().out
    assert main(["generate", path, "--prompt", "hi", "--rule-table", "t.csv"]) == 2
    assert "add --dual-chain" in capsys.readouterr().err


def test_chat_command_prints_the_decision_after_each_reply(tiny_checkpoint, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 3 * 4?\nTell me a story\n/exit\n"))
    assert main(["chat", str(tiny_checkpoint()), "--max-tokens", "4", "--temperature", "0", "--dual-chain"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[dual chain]")]
    assert len(lines) == 2
    assert lines[0].startswith("[dual chain] answer: 14 (from the rule chain") and "2 + 3 * 4 = 14" in lines[0]
    assert "from the generative chain" in lines[1] and "no solver applies" in lines[1]
