"""The tokenizer: round trips, special and reasoning tokens, digit splitting, BOS and chat template parity
with transformers, save/load in the HF layout (DeepSeek's config style included), and the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors

from seekforge.cli import main
from seekforge.errors import ConfigError
from seekforge.tokenizer import ASSISTANT, BOS, EOS, USER, Tokenizer

SYLLABLES = "al be ga de ep ze th la si om an sw er th in ks um to pl us mi no re ko".split()


def _corpus(n=400, seed=0):
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(300)]
    texts = []
    for _ in range(n):
        words_ = rng.choice(words, size=12)
        nums = rng.integers(0, 100_000, size=3)
        sum_ = f"{nums[0]} + {nums[1]} = {nums[0] + nums[1]}"
        texts.append(f"{' '.join(words_)} {sum_}. Ünïcödé 你好 🙂 {nums[2]}\n")
    return texts


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(_corpus(), vocab_size=400)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    return tok.save_pretrained(tmp_path_factory.mktemp("tok"))


ROUND_TRIP = [
    "",
    "plain ascii text",
    "  leading and trailing spaces  \n\n\ttabs\r\n",
    "Ünïcödé ĳ ß 你好，世界 🙂👍🏽 \u200b zero-width",
    "12345 + 67890 = 80235",
    f"{BOS}{USER}hi{ASSISTANT}<think>\nreason\n</think>\n<answer>42</answer>{EOS}",
    "text<think>glued</think>to<answer>tags</answer>",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(text, add_special_tokens=True)  # a text prompt: BOS first, as DeepSeek's tokenizer adds it
    assert ids == [tok.bos_id, *tok.encode(text)] and tok.decode(ids) == BOS + text


def test_special_and_reasoning_tokens_are_single_ids(tok):
    ids = {}
    for t in (BOS, EOS, USER, ASSISTANT, "<think>", "</think>", "<answer>", "</answer>"):
        ids[t] = tok.token_to_id(t)
        assert ids[t] is not None and tok.encode(t) == [ids[t]], t
    assert len(set(ids.values())) == len(ids)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ids[BOS], ids[EOS], ids[EOS])  # no pad token: pad is eos


def test_skip_special_tokens_keeps_reasoning_tags(tok):
    text = f"{USER}q{ASSISTANT}<think>\nr\n</think>\n<answer>7</answer>{EOS}"
    assert tok.decode(tok.encode(text, add_special_tokens=True), skip_special_tokens=True) == \
        "q<think>\nr\n</think>\n<answer>7</answer>"


def test_digits_are_split_individually(tok):
    # The training corpus is full of multi-digit numbers, yet no token may hold two digits.
    assert [tok.decode([i]) for i in tok.encode("9876543210")] == list("9876543210")
    for tid in range(tok.vocab_size):
        assert not re.search(r"\d\d", tok.decode([tid])), tok.id_to_token(tid)
    assert tok.decode(tok.encode("x=12, y=345")) == "x=12, y=345"


def test_vocab_size_is_the_requested_total(tok):
    assert tok.vocab_size == 400


def test_train_rejects_a_vocab_below_the_byte_alphabet():
    with pytest.raises(ConfigError, match="vocab_size 100 is too small"):
        Tokenizer.train(["some text"], vocab_size=100)


def test_train_reads_files_as_documents(tmp_path):
    (tmp_path / "a.txt").write_text("qwvj qwvj\n<|doc|>\nqwvj\n" * 20, encoding="utf-8")
    rows = [{"text": "zyxk zyxk"}, {"messages": [{"role": "user", "content": "zyxk"}]}] * 20
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tok = Tokenizer.train([tmp_path / "a.txt", tmp_path / "b.jsonl"], vocab_size=300)
    vocab = tok.hf.get_vocab()
    assert {"Ġqwvj", "Ġzyxk"} <= set(vocab)
    # Neither the JSON syntax, the separator lines nor the special tokens were training text.
    added = tok.hf.get_added_tokens_decoder()
    merged = [t for t, i in vocab.items() if len(t) > 1 and i not in added]
    assert not any(s in t for t in merged for s in ('{"', "doc|", "Us", "ï½ľ")), merged
    with pytest.raises(ConfigError, match="no text"):
        Tokenizer.train([""], vocab_size=300)


# ---- chat template ---------------------------------------------------------------------------------

CHATS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "u1"},
     {"role": "assistant", "content": "<think>\nsecret steps\n</think>\n\nfive"}, {"role": "user", "content": "u2"}],
    [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "<think>kept</think><answer>5</answer>"}],
    [{"role": "user", "content": "Unicode 你好 🙂"}, {"role": "assistant", "content": "plain"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": "a</think>b</think>c"}],
]


def test_chat_template_by_hand(tok):
    msgs = CHATS[2]
    expected = (BOS + "A\n\nB" + USER + "u1" + ASSISTANT + "\n\nfive" + EOS + USER + "u2" + ASSISTANT)
    assert tok.apply_chat_template(msgs) == expected
    assert tok.apply_chat_template(msgs, thinking=True) == expected + "<think>\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == expected[:-len(ASSISTANT)]
    # After the last user turn the reasoning stays: that is what an SFT document must teach.
    assert tok.apply_chat_template(CHATS[3], add_generation_prompt=False) == \
        BOS + USER + "u1" + ASSISTANT + "<think>kept</think><answer>5</answer>" + EOS


@pytest.mark.parametrize("msgs", CHATS)
@pytest.mark.parametrize("gen,thinking", [(True, False), (True, True), (False, False)])
def test_chat_template_matches_transformers(tok, saved, msgs, gen, thinking):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(saved)
    kwargs = {"thinking": True} if thinking else {}
    theirs = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kwargs)
    assert theirs == tok.apply_chat_template(msgs, add_generation_prompt=gen, thinking=thinking)
    assert hf.encode(theirs, add_special_tokens=False) == tok.encode_chat(msgs, gen, thinking)


def test_builtin_template_renders_tools_as_transformers(tok, saved):
    """Tools, a turn that calls them and their results: transformers renders the saved template alike."""
    transformers = pytest.importorskip("transformers")
    from chat_templates import TOOL_CHAT, TOOLS

    hf = transformers.AutoTokenizer.from_pretrained(saved)
    chat = TOOL_CHAT + [{"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}]
    for msgs in (TOOL_CHAT, chat):
        theirs = hf.apply_chat_template(msgs, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        assert theirs == tok.apply_chat_template(msgs, tools=TOOLS)
    assert "<｜Assistant｜><｜tool▁calls▁begin｜>" in theirs and "<｜tool▁outputs▁end｜>Sunny.<｜end▁of▁sentence｜>" in theirs


def test_encode_chat_starts_with_one_bos(tok):
    ids = tok.encode_chat(CHATS[0])
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id and ids[-1] == tok.token_to_id(ASSISTANT)


def test_chat_rejects_unknown_roles_and_non_string_content(tok):
    with pytest.raises(ConfigError, match="unsupported chat role function"):
        tok.apply_chat_template([{"role": "function", "content": "x"}])
    for content in (None, ["a", "b"], 5):
        with pytest.raises(ConfigError, match="content must be a string"):
            tok.apply_chat_template([{"role": "user", "content": content}])
    with pytest.raises(ConfigError, match="list of messages"):
        tok.apply_chat_template("hello")


# ---- files -----------------------------------------------------------------------------------------

def test_save_and_load_round_trip(tok, saved):
    config = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"] == BOS and config["eos_token"] == EOS and config["pad_token"] == EOS
    assert config["chat_template"] == tok.chat_template and config["model_max_length"] == 4096
    assert not list(saved.glob(".*tmp"))
    loaded = Tokenizer.from_pretrained(saved)
    assert loaded.fingerprint == tok.fingerprint
    text = ROUND_TRIP[5]
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.apply_chat_template(CHATS[2]) == tok.apply_chat_template(CHATS[2])


def test_transformers_encodes_alike(tok, saved):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(saved)
    for text in ROUND_TRIP:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.bos_token_id == tok.bos_id and hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id


def test_deepseek_style_config_with_dict_tokens(tok, tmp_path):
    (tmp_path / "tokenizer.json").write_text(tok.hf.to_str(), encoding="utf-8")
    added = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "tokenizer_class": "LlamaTokenizerFast", "model_max_length": 16384,
        "bos_token": {**added, "content": BOS}, "eos_token": {**added, "content": EOS},
        "pad_token": {**added, "content": "<think>"}, "unk_token": None, "chat_template": "{{ bos_token }}",
    }), encoding="utf-8")
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_id, loaded.eos_id) == (tok.bos_id, tok.eos_id)
    assert loaded.pad_id == tok.token_to_id("<think>") and loaded.model_max_length == 16384
    assert loaded.chat_template == "{{ bos_token }}"


def test_foreign_tokenizer_falls_back_and_follows_its_post_processor(tmp_path):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_pretrained(tmp_path)  # no tokenizer_config.json at all
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 2)
    assert loaded.encode("hello world") == [3, 4]
    assert loaded.encode_prompt("hello world") == [1, 3, 4] and loaded.add_bos_token
    hf.post_processor = None
    hf.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_pretrained(tmp_path).encode_prompt("hello world") == [3, 4]


def test_load_errors_are_clear(tok, tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.json not found"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a valid tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(tok.hf.to_str(), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}), encoding="utf-8")
    with pytest.raises(ConfigError, match="bos_token '<nope>' is not in the tokenizer's vocabulary"):
        Tokenizer.from_pretrained(tmp_path)


def test_cli_train(tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text("\n<|doc|>\n".join(_corpus(100)), encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(src), "--vocab-size", "300", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["vocab_size"] == 300 and Tokenizer.from_pretrained(out).fingerprint == printed["fingerprint"]
    assert main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300",
                 "--out", str(out)]) == 2
    assert "missing.txt not found" in capsys.readouterr().err
