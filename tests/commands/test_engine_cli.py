"""Text in and out of the engine (tokenizer, stop strings, streamed text) and the `generate` / `chat` commands."""

from __future__ import annotations

import io
import json

import pytest

from seekforge import LLM, SamplingParams
from seekforge.cli import main
from seekforge.commands.chat import DIM, RESET, ThinkRenderer
from seekforge.model.hf import from_pretrained
from seekforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    """The shared tiny model and its byte-level BPE tokenizer, without MTP, its weights drawn wider (init_std 0.1)
    so that greedy text varies."""
    return tiny_checkpoint(n_mtp_modules=0, init_std=0.1)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_text_prompts_stop_strings_and_streamed_text(checkpoint, async_scheduling):
    llm = LLM(checkpoint, async_scheduling=async_scheduling)
    assert llm.tokenizer is not None
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate("the quick brown", params)[0]
    assert full.text == llm.tokenizer.decode(full.token_ids, skip_special_tokens=True)
    assert full.finish_reason == "length"
    assert full.prompt_token_ids[0] == llm.tokenizer.bos_id  # plain text gets BOS
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    cut = llm.generate("the quick brown", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert full.token_ids[:len(cut.token_ids)] == cut.token_ids
    streamed = "".join(o.outputs[0].delta_text for o in llm.stream("the quick brown", params))
    assert streamed == full.text
    held = "".join(o.outputs[0].delta_text for o in llm.stream("the quick brown", SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])))
    assert held == cut.text  # text that might start a stop string is held back, never taken back


