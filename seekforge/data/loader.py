"""Packed batches from a prepared data directory (see seekforge.data.prepare).

The token stream of a split is cut into contiguous, non-overlapping windows of seq_len + 1 + extra_tokens
tokens (the tail that does not fill a window is left out). Inputs are a window without its last token,
labels the window without its first, so labels[t] = input_ids[t + 1]; the extra tokens let multi-token
prediction modules see targets up to extra_tokens further ahead. Windows cross document boundaries (EOS
marks them), as in standard packed pretraining. The targets in a document's context (its first `loss_from`
tokens: a Prompted document's prompt, see seekforge.documents) are untrained (IGNORE), in every layout.

DocumentLoader lays the documents out one to a row instead: each row is one document from its start (BOS
first, as a prompt is fed), cut at seq_len + 1 tokens, padded after it with its labels untrained. A model
learns to look back to a document's start (passkey retrieval) far sooner from such rows than from packed
windows, where a row starts mid-document and holds several. Optionally a length curriculum: the longest
document a batch draws from grows from `curriculum_min` tokens to a whole row over `curriculum_steps` steps.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from seekforge.data.prepare import FORMAT_VERSION
from seekforge.errors import ConfigError, DataError


def load_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} not found: {data_dir} is not a complete prepared data directory; "
                        "run `seekforge data prepare` (or `seekforge data builtin`) to make one")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{path} has format {meta.get('format')}, this seekforge reads {FORMAT_VERSION}: "
                        "prepare the data again")
    return meta


def open_tokens(data_dir: str | os.PathLike, split: str) -> np.ndarray:
    """The split's token ids as a read-only memory map (an empty array for an empty split)."""
    meta = load_meta(data_dir)
    if split not in meta["splits"]:
        raise ConfigError(f"unknown split {split!r}: use one of {', '.join(meta['splits'])}")
    info = meta["splits"][split]
    path = Path(data_dir) / info["file"]
    dtype = np.dtype(meta["dtype"])
    if not path.is_file() or path.stat().st_size != info["tokens"] * dtype.itemsize:
        raise DataError(f"{path} is missing or does not hold the {info['tokens']} tokens meta.json promises: "
                        "prepare the data again")
    if info["tokens"] == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def bits_per_byte(mean_loss_nats: float, data_dir: str | os.PathLike, split: str = "val") -> float:
    """Convert a mean per-token loss on `split` to bits per UTF-8 byte, comparable across tokenizers."""
    info = load_meta(data_dir)["splits"][split]
    return mean_loss_nats / math.log(2) * info["tokens"] / info["bytes"]


IGNORE = -100  # the label of a padding position (seekforge.train.lm's IGNORE)


def _windows(tokens: np.ndarray, window: int, split: str) -> int:
    n = len(tokens) // window
    if n == 0:
        raise DataError(f"the {split} split holds {len(tokens)} tokens, fewer than one window of {window} "
                        f"(seq_len + 1 + extra_tokens): add data or lower seq_len")
    return n


class Context:
    """Where a split's untrained targets are: document k's first loss_from[k] tokens."""

    def __init__(self, offsets: np.ndarray, loss_from: np.ndarray):
        self.offsets, self.loss_from = offsets, loss_from

    @classmethod
    def of(cls, data_dir: str | os.PathLike, split: str) -> Context | None:
        """The split's context, None where no document has any (or the directory predates loss_from)."""
        info = load_meta(data_dir)["splits"][split]
        if "loss_from" not in info:
            return None
        path = Path(data_dir) / info["loss_from"]
        if not path.is_file():
            raise DataError(f"{path} not found: prepare the data again")
        loss_from = np.load(path)
        return cls(open_documents(data_dir, split), loss_from) if loss_from.any() else None

    def untrained(self, at: np.ndarray) -> np.ndarray:
        """Whether each token index of the split's stream lies in its document's context."""
        doc = np.searchsorted(self.offsets, at, side="right") - 1
        return at - self.offsets[doc] < self.loss_from[doc]


def _batch(tokens: np.ndarray, starts: np.ndarray, window: int,
           context: Context | None = None) -> dict[str, torch.Tensor]:
    rows = np.stack([tokens[s:s + window] for s in starts]).astype(np.int64)
    labels = rows[:, 1:].copy()
    if context is not None:
        labels[context.untrained(starts[:, None] + np.arange(1, window))] = IGNORE
    return {"input_ids": torch.from_numpy(rows[:, :-1].copy()), "labels": torch.from_numpy(labels)}


