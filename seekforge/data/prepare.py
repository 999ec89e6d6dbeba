"""Text files to token shards for pretraining.

What counts as a document (seekforge.documents; each one ends with EOS in the token stream, marking the boundary):
- .txt: the whole file is one document; a line holding only `<|doc|>` separates documents within a file.
- .jsonl: one JSON object per line, with "text" (a string) or "messages" (a chat, rendered with the
  tokenizer's chat template, no generation prompt). Blank lines are skipped.
- .parquet: the "text" column, one document per row (needs pyarrow).

Layout of the output directory:
- train.bin, val.bin: the token ids, raw native-endian uint16 (vocabulary < 65536) or uint32; open with np.memmap.
- train.docs.npy, val.docs.npy: int64 offsets; document k spans tokens [docs[k], docs[k+1]).
- train.loss_from.npy, val.loss_from.npy: int64, one a document: its first `loss_from` tokens are context, not
  targets (a `Prompted` document's prompt; 0 for text). Absent in directories prepared before them: all 0.
- tokenizer/: the tokenizer that made the ids.
- meta.json: written last, so its presence marks a complete directory (see seekforge.data.loader.load_meta).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from seekforge.configio import atomic_write_text, fsync_dir
from seekforge.documents import Prompted, iter_documents, text_of
from seekforge.errors import ConfigError, DataError

FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a (binary, streamed) file into; it replaces `path`
    only if the block finishes. The text twin is seekforge.configio.atomic_write_text."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the data from colleagues
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


# ---- writing ---------------------------------------------------------------------------------------

class _SplitWriter:
    """Appends one split's tokens to a temporary .bin and keeps its document offsets and byte count."""

    def __init__(self, out_dir: Path, name: str, dtype: np.dtype, stack: contextlib.ExitStack):
        self.name, self.dtype = name, dtype
        self.tmp = stack.enter_context(atomic_path(out_dir / f"{name}.bin"))
        self.file = stack.enter_context(open(self.tmp, "wb"))
        self.offsets = array("q", [0])
        self.loss_from = array("q")
        self.bytes = 0
        self.last_doc_bytes = 0

    def write(self, docs: list[list[int]], n_bytes: list[int], loss_from: list[int]) -> None:
        if not docs:
            return
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=self.dtype,
                           count=sum(map(len, docs)))
        self.file.write(flat.tobytes())
        for ids in docs:
            self.offsets.append(self.offsets[-1] + len(ids))
        self.loss_from.extend(loss_from)
        self.bytes += sum(n_bytes)
        self.last_doc_bytes = n_bytes[-1]

    def pop_last(self) -> tuple[np.ndarray, int, int]:
        """Remove the last document (tokens, UTF-8 bytes, loss_from) from this split."""
        self.file.flush()
        start, end = self.offsets[-2], self.offsets[-1]
        tokens = np.fromfile(self.tmp, dtype=self.dtype, offset=start * self.dtype.itemsize, count=end - start)
        self.file.seek(start * self.dtype.itemsize)
        self.file.truncate()
        self.offsets.pop()
        self.bytes -= self.last_doc_bytes
        return tokens, self.last_doc_bytes, self.loss_from.pop()

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    @property
    def docs(self) -> int:
        return len(self.offsets) - 1

    def finish(self, out_dir: Path) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        for suffix, values in (("docs", self.offsets), ("loss_from", self.loss_from)):
            with atomic_path(out_dir / f"{self.name}.{suffix}.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, np.frombuffer(values, dtype=np.int64))
        return {"tokens": self.tokens, "bytes": self.bytes, "docs": self.docs, "file": f"{self.name}.bin",
                "doc_offsets": f"{self.name}.docs.npy", "loss_from": f"{self.name}.loss_from.npy"}


def _encode(tokenizer, docs: list) -> list[tuple[list[int], int]]:
    """(token ids, context tokens) of each document: a Prompted one is its prompt's ids then its completion's,
    each encoded on its own as SFT encodes them, so the completion's first token never merges into the prompt."""
    ids = tokenizer.encode_batch([d if isinstance(d, str) else d.prompt for d in docs])
    out = []
    for doc, first in zip(docs, ids):
        out.append((first + tokenizer.encode(doc.completion), len(first)) if isinstance(doc, Prompted)
                   else (first, 0))
    return out


def prepare(inputs: Sequence[str | os.PathLike], tokenizer, out_dir: str | os.PathLike,
            val_fraction: float = 0.01, seed: int = 0, batch_docs: int = 512, progress: bool = True) -> dict:
    """Tokenize `inputs` into train/val shards under `out_dir`; returns the meta.json contents.

    Each document goes to val with probability `val_fraction`, drawn in input order from `seed`; when
    that leaves val empty but train holds two or more documents, the last train document moves to val,
    so a small corpus still has something to evaluate on.
    """
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction {val_fraction} is outside [0, 1): pass e.g. --val-fraction 0.01")
    if not inputs:
        raise ConfigError("no input files: pass at least one --input FILE")
    paths = [Path(p) for p in inputs]
    for p in paths:  # fail before any work on a typo in the last of many inputs
        if not p.exists():
            raise DataError(f"{p} not found: check the --input path")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    rng = np.random.default_rng(seed)

    def chat(messages):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=False)

    documents = itertools.chain.from_iterable(iter_documents(p, chat) for p in paths)
    with contextlib.ExitStack() as stack:
        train = _SplitWriter(out_dir, "train", dtype, stack)
        val = _SplitWriter(out_dir, "val", dtype, stack)
        bar = stack.enter_context(tqdm(desc="tokenizing", unit="doc", disable=not progress))
        while batch := list(itertools.islice(documents, batch_docs)):
            to_val = rng.random(len(batch)) < val_fraction
            parts = {False: ([], [], []), True: ([], [], [])}
            for doc, (ids, context), is_val in zip(batch, _encode(tokenizer, batch), to_val):
                if not ids or ids[-1] != eos:  # a rendered chat already ends with EOS
                    ids.append(eos)
                split_ids, split_bytes, split_context = parts[bool(is_val)]
                split_ids.append(ids)
                split_bytes.append(len(text_of(doc).encode("utf-8")))
                split_context.append(context)
            train.write(*parts[False])
            val.write(*parts[True])
            bar.update(len(batch))
            bar.set_postfix(tokens=train.tokens + val.tokens)
        if val.docs == 0 and val_fraction > 0 and train.docs >= 2:
            tokens, n_bytes, context = train.pop_last()
            val.write([tokens.tolist()], [n_bytes], [context])
        if train.docs == 0:
            raise DataError(f"every document went to the validation split: lower val_fraction "
                            f"(now {val_fraction}) or add documents")
        # Past this point old files get replaced one by one: until meta.json is rewritten, the directory
        # reads as incomplete. A failure before it (a bad input, say) leaves the old directory untouched.
        (out_dir / "meta.json").unlink(missing_ok=True)
        splits = {"train": train.finish(out_dir), "val": val.finish(out_dir)}
        tokenizer.save_pretrained(out_dir / "tokenizer")
    # Leaving the ExitStack closed the files and moved train.bin and val.bin into place.
    meta = {
        "format": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": eos,
        "bos_id": tokenizer.bos_id,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "tokenizer_dir": "tokenizer",
        "seed": seed,
        "val_fraction": val_fraction,
        "inputs": [str(p) for p in paths],
        "splits": splits,
    }
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2))
    return meta
