"""A run's report: PNG plots and a markdown summary from its metrics.jsonl.

Conventions read from `DIR/metrics.jsonl` (see seekforge.train.metrics; every field is optional and a
missing one only drops its plot or line):

- Training records: those whose "kind" is absent or not "eval". Fields: "loss", "mtp_loss", "lr",
  "tokens_per_s", "expert_load" (per MoE layer, a list of per-expert token counts: [[...], [...]]),
  "expert_bias" (per MoE layer, the gate bias of each expert), and any field whose name starts with
  "reward" or "accuracy".
- Evaluation records: a record with an "eval_loss" field (it may also carry training fields), or a
  record with "kind": "eval", whose "loss" is then the eval loss. Eval losses are mean nats per token.
  Bits per byte come from "eval_bpb" (or "bpb" in a "kind": "eval" record), else are computed as
  eval_loss / ln 2 / "bytes_per_token" when the record gives the tokenizer's bytes per token.

Output: DIR/report.md and DIR/plots/*.png, each written atomically. Plots use the Agg canvas
directly, never pyplot, so a report never touches the caller's matplotlib backend.
"""

from __future__ import annotations

import io
import math
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from seekforge.configio import atomic_write_bytes, atomic_write_text
from seekforge.errors import SeekforgeError
from seekforge.train import long_eval
from seekforge.train.metrics import METRICS_FILE, load_cv, max_min_ratio, read_metrics

__all__ = ["write_report"]

PLOTS_DIR = "plots"
REPORT_FILE = "report.md"
_MAX_HEATMAP_ROWS = 1000  # steps drawn in an expert-load heat map; longer runs are subsampled evenly


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _is_eval(record: dict) -> bool:
    return record.get("kind") == "eval"


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        v = _number(r.get(key))
        if v is not None and _number(r.get("step")) is not None:
            steps.append(int(r["step"]))
            values.append(v)
    return steps, values


def _eval_points(records: list[dict]) -> list[dict]:
    """Per evaluation: step, loss and (when derivable) bits per byte."""
    points = []
    for r in records:
        if _number(r.get("step")) is None:
            continue
        loss = _number(r.get("eval_loss"))
        if loss is None and _is_eval(r):
            loss = _number(r.get("loss"))
        if loss is None:
            continue
        bpb = _number(r.get("eval_bpb"))
        if bpb is None and _is_eval(r):
            bpb = _number(r.get("bpb"))
        bytes_per_token = _number(r.get("bytes_per_token"))
        if bpb is None and bytes_per_token:
            bpb = loss / math.log(2) / bytes_per_token
        points.append({"step": int(r["step"]), "loss": loss, "bpb": bpb})
    return points


def _matrix_rows(records: list[dict], key: str) -> list[tuple[int, list]]:
    """(step, per-layer lists) of the training records holding `key`; a flat list is one layer."""
    rows = []
    for r in records:
        value = r.get(key)
        if _number(r.get("step")) is None or not isinstance(value, list) or not value:
            continue
        layers = value if all(isinstance(v, list) for v in value) else [value]
        rows.append((int(r["step"]), layers))
    return rows


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_lines(path: Path, title: str, ylabel: str, lines: list[tuple[str, list[int], list[float], str]]) -> Path:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, steps, values, style in lines:
        ax.plot(steps, values, style, label=label, markersize=4)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    return _save(fig, path)


def _plot_load_heatmap(path: Path, layer: int, steps: list[int], loads: list[list[float]]) -> Path:
    picks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), _MAX_HEATMAP_ROWS)).round().astype(int))
    matrix = np.array([loads[i] for i in picks], dtype=float)
    mean = matrix.mean(axis=1, keepdims=True)
    relative = np.divide(matrix, mean, out=np.zeros_like(matrix), where=mean > 0)
    first, last = steps[picks[0]], steps[picks[-1]]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(relative.T, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                      extent=(first, last if last > first else first + 1, -0.5, matrix.shape[1] - 0.5))
    ax.set(title=f"MoE layer {layer}: expert load relative to the mean (1 = balanced)",
           xlabel="step", ylabel="expert")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, label="load / mean load")
    return _save(fig, path)


