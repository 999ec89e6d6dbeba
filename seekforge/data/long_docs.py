"""Long documents for context extension: related documents joined into ones of a target length, with passkey
retrieval documents of every length up to it mixed in.

A model learns to use a long context only from text whose later part depends on its earlier part. Packed
windows of unrelated short documents do not have that; so documents are joined, in their order, with the
documents after them that are related: from the same input file (a book's chapters, a repository's files),
or of the same built-in task. Passkey documents (seekforge.tasks.passkey) add a dependency across the whole
length: the key at a random depth, asked for at the end.

The result is a prepared data directory (seekforge.data.prepare) tokenized with the model's own tokenizer.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from seekforge.documents import text_of
from seekforge.errors import ConfigError

SEPARATOR = "\n\n"


def join_related(docs: Iterable[tuple[str, str]], min_chars: int) -> list[str]:
    """(key, text) documents joined in order with the next ones of the same key until each holds at least
    `min_chars` characters; what is left of a key at the end is a shorter last document."""
    pending: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    out = []
    for key, text in docs:
        pending.setdefault(key, []).append(text)
        sizes[key] = sizes.get(key, 0) + len(text) + len(SEPARATOR)
        if sizes[key] >= min_chars:
            out.append(SEPARATOR.join(pending.pop(key)))
            sizes[key] = 0
    out.extend(SEPARATOR.join(texts) for texts in pending.values())
    return out


def passkey_filler(tokenizer, length: int, digits: int = 5) -> int:
    """Filler sentences that make a passkey document (prompt and key) about `length` tokens long."""
    from seekforge.tasks.passkey import FILLER, PasskeyTask, probe_prefix

    bare = PasskeyTask(min_filler=0, max_filler=0, digits=digits).rows("test", 1, 0)[0]
    overhead = len(tokenizer.encode_prompt(probe_prefix(bare))) + digits + 1
    per_sentence = sum(len(tokenizer.encode(" " + s)) for s in FILLER) / len(FILLER)
    return max(0, round((length - overhead) / per_sentence))


def _chars_per_token(tokenizer, texts: Sequence[str]) -> float:
    sample = list(texts[:200])
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(sample))
    return sum(map(len, sample)) / max(tokens, 1)


def _sources(inputs: Sequence[str], tokenizer, tasks: dict, n_docs: int, seed: int) -> list[tuple[str, str]]:
    """(relatedness key, text) of the short documents: the input files' (key: the file), else the built-in
    tasks' (key: the task), n_docs of them."""
    if inputs:
        from seekforge.documents import iter_documents

        def chat(messages):
            return tokenizer.apply_chat_template(messages, add_generation_prompt=False)

        return [(str(p), text_of(doc)) for p in inputs for doc in iter_documents(Path(p), chat)]
    from seekforge.data.corpus import generate_documents

    per_task = max(1, n_docs // max(len(tasks), 1))
    return [(name, text_of(doc)) for name, knobs in tasks.items()
            for doc in generate_documents(per_task, seed, {name: knobs})]


def build_long_dataset(out_dir: str | os.PathLike, tokenizer, seq_len: int, n_tokens: int,
                       inputs: Sequence[str] = (), tasks: dict | None = None, passkey_share: float = 0.3,
                       passkey: dict | None = None, seed: int = 0, val_fraction: float = 0.05,
                       progress: bool = False) -> dict:
    """Prepare out_dir with documents of about `seq_len` tokens: related documents of `inputs` (text files
    as `seekforge data prepare` reads them; joined, so every token of them is a target) or, without inputs, of
    the built-in `tasks` (name -> knobs) making about n_tokens tokens, and a `passkey_share` of passkey
    documents of 0 to seq_len tokens (`passkey`: the task's knobs over those, e.g. {"loss": "answer"}).
    Returns meta."""
    from seekforge.data.corpus import write_corpus
    from seekforge.data.prepare import prepare
    from seekforge.tasks.passkey import PasskeyTask

    if seq_len < 1 or n_tokens < 1 or not 0.0 <= passkey_share < 1.0:
        raise ConfigError(f"long documents: need seq_len and n_tokens >= 1 and passkey_share in [0, 1), got "
                          f"{seq_len}, {n_tokens}, {passkey_share}")
    tasks = tasks or {"chain_sum": {}}
    probe = _sources((), tokenizer, tasks, 50, seed) if not inputs else None
    chars = _chars_per_token(tokenizer, [t for _, t in probe]) if probe else None
    n_short = round(n_tokens * (1 - passkey_share) * chars / (sum(len(t) for _, t in probe) / len(probe))) \
        if probe else 0
    sources = _sources(inputs, tokenizer, tasks, n_short, seed)
    chars = chars or _chars_per_token(tokenizer, [t for _, t in sources])
    long_docs = join_related(sources, round(seq_len * chars))
    n_passkey = round(len(long_docs) * passkey_share / (1 - passkey_share))
    # up to a whole window, so that key and question often share one
    task = PasskeyTask(**{"min_filler": 0, "max_filler": passkey_filler(tokenizer, seq_len), **(passkey or {})})
    passkeys = [task.corpus_text(row) for row in task.rows("train", n_passkey, seed)]
    docs = [doc for pair in itertools.zip_longest(long_docs, passkeys) for doc in pair if doc is not None]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.jsonl"
    write_corpus(corpus, docs)
    return prepare([corpus], tokenizer, out_dir, val_fraction=val_fraction, seed=seed, progress=progress)
