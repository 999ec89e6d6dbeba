"""Training metrics: a crash-proof JSON-lines log mirrored to TensorBoard, a progress bar, MoE load stats.

`DIR/metrics.jsonl` holds one JSON object per line: {"step": int, "time": unix seconds, ...values}.
A record may carry "kind" (default "train"; evaluations use "eval", see seekforge.train.report for the
conventions the report reads). Values are numbers, strings, or (nested) lists of numbers such as
per-layer expert loads; tensors and numpy values are converted on the way in. Non-finite floats are
written as JSON's common extensions NaN/Infinity, which Python's json reads back.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from seekforge.configio import atomic_write_text

__all__ = [
    "MetricsLogger",
    "read_metrics",
    "ProgressBar",
    "Throughput",
    "max_min_ratio",
    "load_cv",
    "expert_load_stats",
]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Lists up to this long go to TensorBoard as one scalar per element; longer ones as a histogram.
_MAX_SCALAR_LIST = 16
_RESERVED = ("step", "time", "kind")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl, skipping blank lines and any line cut short by a kill."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricsLogger:
    """Appends records to `out_dir/metrics.jsonl` and, when tensorboard is installed, to `out_dir/tensorboard`.

    `resume_step`: the step of the checkpoint a run resumes from; records with a larger step (logged
    after that checkpoint by the run that died) are dropped from the file and from TensorBoard, so the
    resumed run's records replace them without duplicates. Each line is flushed when written.
    """

    def __init__(self, out_dir: str | os.PathLike, tensorboard: bool = True, resume_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        if resume_step is not None:
            self.truncate_after(resume_step)
        else:
            self._drop_partial_line()
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the jsonl log is complete by itself
                pass
            else:
                purge = None if resume_step is None else resume_step + 1
                self._writer = SummaryWriter(log_dir=str(self.out_dir / TENSORBOARD_DIR), purge_step=purge)

    @property
    def tensorboard(self) -> bool:
        return self._writer is not None

    def truncate_after(self, step: int) -> int:
        """Keep only records with step <= `step` (and intact lines); returns how many were dropped."""
        if not self.path.exists():
            return 0
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            if _is_number(record.get("step")) and record["step"] > step:
                continue
            kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        return len(lines) - len(kept)

    def _drop_partial_line(self) -> None:
        # A run killed mid-write leaves a line without its newline; appending would glue onto it.
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def log(self, step: int, metrics: Mapping[str, Any] | None = None, **values: Any) -> dict:
        """Record `metrics` and `values` for `step`; returns the record as written."""
        record = {"step": int(step), "time": time.time()}
        record.update(_plain(dict(metrics or {}, **values)))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            self._to_tensorboard(record)
        return record

    def _to_tensorboard(self, record: dict) -> None:
        step, kind = record["step"], record.get("kind", "train")
        for key, value in record.items():
            if key in _RESERVED:
                continue
            tag = key if kind == "train" else f"{kind}/{key}"
            if isinstance(value, bool) or _is_number(value):
                self._writer.add_scalar(tag, float(value), step)
            elif isinstance(value, list) and value:
                rows = value if all(isinstance(v, list) for v in value) else [value]
                for r, row in enumerate(rows):
                    row_tag = tag if len(rows) == 1 else f"{tag}/{r}"
                    self._list_to_tensorboard(row_tag, row, step)

    def _list_to_tensorboard(self, tag: str, row: list, step: int) -> None:
        numbers = [float(v) for v in row if _is_number(v)]
        if len(numbers) != len(row) or not numbers:
            return
        if len(numbers) <= _MAX_SCALAR_LIST:
            for i, v in enumerate(numbers):
                self._writer.add_scalar(f"{tag}/{i}", v, step)
        else:
            finite = np.array([v for v in numbers if math.isfinite(v)])
            if finite.size:
                self._writer.add_histogram(tag, finite, step)

    def flush(self) -> None:
        self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Throughput:
    """Tokens per second, smoothed with an exponential moving average over updates.

    The clock starts at construction, so create it just before the first step.
    """

    def __init__(self, smoothing: float = 0.1):
        self.smoothing = smoothing
        self.rate: float | None = None
        self._last = time.perf_counter()

    def update(self, tokens: int) -> float:
        """Count `tokens` processed since the previous call; returns the smoothed tokens/s."""
        now = time.perf_counter()
        current = tokens / max(now - self._last, 1e-9)
        self._last = now
        self.rate = current if self.rate is None else (1 - self.smoothing) * self.rate + self.smoothing * current
        return self.rate


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.1f}"


class ProgressBar:
    """A tqdm bar over update steps showing loss, lr and tokens/s; tqdm adds elapsed time and ETA."""

    def __init__(self, total_steps: int, start_step: int = 0, desc: str = "train", disable: bool | None = None):
        self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                         dynamic_ncols=True, disable=disable)

    def update(self, step: int, loss: float | None = None, lr: float | None = None,
               tokens_per_s: float | None = None) -> None:
        """`step`: updates completed so far."""
        parts = []
        if loss is not None:
            parts.append(f"loss={float(loss):.4f}")
        if lr is not None:
            parts.append(f"lr={float(lr):.2e}")
        if tokens_per_s is not None:
            parts.append(f"tok/s={_si(float(tokens_per_s))}")
        self._bar.set_postfix_str(", ".join(parts), refresh=False)
        self._bar.update(step - self._bar.n)

    def write(self, text: str) -> None:
        """Print a line above the bar without breaking it."""
        self._bar.write(text)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_layers(load: Any) -> torch.Tensor:
    t = torch.as_tensor(_plain(load), dtype=torch.float64)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[-1] == 0:
        raise ValueError(f"expert load must be [experts] or [layers, experts], got shape {tuple(t.shape)}")
    return t


def max_min_ratio(load: Any) -> torch.Tensor:
    """Per layer, the most loaded expert's load over the least loaded one's.

    An idle expert beside busy ones gives inf (the imbalance is unbounded); an all-idle layer gives 1.
    `load` is [experts] or [layers, experts] (tensor, array or nested list); returns [layers].
    """
    t = _as_layers(load)
    hi, lo = t.max(-1).values, t.min(-1).values
    ratio = torch.where(hi > 0, torch.full_like(hi, math.inf), torch.ones_like(hi))
    return torch.where(lo > 0, hi / lo.clamp_min(1e-300), ratio)


def load_cv(load: Any) -> torch.Tensor:
    """Per layer, the coefficient of variation std/mean of expert loads (population std; 0 when idle)."""
    t = _as_layers(load)
    mean = t.mean(-1)
    std = t.std(-1, correction=0)
    return torch.where(mean > 0, std / mean.clamp_min(1e-300), torch.zeros_like(mean))


def expert_load_stats(load: Any) -> dict[str, list[float]]:
    """{"max_min_ratio": [...], "cv": [...]}, one entry per layer, ready for `MetricsLogger.log`."""
    return {"max_min_ratio": max_min_ratio(load).tolist(), "cv": load_cv(load).tolist()}