class PackedLoader:
    """An endless iterator of shuffled packed batches with an exactly resumable position.

    The window order is a permutation drawn from (seed, epoch) each epoch; batches take the next
    windows of the concatenated epochs, so every batch is full and may straddle an epoch boundary.
    For data parallelism each step takes batch_size * world_size windows and rank r keeps the r-th slice.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, seed: int = 0,
                 extra_tokens: int = 0, rank: int = 0, world_size: int = 1):
        if seq_len < 1 or batch_size < 1 or extra_tokens < 0:
            raise ConfigError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1 and "
                              f"extra_tokens ({extra_tokens}) >= 0")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside [0, world_size={world_size})")
        self.data_dir, self.split = Path(data_dir), split
        self.seq_len, self.batch_size, self.seed, self.extra_tokens = seq_len, batch_size, seed, extra_tokens
        self.rank, self.world_size = rank, world_size
        self.fingerprint = load_meta(data_dir)["tokenizer_fingerprint"]
        self.tokens, self.context = open_tokens(data_dir, split), Context.of(data_dir, split)
        self.window = seq_len + 1 + extra_tokens
        self.windows_per_epoch = _windows(self.tokens, self.window, split)
        self.epoch, self.index = 0, 0  # the next window is order(epoch)[index]
        self._order_epoch, self._order = -1, None

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.windows_per_epoch)
            self._order_epoch = epoch
        return self._order

    def _take(self, n: int) -> np.ndarray:
        picked = []
        while n:
            order = self._order_of(self.epoch)
            k = min(n, self.windows_per_epoch - self.index)
            picked.append(order[self.index:self.index + k])
            self.index += k
            n -= k
            if self.index == self.windows_per_epoch:
                self.epoch, self.index = self.epoch + 1, 0
        return np.concatenate(picked)

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        ids = self._take(self.batch_size * self.world_size)
        mine = ids[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return _batch(self.tokens, mine * self.window, self.window, self.context)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "window": self.window,
                "windows_per_epoch": self.windows_per_epoch, "split": self.split,
                "tokenizer_fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        _check_resume(state, self.state_dict(), ("seed", "window", "windows_per_epoch", "split",
                                                 "tokenizer_fingerprint"), "seed, seq_len and extra_tokens")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def _check_resume(state: dict, mine: dict, keys: tuple[str, ...], same: str) -> None:
    """A loader's saved position fits this loader only where every key in `keys` agrees; `same` names what the
    user must keep for it to."""
    for key in keys:
        if state.get(key) != mine[key]:
            raise ConfigError(f"cannot resume the data position: {key} was {state.get(key)!r}, now "
                              f"{mine[key]!r}; resume with the same data directory, {same}")


def open_documents(data_dir: str | os.PathLike, split: str) -> np.ndarray:
    """The split's document offsets: document k spans tokens [docs[k], docs[k + 1])."""
    info = load_meta(data_dir)["splits"][split]
    path = Path(data_dir) / info["doc_offsets"]
    if not path.is_file():
        raise DataError(f"{path} not found: prepare the data again")
    return np.load(path)


def _document_rows(tokens: np.ndarray, offsets: np.ndarray, docs: np.ndarray, window: int, pad_id: int,
                   bos_id: int | None, context: Context | None = None) -> dict[str, torch.Tensor]:
    """Documents `docs` one to a row ([BOS] + tokens, cut at `window`), padded to the longest with pad_id;
    labels of padding, of the last token of a document and of its context are IGNORE."""
    head = [bos_id] if bos_id is not None else []
    seqs = [np.concatenate([np.array(head, dtype=np.int64),
                            tokens[offsets[d]:offsets[d + 1]].astype(np.int64)])[:window] for d in docs]
    width = max(len(s) for s in seqs)
    rows = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for r, s in enumerate(seqs):
        rows[r, :len(s)] = torch.from_numpy(s)
        labels[r, :len(s)] = rows[r, :len(s)]
        if context is not None:  # row index i holds the document's token i - len(head)
            labels[r, :len(head) + context.loss_from[docs[r]]] = IGNORE
    return {"input_ids": rows[:, :-1].contiguous(), "labels": labels[:, 1:].contiguous()}


