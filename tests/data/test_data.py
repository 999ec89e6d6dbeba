"""Data: files to shards (documents, boundaries, splits, byte counts, clear errors, atomicity), the packed
loader (windows, shifts, determinism, exact resume, sharding), eval batches and the built-in corpus."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from seekforge.cli import main
from seekforge.data.loader import (IGNORE, DocumentLoader, PackedLoader, bits_per_byte, eval_batches, eval_documents,
                                   load_meta, open_tokens)
from seekforge.data.prepare import prepare, token_dtype
from seekforge.documents import Prompted, iter_documents
from seekforge.errors import ConfigError, DataError
from seekforge.tokenizer import EOS, Tokenizer


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnop"), size=rng.integers(2, 7))) for _ in range(200)]
    return Tokenizer.train([" ".join(rng.choice(words, 20)) + " 123 ünï 🙂" for _ in range(200)], vocab_size=300)


def _docs(meta_dir, split):
    tokens = np.asarray(open_tokens(meta_dir, split))
    offsets = np.load(meta_dir / f"{split}.docs.npy")
    return [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def test_prepare_txt_and_jsonl_documents(tok, tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n<|doc|>\nsecond 你好\n  <|doc|>  \n\n<|doc|>\nthird",
                                    encoding="utf-8")
    (tmp_path / "b.txt").write_text("whole file is one document\n", encoding="utf-8")
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n4"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "json doc 🙂"}) + "\n\n"
                                      + json.dumps({"messages": chat, "id": 7}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    meta = prepare([tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.jsonl"], tok, out,
                   val_fraction=0, progress=False)
    expected = ["first doc\nline two\n", "second 你好\n", "third", "whole file is one document\n",
                "json doc 🙂", tok.apply_chat_template(chat, add_generation_prompt=False)]
    docs = _docs(out, "train")
    assert len(docs) == len(expected) and meta["splits"]["val"]["docs"] == 0
    for ids, text in zip(docs, expected):
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]  # exactly one EOS, at the boundary
        assert tok.decode(ids) == (text if text.endswith(EOS) else text + EOS)
    assert meta["splits"]["train"]["bytes"] == sum(len(t.encode("utf-8")) for t in expected)
    assert meta["splits"]["train"]["tokens"] == sum(map(len, docs))
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size
    assert meta["tokenizer_fingerprint"] == tok.fingerprint == Tokenizer.from_pretrained(out / "tokenizer").fingerprint
    assert load_meta(out) == meta and not list(out.glob(".*tmp"))


def test_split_is_seeded_and_val_never_left_empty(tok, tmp_path):
    src = tmp_path / "d.jsonl"
    texts = [f"document number {i} ünï" for i in range(300)]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    a = prepare([src], tok, tmp_path / "a", val_fraction=0.1, seed=3, progress=False)
    b = prepare([src], tok, tmp_path / "b", val_fraction=0.1, seed=3, progress=False)
    prepare([src], tok, tmp_path / "c", val_fraction=0.1, seed=4, progress=False)
    assert a["splits"] == b["splits"]
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "b" / "val.bin").read_bytes()
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()
    assert 10 <= a["splits"]["val"]["docs"] <= 50 and a["splits"]["train"]["docs"] + a["splits"]["val"]["docs"] == 300
    decoded = sorted(tok.decode(d[:-1]) for split in ("train", "val") for d in _docs(tmp_path / "a", split))
    assert decoded == sorted(texts)  # every document exactly once, in one split
    for split in ("train", "val"):
        texts_in = [tok.decode(d[:-1]) for d in _docs(tmp_path / "a", split)]
        assert a["splits"][split]["bytes"] == sum(len(t.encode("utf-8")) for t in texts_in)
    # Five documents at 1%: the draw almost surely picks none, and the last train document moves to val.
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:5]), encoding="utf-8")
    s = prepare([small], tok, tmp_path / "s", val_fraction=0.01, progress=False)
    assert (s["splits"]["train"]["docs"], s["splits"]["val"]["docs"]) == (4, 1)
    assert [tok.decode(d[:-1]) for d in _docs(tmp_path / "s", "val")] == [texts[4]]
    assert s["splits"]["val"]["bytes"] == len(texts[4].encode("utf-8"))
    assert [tok.decode(d[:-1]) for d in _docs(tmp_path / "s", "train")] == texts[:4]


def test_token_dtype():
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32 and token_dtype(129280) == np.uint32


def test_parquet(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet one", None, "parquet two"], "id": [1, 2, 3]}), tmp_path / "p.parquet")
    meta = prepare([tmp_path / "p.parquet"], tok, tmp_path / "out", val_fraction=0, progress=False)
    assert [tok.decode(d[:-1]) for d in _docs(tmp_path / "out", "train")] == ["parquet one", "parquet two"]
    assert meta["splits"]["train"]["docs"] == 2
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "q.parquet")
    with pytest.raises(DataError, match=r'q.parquet has no "text" column \(columns: body\)'):
        list(iter_documents(tmp_path / "q.parquet", str))
    (tmp_path / "r.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="r.parquet is not a readable parquet file"):
        list(iter_documents(tmp_path / "r.parquet", str))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow.parquet` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pip install pyarrow"):
        list(iter_documents(tmp_path / "p.parquet", str))


BAD_FILES = [
    ("empty.txt", b"", r"empty.txt is empty"),
    ("blank.jsonl", b"\n  \n", r"blank.jsonl holds no non-empty document"),
    ("latin.txt", "ok line\ncaf\xe9\n".encode("latin-1"),
     r"latin.txt is not UTF-8: byte 0xe9 at byte offset 11 \(line 2\)"),
    ("latin.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"latin.jsonl is not UTF-8: byte 0xe9 at byte offset 27"),
    ("table.csv", b"text\nhello\n", r"table.csv has unsupported extension '.csv'"),
    ("rows.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r'rows.jsonl line 2 has no "text" field \(keys: body\)'),
    ("broken.jsonl", b'{"text": "a"}\n{"text": \n', r"broken.jsonl line 2 is not valid JSON"),
    ("list.jsonl", b'["text"]\n', r"list.jsonl line 1 is a JSON list, not an object"),
    ("num.jsonl", b'{"text": 5}\n', r'num.jsonl line 1: "text" is a int, not a string'),
    ("chat.jsonl", b'{"messages": [{"role": "robot", "content": "x"}]}\n', r"chat.jsonl line 1: cannot render"),
    ("pair.jsonl", b'{"prompt": 3, "completion": "b"}\n', r'pair.jsonl line 1: "prompt" and "completion" must be'),
]


@pytest.mark.parametrize("name,content,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_raise_clear_errors(tok, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare([tmp_path / name], tok, tmp_path / "out", progress=False)


def test_missing_input_directory_and_bad_fraction(tok, tmp_path):
    with pytest.raises(DataError, match="nope.txt not found"):
        prepare([tmp_path / "nope.txt"], tok, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="is a directory"):
        prepare([tmp_path], tok, tmp_path / "out", progress=False)
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match="val_fraction 1.0 is outside"):
        prepare([tmp_path / "a.txt"], tok, tmp_path / "out", val_fraction=1.0, progress=False)


def test_failed_prepare_leaves_the_old_directory_intact(tok, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("a good document", encoding="utf-8")
    out = tmp_path / "out"
    meta = prepare([good], tok, out, val_fraction=0, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"oops": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        prepare([good, tmp_path / "bad.jsonl"], tok, out, val_fraction=0, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # no temp files either
    assert load_meta(out) == meta


# ---- loader ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    texts = [" ".join(str(x) for x in rng.integers(0, 1000, size=rng.integers(5, 40))) for _ in range(400)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    prepare([root / "docs.jsonl"], tok, root / "prepared", val_fraction=0.1, seed=0, progress=False)
    return root / "prepared"


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))


def test_batches_are_stream_windows_shifted_by_one(data_dir):
    tokens = np.asarray(open_tokens(data_dir, "train")).astype(np.int64)
    for extra in (0, 2):
        loader = PackedLoader(data_dir, "train", seq_len=16, batch_size=4, seed=0, extra_tokens=extra)
        window = 16 + 1 + extra
        n = len(tokens) // window
        assert loader.windows_per_epoch == n
        # The stream cut at multiples of the window length: every row must be one of these.
        windows = {tuple(w): i for i, w in enumerate(tokens[:n * window].reshape(n, window).tolist())}
        seen = []
        for batch in _take(loader, n // 4):
            x, y = batch["input_ids"], batch["labels"]
            assert x.shape == y.shape == (4, 16 + extra) and x.dtype == y.dtype == torch.long
            assert torch.equal(x[:, 1:], y[:, :-1])
            for row_x, row_y in zip(x.tolist(), y.tolist()):
                seen.append(windows[(*row_x, row_y[-1])])
        assert len(set(seen)) == len(seen) == n // 4 * 4  # no window twice within an epoch


def test_every_window_once_per_epoch_and_order_changes(data_dir):
    loader = PackedLoader(data_dir, "train", seq_len=32, batch_size=1, seed=5)
    n = loader.windows_per_epoch
    epoch0 = [tuple(b["input_ids"][0].tolist()) for b in _take(loader, n)]
    epoch1 = [tuple(b["input_ids"][0].tolist()) for b in _take(loader, n)]
    assert len(set(epoch0)) == n and set(epoch0) == set(epoch1) and epoch0 != epoch1
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["index"] == 0


def test_loader_is_deterministic_in_its_seed(data_dir):
    def first(seed):
        return _take(PackedLoader(data_dir, "train", seq_len=16, batch_size=3, seed=seed), 5)

    assert _same(first(7), first(7)) and not _same(first(7), first(8))


def test_resume_gives_identical_batches_across_epochs(data_dir):
    a = PackedLoader(data_dir, "train", seq_len=16, batch_size=7, seed=1)  # 7 does not divide the window count
    assert a.windows_per_epoch % 7
    _take(a, a.windows_per_epoch // 7)  # stop just before a batch that straddles the epoch boundary
    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint's JSON
    expected = _take(a, 10)
    b = PackedLoader(data_dir, "train", seq_len=16, batch_size=7, seed=1)
    b.load_state_dict(state)
    assert _same(_take(b, 10), expected) and b.state_dict() == a.state_dict()
    with pytest.raises(ConfigError, match="window was 17, now 33"):
        PackedLoader(data_dir, "train", seq_len=32, batch_size=7, seed=1).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed was 1, now 2"):
        PackedLoader(data_dir, "train", seq_len=16, batch_size=7, seed=2).load_state_dict(state)


def test_data_parallel_ranks_split_the_global_batch(data_dir):
    whole = _take(PackedLoader(data_dir, "train", seq_len=16, batch_size=6, seed=3), 4)
    parts = [_take(PackedLoader(data_dir, "train", seq_len=16, batch_size=3, seed=3, rank=r, world_size=2), 4)
             for r in range(2)]
    for i, batch in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][i]["input_ids"], parts[1][i]["input_ids"]]), batch["input_ids"])
    with pytest.raises(ConfigError, match="rank 2 is outside"):
        PackedLoader(data_dir, "train", seq_len=16, batch_size=3, rank=2, world_size=2)


def test_too_short_corpus_says_how_many_tokens(data_dir):
    n = load_meta(data_dir)["splits"]["val"]["tokens"]
    with pytest.raises(DataError, match=f"the val split holds {n} tokens, fewer than one window of {n + 1}"):
        PackedLoader(data_dir, "val", seq_len=n - 2, batch_size=1, extra_tokens=2)
    with pytest.raises(DataError, match=f"holds {n} tokens"):
        eval_batches(data_dir, seq_len=n, batch_size=1)
    with pytest.raises(DataError, match="meta.json not found"):
        PackedLoader(data_dir.parent, "train", seq_len=4, batch_size=1)


def test_eval_batches_are_in_order_bounded_and_repeatable(data_dir):
    tokens = torch.from_numpy(np.asarray(open_tokens(data_dir, "val")).astype(np.int64))
    n_windows = len(tokens) // 17
    batches = list(eval_batches(data_dir, seq_len=16, batch_size=4))
    assert sum(len(b["input_ids"]) for b in batches) == n_windows and len(batches) == -(-n_windows // 4)
    flat = torch.cat([torch.cat([b["input_ids"], b["labels"][:, -1:]], dim=1) for b in batches]).flatten()
    assert torch.equal(flat, tokens[:n_windows * 17])  # the windows, in stream order
    bounded = list(eval_batches(data_dir, seq_len=16, batch_size=4, max_batches=2))
    assert len(bounded) == 2 and _same(bounded, batches[:2])


def _documents(tok, data_dir, split):
    """The split's documents as the tokenizer encodes the input texts (BOS, text, EOS), independent of offsets."""
    texts = [json.loads(line)["text"] for line in (data_dir.parent / "docs.jsonl").read_text().splitlines()]
    encoded = [[tok.bos_id, *tok.encode(t), tok.eos_id] for t in texts]
    stream = np.asarray(open_tokens(data_dir, split)).tolist()
    mine, at = [], 0
    for ids in encoded:  # the split's documents, in order, are a subsequence of the input's
        if stream[at:at + len(ids) - 1] == ids[1:]:
            mine.append(ids)
            at += len(ids) - 1
    assert at == len(stream)
    return mine


