"""`seekforge eval CKPT --text FILE` / `--data DIR`: perplexity, bits per token and bits per byte, checked
against transformers reading the same checkpoint over windows cut here by hand, and byte counts by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from seekforge.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "Alice has 12 apples and buys 30 more: 12 + 30 = 42. Café au lait, naïve résumé.\n" * 3


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    """(checkpoint directory, transformers' model and tokenizer loaded from it)."""
    transformers = pytest.importorskip("transformers")
    path = tiny_checkpoint()
    return (path, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            transformers.AutoTokenizer.from_pretrained(path))


@torch.no_grad()
def reference_nll(model, ids: list[int], length: int) -> tuple[float, int]:
    """Summed next-token NLL of `ids` in windows reading ids[i : i + length], each predicting its next tokens."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, length):
        window = torch.tensor([ids[start:start + length + 1]])
        logp = model(window[:, :-1]).logits.float().log_softmax(-1)
        total -= logp[0].gather(-1, window[0, 1:, None]).sum().item()
        count += window.shape[1] - 1
    return total, count


def run_eval(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


def test_text_perplexity_equals_transformers_over_the_same_windows(hf, tmp_path, capsys):
    path, model, tok = hf
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    ids = tok(TEXT).input_ids  # BOS, then the text's tokens: every text token is scored
    assert ids[0] == tok.bos_token_id and len(ids) > 40
    out = run_eval(capsys, path, "--text", tmp_path / "t.txt", "--seq-len", 16, "--batch-size", 3,
                   "--json", tmp_path / "out.json")
    nll, count = reference_nll(model, ids, 16)
    assert count == len(ids) - 1 and out["tokens"] == count
    assert out["windows"] == math.ceil(count / 16) and out["seq_len"] == 16
    n_bytes = 3 * (len("Alice has 12 apples and buys 30 more: 12 + 30 = 42. Café au lait, naïve résumé.\n") + 4)
    assert out["bytes"] == n_bytes  # é, ï: two UTF-8 bytes each, four of them a line
    assert out["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert out["bits_per_token"] == pytest.approx(nll / count / math.log(2), rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert json.loads((tmp_path / "out.json").read_text()) == out

    # the default window is the model's context (512 here): one window holds the whole text
    whole = run_eval(capsys, path, "--text", tmp_path / "t.txt")
    assert whole["seq_len"] == 512 and whole["windows"] == 1
    assert whole["nll"] == pytest.approx(reference_nll(model, ids, 512)[0] / count, rel=1e-5)

    # --max-tokens scores the first N tokens; bytes are those of the text they decode to
    cut = run_eval(capsys, path, "--text", tmp_path / "t.txt", "--seq-len", 8, "--max-tokens", 20)
    assert cut["tokens"] == 20 and cut["bytes"] == len(tok.decode(ids[1:21]).encode("utf-8"))
    assert cut["nll"] == pytest.approx(reference_nll(model, ids[:21], 8)[0] / 20, rel=1e-5)


def test_bits_per_byte_of_a_tiny_text_by_hand(hf, tmp_path, capsys):
    path, model, tok = hf
    (tmp_path / "t.txt").write_text("é", encoding="utf-8")  # one character, two UTF-8 bytes
    out = run_eval(capsys, path, "--text", tmp_path / "t.txt")
    ids = tok("é").input_ids
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
    nll = -sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    assert out["bytes"] == 2 and out["tokens"] == len(ids) - 1
    assert out["bits_per_byte"] == pytest.approx(nll / math.log(2) / 2, rel=1e-5)


def test_prepared_data_perplexity(hf, task_tokenizer, tmp_path, capsys):
    from seekforge.data.prepare import prepare

    path, model, _ = hf
    docs = ["First document: 3 + 4 = 7.", "Second one, with ü and more words after it.", "A third: 10 - 2 = 8."]
    (tmp_path / "docs.txt").write_text("\n<|doc|>\n".join(docs), encoding="utf-8")
    prepare([tmp_path / "docs.txt"], task_tokenizer, tmp_path / "data", val_fraction=0.0, progress=False)
    stream = np.fromfile(tmp_path / "data" / "train.bin", dtype=np.uint16).tolist()
    out = run_eval(capsys, path, "--data", tmp_path / "data", "--data-split", "train", "--seq-len", 8)
    nll, count = reference_nll(model, [task_tokenizer.bos_id] + stream, 8)
    assert out["tokens"] == count == len(stream) and out["split"] == "train"
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert out["bytes"] == meta["splits"]["train"]["bytes"]  # the documents' own bytes: the EOS between them has none
    assert out["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(nll / math.log(2) / out["bytes"], rel=1e-5)


def test_bad_inputs_are_named(hf, tmp_path, capsys):
    path = hf[0]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "t.txt").write_text(TEXT)
    (tmp_path / "data").mkdir()
    for args, needle in (
            (["--text", tmp_path / "missing.txt"], "no such file"),
            (["--text", tmp_path / "empty.txt"], "holds no text"),
            (["--text", tmp_path / "t.txt", "--seq-len", 513], "outside the model's context of 1 to 512"),
            (["--text", tmp_path / "t.txt", "--max-tokens", 0], "--max-tokens must be >= 1"),
            (["--data", tmp_path / "data"], "not a complete prepared data directory")):
        capsys.readouterr()
        assert main(["eval", str(path), *map(str, args)]) == 2
        assert needle in capsys.readouterr().err
    with pytest.raises(SystemExit):  # exactly one of --task, --text, --data, --lm-eval
        main(["eval", str(path), "--text", str(tmp_path / "t.txt"), "--task", "chain_sum"])