class DocumentLoader:
    """An endless iterator of batches of whole documents, one to a row (see the module doc), exactly resumable.

    Step k's batch is batch_size documents drawn at random (seed, k) among those of at most the step's
    length limit: curriculum_min + (seq_len + 1 - curriculum_min) * k / curriculum_steps tokens (BOS
    included), a whole row from curriculum_steps on (0: from the start). The shortest document is always
    eligible. Rows are padded to the batch's longest document.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, batch_size: int, pad_id: int,
                 bos_id: int | None = None, seed: int = 0, curriculum_steps: int = 0, curriculum_min: int = 0):
        if seq_len < 1 or batch_size < 1 or curriculum_steps < 0 or curriculum_min < 0:
            raise ConfigError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1, curriculum_steps "
                              f"({curriculum_steps}) and curriculum_min ({curriculum_min}) >= 0")
        self.split, self.seq_len, self.batch_size, self.seed = split, seq_len, batch_size, seed
        self.pad_id, self.bos_id = pad_id, bos_id
        self.curriculum_steps, self.curriculum_min = curriculum_steps, curriculum_min
        self.fingerprint = load_meta(data_dir)["tokenizer_fingerprint"]
        self.tokens, self.offsets = open_tokens(data_dir, split), open_documents(data_dir, split)
        self.context = Context.of(data_dir, split)
        if len(self.offsets) < 2:
            raise DataError(f"the {split} split of {data_dir} holds no documents: add data")
        self.window = seq_len + 1
        lengths = np.minimum(np.diff(self.offsets) + (bos_id is not None), self.window)
        self.by_length = np.argsort(lengths, kind="stable")
        self.sorted_lengths = lengths[self.by_length]
        self.step = 0

    def limit(self, step: int) -> int:
        """The longest document (in tokens, BOS included) step `step` draws from."""
        if step >= self.curriculum_steps:
            return self.window
        low = min(self.curriculum_min, self.window)
        return low + (self.window - low) * step // self.curriculum_steps

    def __iter__(self) -> DocumentLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        eligible = max(1, int(np.searchsorted(self.sorted_lengths, self.limit(self.step), side="right")))
        picked = np.random.default_rng([self.seed, self.step]).integers(0, eligible, self.batch_size)
        self.step += 1
        return _document_rows(self.tokens, self.offsets, self.by_length[picked], self.window, self.pad_id,
                              self.bos_id, self.context)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "window": self.window, "documents": len(self.offsets) - 1,
                "split": self.split, "tokenizer_fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        _check_resume(state, self.state_dict(), ("seed", "window", "documents", "split", "tokenizer_fingerprint"),
                      "seed and seq_len")
        self.step = int(state["step"])


def eval_documents(data_dir: str | os.PathLike, seq_len: int, batch_size: int, pad_id: int,
                   bos_id: int | None = None, max_batches: int | None = None,
                   split: str = "val") -> Iterator[dict[str, torch.Tensor]]:
    """The split's documents in order, one to a row as DocumentLoader lays them out, batch_size at a time,
    stopping after max_batches: the same batches on every call."""
    tokens, offsets = open_tokens(data_dir, split), open_documents(data_dir, split)
    context = Context.of(data_dir, split)
    docs = np.arange(len(offsets) - 1)
    if max_batches is not None:
        docs = docs[:max_batches * batch_size]
    return (_document_rows(tokens, offsets, docs[i:i + batch_size], seq_len + 1, pad_id, bos_id, context)
            for i in range(0, len(docs), batch_size))


def eval_batches(data_dir: str | os.PathLike, seq_len: int, batch_size: int, max_batches: int | None = None,
                 split: str = "val", extra_tokens: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """The split's windows in stream order, batch_size at a time (the last batch may be smaller),
    stopping after max_batches: the same batches on every call."""
    if seq_len < 1 or batch_size < 1 or extra_tokens < 0:
        raise ConfigError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1 and "
                          f"extra_tokens ({extra_tokens}) >= 0")
    tokens = open_tokens(data_dir, split)
    window = seq_len + 1 + extra_tokens
    n = _windows(tokens, window, split)
    starts = np.arange(n) * window
    if max_batches is not None:
        starts = starts[:max_batches * batch_size]
    context = Context.of(data_dir, split)
    return (_batch(tokens, starts[i:i + batch_size], window, context) for i in range(0, len(starts), batch_size))