def test_document_rows_start_at_a_document_and_pad_untrained(tok, data_dir):
    assert tok.add_bos_token
    docs = {tuple(d) for d in _documents(tok, data_dir, "train")}
    loader = DocumentLoader(data_dir, "train", seq_len=24, batch_size=8, pad_id=tok.eos_id, bos_id=tok.bos_id)
    cut = 0
    for batch in _take(loader, 20):
        x, y = batch["input_ids"], batch["labels"]
        assert x.shape == y.shape and x.shape[1] <= 24
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            n = next((i for i, label in enumerate(row_y) if label == IGNORE), len(row_y))  # trained labels
            assert all(label == IGNORE for label in row_y[n:])
            row = [*row_x[:n], row_y[n - 1]] if n else row_x[:1]
            assert row_x[1:n] == row_y[:n - 1] and row[0] == tok.bos_id
            whole = [d for d in docs if list(d[:len(row)]) == row]
            assert whole and (len(row) == len(whole[0]) or len(row) == 25)  # a whole document, or cut at a row
            cut += len(row) == 25
    assert cut  # some documents are longer than a row


def test_document_curriculum_grows_the_longest_document_and_resumes(tok, data_dir):
    lengths = sorted(len(d) for d in _documents(tok, data_dir, "train"))
    loader = DocumentLoader(data_dir, "train", seq_len=40, batch_size=16, pad_id=tok.eos_id, bos_id=tok.bos_id,
                            seed=3, curriculum_steps=10, curriculum_min=lengths[0] + 2)

    def longest(batch):  # tokens of the row's document (BOS included), from its trained labels
        return int((batch["labels"] != IGNORE).sum(1).max()) + 1

    early = [longest(b) for b in _take(loader, 3)]
    assert max(early) <= lengths[0] + 2 + 41 * 2 // 10  # step 2's limit at most
    state = json.loads(json.dumps(loader.state_dict()))
    expected = _take(loader, 12)
    assert longest(expected[-1]) > max(early) and max(longest(b) for b in expected) == 41  # whole rows by now
    again = DocumentLoader(data_dir, "train", seq_len=40, batch_size=16, pad_id=tok.eos_id, bos_id=tok.bos_id,
                           seed=3, curriculum_steps=10, curriculum_min=lengths[0] + 2)
    again.load_state_dict(state)
    assert _same(_take(again, 12), expected)
    with pytest.raises(ConfigError, match="window was 41, now 17"):
        DocumentLoader(data_dir, "train", seq_len=16, batch_size=16, pad_id=0, seed=3).load_state_dict(state)
    evaluated = list(eval_documents(data_dir, 40, 4, tok.eos_id, tok.bos_id))
    val = _documents(tok, data_dir, "val")
    assert sum(len(b["input_ids"]) for b in evaluated) == len(val)
    assert [row[:n] for b in evaluated for row, n in zip(b["input_ids"].tolist(),
                                                            (b["labels"] != IGNORE).sum(1).tolist())] == \
        [d[:41][:-1] for d in val]


