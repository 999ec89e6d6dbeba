"""Perplexity of a checkpoint on a text file or a prepared data split, in nats, bits per token and bits per byte.

The tokens are read after BOS (so every one of them is scored, the first included) in non-overlapping windows
of seq_len predicted tokens: window i reads stream[i * seq_len : (i + 1) * seq_len] and predicts the next token
at each position, where stream is BOS followed by the tokens; the last window may be shorter. Each window
starts from a fresh context (no stride overlap), so a token early in a window sees little before it; this is the
standard cheap estimate, and with seq_len the model's context it is what training's evaluation loss measures.

Bits per byte divide the total in bits by the UTF-8 bytes of the scored text: the file's own bytes, or for
prepared data the bytes of the text the scored tokens decode to (special tokens such as the EOS between
documents left out). Unlike per-token figures it compares models whose tokenizers differ.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from seekforge.errors import ConfigError, DataError


@torch.no_grad()
def window_nll(model, stream: np.ndarray | torch.Tensor, length: int, batch_size: int) -> tuple[float, int]:
    """(summed next-token negative log-likelihood in nats, tokens predicted) of `stream` read in non-overlapping
    windows of `length` predicted tokens, `batch_size` windows a forward; the last window may be shorter."""
    if length < 1 or batch_size < 1:
        raise ConfigError(f"perplexity: window length and batch size must be >= 1, got {length} and {batch_size}")
    stream = torch.as_tensor(np.asarray(stream, dtype=np.int64))
    device = next(model.parameters()).device
    full = (len(stream) - 1) // length
    rows = [torch.stack([stream[i * length:(i + 1) * length + 1] for i in range(full)])] if full else []
    if full * length + 1 < len(stream):
        rows.append(stream[full * length:][None])  # the shorter tail window: a forward of its own
    total, count = 0.0, 0
    for group in rows:
        for chunk in group.split(batch_size):
            chunk = chunk.to(device)
            loss = model.loss(chunk[:, :-1], chunk[:, 1:]).main_loss
            total += float(loss) * chunk[:, 1:].numel()
            count += chunk[:, 1:].numel()
    return total, count


def summary(nll: float, tokens: int, n_bytes: int) -> dict:
    """Mean NLL (nats per token), perplexity, bits per token and bits per byte of a summed NLL."""
    mean = nll / tokens
    return {"tokens": tokens, "bytes": n_bytes, "nll": mean, "perplexity": math.exp(mean),
            "bits_per_token": mean / math.log(2), "bits_per_byte": nll / math.log(2) / n_bytes}


def text_tokens(tokenizer, path: str | os.PathLike, max_tokens: int | None) -> tuple[list[int], int]:
    """(token ids of a UTF-8 text file, at most max_tokens of them; the UTF-8 bytes those tokens cover)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--text {path}: no such file; give a UTF-8 text file to score")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"--text {path} is not UTF-8 text ({err}); convert it or prepare it with "
                        "`seekforge data prepare` and pass --data") from err
    ids = tokenizer.encode(text)
    if not ids:
        raise ConfigError(f"--text {path} holds no text to score: give a non-empty file")
    if max_tokens is not None and max_tokens < len(ids):
        ids = ids[:max_tokens]
        return ids, len(tokenizer.decode(ids).encode("utf-8"))
    return ids, len(text.encode("utf-8"))


def data_tokens(tokenizer, data_dir: str | os.PathLike, split: str, max_tokens: int | None) -> tuple[np.ndarray, int]:
    """(the first max_tokens token ids of a prepared data split, the UTF-8 bytes of the text they decode to)."""
    from seekforge.data.loader import load_meta, open_tokens

    meta = load_meta(data_dir)
    if meta["tokenizer_fingerprint"] != tokenizer.fingerprint:
        raise DataError(f"--data {data_dir} was tokenized with another tokenizer than the checkpoint's: prepare "
                        "it again with the checkpoint's tokenizer (`seekforge data prepare --tokenizer CKPT`)")
    ids = open_tokens(data_dir, split)[:max_tokens]
    if len(ids) == 0:
        raise DataError(f"the {split} split of {data_dir} holds no tokens: pick another split or add data")
    n_bytes = len(tokenizer.decode(ids.tolist(), skip_special_tokens=True).encode("utf-8"))
    if n_bytes == 0:
        raise DataError(f"the scored tokens of {data_dir}'s {split} split decode to no text")
    return np.asarray(ids, dtype=np.int64), n_bytes


def perplexity(model, tokenizer, ids, n_bytes: int, seq_len: int | None = None, batch_size: int = 4) -> dict:
    """The module doc's figures for token ids (read after BOS) that stand for n_bytes UTF-8 bytes of text, in
    windows of seq_len tokens (default the model's context, cfg.max_seq_len)."""
    limit = model.cfg.max_seq_len
    seq_len = limit if seq_len is None else seq_len
    if not 1 <= seq_len <= limit:
        raise ConfigError(f"--seq-len {seq_len} is outside the model's context of 1 to {limit} tokens: "
                          f"give a length up to {limit} (or leave it out to use {limit})")
    start = time.perf_counter()
    stream = np.concatenate([[tokenizer.bos_id], np.asarray(ids, dtype=np.int64)])
    nll, count = window_nll(model, stream, seq_len, batch_size)
    return {**summary(nll, count, n_bytes), "seq_len": seq_len, "windows": math.ceil(count / seq_len),
            "seconds": round(time.perf_counter() - start, 3)}