def _deepseek_style(path):
    """DeepSeek's tokenizer layout: tokenizer_config.json as DeepSeek-V3/R1 ship it (LlamaTokenizerFast,
    add_bos_token, AddedToken dicts), tokenizer.json whose post-processor puts BOS in front of a text."""
    tok = Tokenizer.from_pretrained(path)
    added = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": {**added, "content": tok.bos_token},
              "eos_token": {**added, "content": tok.eos_token}, "pad_token": {**added, "content": tok.eos_token},
              "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 16384,
              "sp_model_kwargs": {}, "unk_token": None, "tokenizer_class": "LlamaTokenizerFast",
              "chat_template": tok.chat_template}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    bos = {"SpecialToken": {"id": tok.bos_token, "type_id": 0}}
    data["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {tok.bos_token: {"id": tok.bos_token, "ids": [tok.bos_id], "tokens": [tok.bos_token]}}}]}
    (path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")


def _without_bos(path):
    """A tokenizer that adds nothing to a text (no post-processor), as many non-DeepSeek tokenizers."""
    data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    data["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")


@pytest.mark.parametrize("layout", [None, _deepseek_style, _without_bos], ids=["seekforge", "deepseek", "no-bos"])
def test_engine_feeds_a_text_as_transformers_encodes_it(checkpoint, tmp_path, layout):
    """The engine follows the checkpoint's tokenizer on BOS, as transformers' AutoTokenizer does; a rendered chat
    (which opens with BOS) gets no second one, as transformers' apply_chat_template encodes it."""
    transformers = pytest.importorskip("transformers")
    Tokenizer.from_pretrained(checkpoint).save_pretrained(tmp_path)
    if layout is not None:
        layout(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    llm = LLM(from_pretrained(checkpoint), tokenizer=tmp_path)
    params = SamplingParams(temperature=0, max_tokens=1)
    for text in ("the quick brown", " fox 12, jumps", "<think>x"):
        assert llm.generate(text, params)[0].prompt_token_ids == hf(text).input_ids, text
    assert (hf("x").input_ids[0] == llm.tokenizer.bos_id) == (layout is not _without_bos)
    chat = [{"role": "user", "content": "the lazy dog"}]
    rendered = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    want = hf.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert want[0] == llm.tokenizer.bos_id and want[1] != llm.tokenizer.bos_id
    assert llm.generate(rendered, params)[0].prompt_token_ids == want
    assert llm.tokenizer.encode_chat(chat) == want


def test_generate_command(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "the lazy", "--prompt", "a fox", "--max-tokens", "6",
                 "--temperature", "0", "--ignore-eos", "--json", "--logprobs", "2"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    llm = LLM(checkpoint)
    ref = llm.generate(["the lazy", "a fox"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [r["token_ids"] for r in records] == [o.token_ids for o in ref]
    assert [r["text"] for r in records] == [o.text for o in ref]
    assert all(len(r["logprobs"]) == 6 and len(r["logprobs"][0]["top"]) == 2 for r in records)
    assert main(["generate", str(checkpoint), "--token-ids", "5 6 7", "--max-tokens", "3", "--temperature", "0",
                 "--ignore-eos", "--stream"]) == 0
    ids = llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert capsys.readouterr().out == ids.text + "\n"
    assert main(["generate", str(checkpoint), "--max-tokens", "3"]) == 2
    assert "nothing to generate" in capsys.readouterr().err
    assert main(["generate", str(checkpoint), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_chat_command_streams_a_conversation(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n/think on\nand again\n/reset\n/exit\nnever read\n"))
    assert main(["chat", str(checkpoint), "--max-tokens", "5", "--temperature", "0", "--ignore-eos"]) == 0
    llm = LLM(checkpoint)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    turn1 = [{"role": "user", "content": "hello there"}]
    reply1 = llm.generate(llm.tokenizer.encode_chat(turn1), params)[0].text
    turn2 = turn1 + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "and again"}]
    reply2 = llm.generate(llm.tokenizer.encode_chat(turn2, thinking=True), params)[0].text
    expected = io.StringIO()
    for reply, thinking in ((reply1, False), (reply2, True)):
        r = ThinkRenderer(expected, color=False, opened=thinking)
        r.feed(reply)
        r.close()
    assert capsys.readouterr().out == expected.getvalue()


def test_chat_command_renders_the_checkpoint_template_and_its_opened_think(checkpoint, tmp_path, capsys, monkeypatch):
    """A checkpoint trained on R1-Zero's template carries it: `seekforge chat` poses the question in it (as
    transformers renders it), and the answer, which starts inside the <think> the template opened, is shown
    with its reasoning apart; the next turn's history holds the answer as written, "<think>" included."""
    from seekforge.tasks.templates import R1_ZERO_CHAT_TEMPLATE

    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.from_pretrained(checkpoint)
    tok.chat_template = R1_ZERO_CHAT_TEMPLATE
    tok.save_pretrained(tmp_path)
    reply = " 2 + 2 = 4\n</think>\n<answer>4</answer>"
    prompts = []

    class Scripted:  # the engine's streaming interface, answering every prompt with `reply` in two pieces
        tokenizer = Tokenizer.from_pretrained(tmp_path)

        def stream(self, batch, params):
            prompts.append(batch[0])
            for piece in (reply[:9], reply[9:]):
                yield type("Out", (), {"outputs": [type("C", (), {"delta_text": piece})]})

    monkeypatch.setattr("seekforge.commands.generate.engine_from_args", lambda args: Scripted())
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 2?\nand 3 + 3?\n"))
    assert main(["chat", str(tmp_path)]) == 0
    assert capsys.readouterr().out == (" 2 + 2 = 4\n" + "\n\n" + "<answer>4</answer>\n") * 2
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    turn1 = [{"role": "user", "content": "What is 2 + 2?"}]
    turn2 = turn1 + [{"role": "assistant", "content": "<think>" + reply}, {"role": "user", "content": "and 3 + 3?"}]
    assert prompts == [hf.apply_chat_template(t, add_generation_prompt=True, return_dict=False) for t in (turn1, turn2)]


def test_think_renderer_dims_reasoning_and_hides_tags_split_across_deltas():
    buf = io.StringIO()
    r = ThinkRenderer(buf, color=True)
    for delta in ["<th", "ink>let me ", "see</thi", "nk>\n\nThe answer", " is 4.<"]:
        r.feed(delta)
    r.close()
    assert buf.getvalue() == f"{DIM}let me see{RESET}\n\nThe answer is 4.<\n"
    plain = io.StringIO()
    r = ThinkRenderer(plain, color=False, opened=True)  # the prompt already opened <think>
    r.feed("hmm</think>yes")
    r.close()
    assert plain.getvalue() == "hmm\n\nyes\n"
    mid = io.StringIO()  # as the server splits: reasoning only where the reply opens with <think>
    r = ThinkRenderer(mid, color=True)
    r.feed("an answer that mentions <think> tags</think>")
    r.close()
    assert mid.getvalue() == "an answer that mentions <think> tags</think>\n"