def test_bits_per_byte(data_dir):
    info = load_meta(data_dir)["splits"]["val"]
    assert bits_per_byte(np.log(2), data_dir) == pytest.approx(info["tokens"] / info["bytes"])


def test_cli_prepare(tok, tmp_path, capsys):
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("one\n<|doc|>\ntwo\n<|doc|>\nthree", encoding="utf-8")
    argv = ["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--input", str(tmp_path / "a.txt"),
            "--out", str(tmp_path / "out"), "--val-fraction", "0.3"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train_docs"] + printed["val_docs"] == 3 and load_meta(tmp_path / "out")["val_fraction"] == 0.3
    (tmp_path / "bad.csv").write_text("x", encoding="utf-8")
    assert main([*argv[:5], str(tmp_path / "bad.csv"), *argv[6:]]) == 2
    assert "unsupported extension '.csv'" in capsys.readouterr().err


# ---- built-in corpus -------------------------------------------------------------------------------

def test_render_example_continues_the_r1_zero_prompt():
    from seekforge.data.corpus import render_example
    from seekforge.tasks import get_task, r1_zero_prompt
    from seekforge.tasks.answers import extract_answer

    for name in ("arithmetic", "chain_sum", "countdown", "word_problem"):
        task = get_task(name)
        row = task.rows("train", 1, 0)[0]
        doc = render_example(row)
        prompt = r1_zero_prompt(row.prompt)
        assert doc.startswith(prompt) and prompt.endswith("<think>")
        completion = doc[len(prompt):]
        assert completion == f"\n{row.solution}\n</think>\n<answer>{row.answer}</answer>"
        assert task.score(extract_answer(completion), row.answer, row.meta) == 1.0  # the RL reward's view


def test_careless_documents_come_at_the_slip_rate():
    import re

    from seekforge.data.corpus import generate_documents
    from seekforge.tasks.safe_eval import evaluate

    tasks = {"chain_sum": {"max_value": 9}, "arithmetic": {}}
    assert generate_documents(200, 0, tasks) == generate_documents(200, 0, tasks, slip_rate=0.0)
    docs = generate_documents(2000, 0, tasks, slip_rate=0.4)
    wrong = 0
    for doc in docs:
        if "\n= " in doc:  # a chain sum: is the answer the value of the question?
            question = re.search(r"What is (.*)\?", doc).group(1)
            wrong += evaluate(question) != int(re.findall(r"<answer>(.*?)</answer>", doc)[-1])
    assert 0.35 * 1000 < wrong < 0.45 * 1000  # of the 1000 chain sums; arithmetic has no careless variant
    with pytest.raises(ConfigError, match="slip_rate"):
        generate_documents(10, 0, tasks, slip_rate=1.0)


def test_builtin_dataset(tmp_path):
    from seekforge.data.corpus import build_builtin_dataset

    ds = build_builtin_dataset(tmp_path, n_docs=400, seed=0, vocab_size=400, val_fraction=0.05)
    meta = load_meta(ds.data_dir)
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 400 and meta["splits"]["val"]["docs"] > 0
    tok = Tokenizer.from_pretrained(ds.tokenizer_dir)
    assert tok.vocab_size == 400 and meta["tokenizer_fingerprint"] == tok.fingerprint
    rows = [json.loads(line)["text"] for line in ds.corpus.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 400 and all(r.endswith("</answer>") for r in rows)
    assert {r.split("\nUser: ")[1][:8] for r in rows} > {"What is "}  # several tasks, mixed
    batch = next(PackedLoader(ds.data_dir, "train", seq_len=64, batch_size=2, seed=0))
    assert batch["input_ids"].shape == (2, 64)
    again = build_builtin_dataset(tmp_path / "again", n_docs=400, seed=0, vocab_size=400, val_fraction=0.05)
    assert (again.data_dir / "train.bin").read_bytes() == (ds.data_dir / "train.bin").read_bytes()


def test_prompted_documents_train_their_completion_only_in_every_layout(tok, tmp_path):
    """A {"prompt", "completion"} row is its prompt's tokens then its completion's, and its prompt's targets are
    IGNORE in packed windows, document rows and both eval forms; text documents stay trained throughout."""
    rows = [{"text": "plain words all trained 123"}, {"prompt": "context only here", "completion": " the 123 answer"},
            {"completion": "no prompt at all"}, {"prompt": "another context ünï", "completion": " 🙂 done"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 8), encoding="utf-8")
    assert list(iter_documents(tmp_path / "p.jsonl", str))[1:3] == [Prompted("context only here", " the 123 answer"),
                                                                      Prompted("", "no prompt at all")]
    out = tmp_path / "out"
    meta = prepare([tmp_path / "p.jsonl"], tok, out, val_fraction=0, progress=False)
    docs = _docs(out, "train")
    context = np.load(out / meta["splits"]["train"]["loss_from"]).tolist()
    prompts = [len(tok.encode(r.get("prompt", ""))) if "completion" in r else 0 for r in rows] * 8
    assert context == prompts and prompts[1] > 0
    assert docs[1] == tok.encode("context only here") + tok.encode(" the 123 answer") + [tok.eos_id]
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    untrained = {int(starts[k] + i) for k in range(len(docs)) for i in range(context[k])}  # stream indices

    def check_windows(batch, first):  # first[r]: the stream index of row r's first label
        for r, labels in enumerate(batch["labels"].tolist()):
            for j, label in enumerate(labels):
                stream = first[r] + j
                assert (label == IGNORE) == (stream in untrained), (r, j)
                assert label == IGNORE or label == int(open_tokens(out, "train")[stream])

    window = 17
    loader = PackedLoader(out, "train", seq_len=window - 1, batch_size=4, seed=3)
    order = loader._order_of(0)
    check_windows(next(loader), order[:4] * window + 1)
    check_windows(next(iter(eval_batches(out, window - 1, 4, max_batches=1, split="train"))), np.arange(4) * window + 1)

    for batch in [next(DocumentLoader(out, "train", 40, 8, pad_id=tok.eos_id, bos_id=tok.bos_id)),
                  next(iter(eval_documents(out, 40, 8, pad_id=tok.eos_id, bos_id=tok.bos_id, split="train")))]:
        for x, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            doc = next(k for k in range(4) if x[1:1 + len(docs[k]) - 1] == docs[k][:-1][:len(x) - 1])
            trained = [j for j, label in enumerate(labels) if label != IGNORE]
            assert trained == list(range(context[doc], len(docs[doc])))  # labels[j] is the document's token j

    meta["splits"]["train"].pop("loss_from")  # a directory prepared before loss_from: every target trained
    (out / "meta.json").write_text(json.dumps(meta))
    assert IGNORE not in next(PackedLoader(out, "train", seq_len=window - 1, batch_size=4, seed=3))["labels"]