def _plot_bias(path: Path, rows: list[tuple[int, list]]) -> Path:
    final_step, final = rows[-1]
    width = max(len(layer) for layer in final)
    matrix = np.full((len(final), width), np.nan)
    for i, layer in enumerate(final):
        matrix[i, : len(layer)] = layer
    finite = np.abs(matrix[np.isfinite(matrix)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    image = left.imshow(matrix, aspect="auto", origin="lower", interpolation="nearest",
                        cmap="coolwarm", vmin=-bound, vmax=bound)
    left.set(title=f"gate bias per expert at step {final_step}", xlabel="expert", ylabel="MoE layer")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=left, label="bias")
    n_layers = max(len(layers) for _, layers in rows)
    for i in range(n_layers):
        points = [(s, float(np.std(layers[i]))) for s, layers in rows if i < len(layers) and layers[i]]
        right.plot([p[0] for p in points], [p[1] for p in points], label=f"layer {i}")
    right.set(title="spread of the gate bias (std over experts)", xlabel="step", ylabel="std")
    right.grid(alpha=0.3)
    if n_layers <= 12:
        right.legend(fontsize="small")
    return _save(fig, path)


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if value == 0 or math.isinf(value) or math.isnan(value) or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def _best(steps: list[int], values: list[float], highest: bool = False) -> tuple[int, float] | None:
    finite = [(v, s) for s, v in zip(steps, values) if math.isfinite(v)]
    if not finite:
        return None
    value, step = (max if highest else min)(finite, key=lambda p: p[0])
    return step, value


def write_report(run_dir: str | os.PathLike) -> Path:
    """Plot `run_dir/metrics.jsonl` into `run_dir/plots/` and summarise it in `run_dir/report.md`."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise SeekforgeError(f"{run_dir}: no {METRICS_FILE} here; give the --out directory of a training run")
    records = read_metrics(metrics_path)
    train = [r for r in records if not _is_eval(r)]
    evals = _eval_points(records)
    plots_dir = run_dir / PLOTS_DIR
    plots: list[tuple[str, Path]] = []
    md = [f"# Run report: {run_dir.resolve().name}", ""]

    train_steps = [int(r["step"]) for r in train if _number(r.get("step")) is not None]
    md.append(f"{len(records)} records"
              + (f"; training steps {min(train_steps)} to {max(train_steps)}" if train_steps else "")
              + f"; {len(evals)} evaluations.")
    md.append("")

    loss_steps, loss = _series(train, "loss")
    mtp_steps, mtp = _series(train, "mtp_loss")
    lines = []
    if loss:
        lines.append(("train loss", loss_steps, loss, "-"))
    if mtp:
        lines.append(("MTP loss", mtp_steps, mtp, "-"))
    if evals:
        lines.append(("eval loss", [p["step"] for p in evals], [p["loss"] for p in evals], "o-"))
    if lines:
        plots.append(("loss", plot_lines(plots_dir / "loss.png", "loss", "nats / token", lines)))

    if loss or mtp or evals:
        md += ["## Loss", "", "| series | first | last | best (step) |", "|---|---|---|---|"]
        for label, steps, values in (("train loss", loss_steps, loss), ("MTP loss", mtp_steps, mtp),
                                     ("eval loss", [p["step"] for p in evals], [p["loss"] for p in evals])):
            if values:
                best = _best(steps, values)
                best_text = f"{_fmt(best[1])} ({best[0]})" if best else "–"
                md.append(f"| {label} | {_fmt(values[0])} | {_fmt(values[-1])} | {best_text} |")
        md.append("")
    bpb = [(p["step"], p["bpb"]) for p in evals if p["bpb"] is not None]
    if bpb:
        best = min(bpb, key=lambda p: p[1])
        md += [f"Eval bits per byte: last {_fmt(bpb[-1][1])} (step {bpb[-1][0]}), "
               f"best {_fmt(best[1])} (step {best[0]}).", ""]

    lr_steps, lr = _series(train, "lr")
    if lr:
        plots.append(("learning rate", plot_lines(plots_dir / "lr.png", "learning rate", "lr", [("lr", lr_steps, lr, "-")])))
        md += [f"Learning rate: peak {_fmt(max(lr))}, last {_fmt(lr[-1])}.", ""]

    _, tps = _series(train, "tokens_per_s")
    if tps:
        md += [f"Throughput: last {_fmt(tps[-1])} tokens/s, median {_fmt(statistics.median(tps))} tokens/s.", ""]

    load_rows = _matrix_rows(train, "expert_load")
    if load_rows:
        final_step, final = load_rows[-1]
        md += [f"## Expert load (step {final_step})", "", "| MoE layer | CV (std/mean) | max/min |", "|---|---|---|"]
        for i, layer in enumerate(final):
            if layer:
                md.append(f"| {i} | {_fmt(load_cv(layer).item())} | {_fmt(max_min_ratio(layer).item())} |")
        md.append("")
        n_layers = max(len(layers) for _, layers in load_rows)
        for i in range(n_layers):
            width = max((len(layers[i]) for _, layers in load_rows if i < len(layers)), default=0)
            usable = [(s, layers[i]) for s, layers in load_rows if i < len(layers) and len(layers[i]) == width]
            if width:
                path = _plot_load_heatmap(plots_dir / f"expert_load_layer{i:02d}.png", i,
                                          [s for s, _ in usable], [row for _, row in usable])
                plots.append((f"expert load, MoE layer {i}", path))

    bias_rows = _matrix_rows(train, "expert_bias")
    if bias_rows and any(bias_rows[-1][1]):
        plots.append(("gate bias", _plot_bias(plots_dir / "expert_bias.png", bias_rows)))

    reward_keys = sorted({k for r in records for k in r
                          if k.startswith(("reward", "accuracy")) and _number(r[k]) is not None})
    if reward_keys:
        md += ["## Rewards and accuracy", "", "| series | last | best (step) |", "|---|---|---|"]
        lines = []
        for key in reward_keys:
            for label, subset in ((key, train), (f"eval {key}", [r for r in records if _is_eval(r)])):
                steps, values = _series(subset, key)
                if values:
                    lines.append((label, steps, values, "-" if subset is train else "o-"))
                    best = _best(steps, values, highest=True)
                    best_text = f"{_fmt(best[1])} ({best[0]})" if best else "–"
                    md.append(f"| {label} | {_fmt(values[-1])} | {best_text} |")
        md.append("")
        plots.append(("rewards and accuracy", plot_lines(plots_dir / "rewards.png", "rewards and accuracy", "value", lines)))

    md += long_eval.section(run_dir)  # a run evaluated by `seekforge eval-long --out` it
    if plots:
        md += ["## Plots", ""]
        md += [f"![{title}]({path.relative_to(run_dir).as_posix()})" for title, path in plots]
        md.append("")
    else:
        md += ["No plottable fields (loss, lr, expert_load, expert_bias, reward*, accuracy*) were logged.", ""]
    return atomic_write_text(run_dir / REPORT_FILE, "\n".join(md))
