"""The built-in pretraining corpus: procedurally generated, verifiable math in the R1-Zero format.

Every document is a task question framed by the R1-Zero template, its worked solution inside
<think>...</think> and the gold answer inside <answer>...</answer>, so a model pretrained on it already
writes the format the RL stage rewards. (A probe task such as passkey retrieval, named in `tasks`, writes its
documents in its own plain form, `Task.corpus_text`, which may be Prompted: trained on its answer only.)
Documents come from the tasks' train split only; their val and test splits stay unseen for evaluation.
Nothing is downloaded.

`slip_rate` makes a share of the documents careless, as in web text: one slip in the worked steps,
carried on to a wrong answer (`Task.careless`). A model pretrained on them samples such slips at about
that rate while its most likely answer stays right: RL with a verifiable reward is what removes them.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seekforge.configio import atomic_write_text
from seekforge.documents import Document, document_json, text_of
from seekforge.errors import ConfigError
from seekforge.tasks import BUILTIN_TASKS, Row, get_task, r1_zero_prompt
from seekforge.tasks.templates import R1_ZERO_CHAT_TEMPLATE


def render_example(row: Row) -> str:
    """One task row as a document: the R1-Zero prompt (which ends by opening <think>) continued by
    the worked solution and the answer, exactly as a rewarded completion would continue it."""
    return f"{r1_zero_prompt(row.prompt)}\n{row.solution}\n</think>\n<answer>{row.answer}</answer>"


def generate_documents(n_docs: int, seed: int = 0,
                       tasks: Sequence[str] | Mapping[str, dict] = tuple(BUILTIN_TASKS),
                       slip_rate: float = 0.0) -> list[Document]:
    """n_docs documents shared evenly among `tasks` (train split) and shuffled together. `tasks` names
    tasks (default difficulty) or maps names to difficulty knobs, e.g. {"chain_sum": {"max_value": 9}}.
    A `slip_rate` share of the documents of tasks that have a careless variant make one slip."""
    if n_docs < 1 or not tasks:
        raise ConfigError(f"need n_docs >= 1 (got {n_docs}) and at least one task")
    if not 0.0 <= slip_rate < 1.0:
        raise ConfigError(f"slip_rate must be in [0, 1), got {slip_rate}")
    knobs = dict(tasks) if isinstance(tasks, Mapping) else {name: {} for name in tasks}
    docs = []
    rng = random.Random(f"seekforge|slips|{seed}")
    for i, (name, task_knobs) in enumerate(knobs.items()):
        n = n_docs // len(knobs) + (i < n_docs % len(knobs))
        task = get_task(name, **(task_knobs or {}))
        for row in task.rows("train", n, seed):
            if slip_rate and rng.random() < slip_rate:
                row = task.careless(row, rng) or row
            docs.append(task.corpus_text(row) or render_example(row))
    order = np.random.default_rng(seed).permutation(len(docs))
    return [docs[i] for i in order]


def write_corpus(path: Path, docs: list[Document]) -> None:
    """docs as .jsonl, the form `seekforge data prepare` reads (atomically)."""
    atomic_write_text(path, "".join(json.dumps(document_json(d), ensure_ascii=False) + "\n" for d in docs))


@dataclass(frozen=True)
class BuiltinDataset:
    data_dir: Path       # prepared shards (seekforge.data.loader reads it)
    tokenizer_dir: Path  # the tokenizer the shards were made with
    corpus: Path         # the documents as .jsonl, for inspection or re-preparing
    meta: dict


def build_builtin_dataset(out_dir: str | os.PathLike, n_docs: int = 20_000, seed: int = 0, vocab_size: int = 1024,
                          tokenizer=None, val_fraction: float = 0.01,
                          tasks: Sequence[str] | Mapping[str, dict] = tuple(BUILTIN_TASKS),
                          slip_rate: float = 0.0, progress: bool = False) -> BuiltinDataset:
    """Generate the corpus into out_dir/corpus.jsonl, train a tokenizer on it unless one is given,
    and prepare train/val shards in out_dir. The tokenizer (trained or given) gets R1-Zero's chat template,
    the corpus's format, so that models pretrained on it are chatted with and served in it."""
    from seekforge.data.prepare import prepare
    from seekforge.tokenizer import Tokenizer

    out_dir = Path(out_dir)
    docs = generate_documents(n_docs, seed, tasks, slip_rate)
    corpus = out_dir / "corpus.jsonl"
    write_corpus(corpus, docs)
    if tokenizer is None:
        tokenizer = Tokenizer.train([text_of(d) for d in docs], vocab_size)
    tokenizer.chat_template = R1_ZERO_CHAT_TEMPLATE
    meta = prepare([corpus], tokenizer, out_dir, val_fraction=val_fraction, seed=seed, progress=progress)
    return BuiltinDataset(out_dir, out_dir / meta["tokenizer_dir"], corpus, meta)
