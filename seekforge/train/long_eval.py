"""What a context extension keeps: perplexity against context length, and passkey retrieval against length and
depth, with their plots and report section.

- Perplexity at length L: the same span of held-out tokens (the longest length times `windows`) cut into
  windows of L tokens, each read from its own start; the mean next-token loss over every token of the span,
  as exp. A model that reads its whole context gets lower with L; one that cannot place positions past its
  training length gets higher.
- Passkey accuracy at (length, depth): the share of passkey documents (seekforge.tasks.passkey) of about that
  many tokens, key at that depth, whose key the model continues "The pass key is " with. It is read in one
  forward with the key as the input (every key token the argmax after the ones before it), which is exactly
  whether greedy decoding writes the key.

`DIR/long_context.json` holds every evaluated model's results by label; `DIR/plots/perplexity_by_length.png`
draws the curves, `DIR/plots/passkey_<label>.png` each heat map, and `markdown` the report section.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from seekforge.configio import atomic_write_bytes, atomic_write_text
from seekforge.errors import ConfigError, DataError
from seekforge.train.perplexity import window_nll

RESULTS_FILE = "long_context.json"
PLOTS_DIR = "plots"


def load(checkpoint: str | os.PathLike, changes: dict | None = None, device: str = "cpu"):
    """(model in eval mode in fp32, its tokenizer) of a Hugging Face checkpoint directory, with ModelConfig
    `changes` (e.g. YaRN's rope_factor and original_seq_len, to read a model extended without training)."""
    from seekforge.model.hf import from_pretrained
    from seekforge.tokenizer import Tokenizer

    model = from_pretrained(checkpoint, dtype=torch.float32, device=device, changes=changes).eval()
    return model, Tokenizer.from_pretrained(checkpoint)


@torch.no_grad()
def perplexity_by_length(model, tokens: np.ndarray, lengths: list[int], windows: int = 4,
                         batch_tokens: int = 8192) -> list[dict]:
    """[{length, loss, ppl, tokens}] for each length (see the module doc): `tokens` is a held-out token
    stream holding at least max(lengths) * windows + 1 tokens."""
    if not lengths or min(lengths) < 1 or windows < 1:
        raise ConfigError(f"perplexity: lengths must be positive and windows >= 1, got {lengths} and {windows}")
    span = max(lengths) * windows
    if len(tokens) < span + 1:
        raise DataError(f"perplexity at length {max(lengths)} over {windows} window(s) needs {span + 1} held-out "
                        f"tokens, the data holds {len(tokens)}: give a larger validation split or fewer windows")
    out = []
    for length in lengths:
        total, count = window_nll(model, tokens[:span + 1], length, max(1, batch_tokens // length))
        out.append({"length": length, "loss": total / count, "ppl": math.exp(total / count), "tokens": count})
    return out


def passkey_rows(tokenizer, length: int, depth: float, n: int, seed: int, digits: int = 5) -> list:
    """n passkey rows of about `length` tokens (prompt and answer) with the key at `depth`."""
    from seekforge.data.long_docs import passkey_filler
    from seekforge.tasks.passkey import PasskeyTask

    filler = passkey_filler(tokenizer, length, digits)
    return PasskeyTask(min_filler=filler, max_filler=filler, depth=depth, digits=digits).rows("test", n, seed)


def _probe(tokenizer, row) -> tuple[list[int], int]:
    """(token ids of the row's text through its key, where the key starts)."""
    from seekforge.tasks.passkey import probe_prefix

    prefix = tokenizer.encode_prompt(probe_prefix(row))
    full = tokenizer.encode_prompt(probe_prefix(row) + row.answer)
    if full[:len(prefix)] != prefix or len(full) == len(prefix):
        raise DataError("the tokenizer merges the passkey with the text before it; passkey retrieval is scored "
                        "on the key's own tokens, so use a tokenizer that splits digits from words")
    return full, len(prefix)


@torch.no_grad()
def passkey_accuracy(model, tokenizer, rows: list, batch_size: int = 8) -> tuple[float, float]:
    """(share of rows whose key the model reads back, mean tokens per row)."""
    device = next(model.parameters()).device
    probes = [_probe(tokenizer, row) for row in rows]
    correct = 0
    for i in range(0, len(probes), batch_size):
        batch = probes[i:i + batch_size]
        width = max(len(ids) for ids, _ in batch) - 1
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        for j, (ids, _) in enumerate(batch):  # right padding: causal attention keeps it out of the key
            inputs[j, :len(ids) - 1] = torch.tensor(ids[:-1])
        predicted = model(inputs.to(device)).argmax(-1).cpu()
        for j, (ids, start) in enumerate(batch):
            correct += predicted[j, start - 1:len(ids) - 1].tolist() == ids[start:]
    return correct / len(rows), sum(len(ids) for ids, _ in probes) / len(probes)


def passkey_grid(model, tokenizer, lengths: list[int], depths: list[float], samples: int = 8, seed: int = 0,
                 digits: int = 5) -> dict:
    """Accuracy[depth][length] over `samples` documents each, with the mean tokens of each length's documents."""
    if samples < 1 or not lengths or not depths:
        raise ConfigError(f"passkey grid: need lengths, depths and samples >= 1, got {lengths}, {depths}, {samples}")
    accuracy, tokens = [], [0.0] * len(lengths)
    for depth in depths:
        row = []
        for j, length in enumerate(lengths):
            acc, mean_tokens = passkey_accuracy(model, tokenizer, passkey_rows(tokenizer, length, depth, samples,
                                                                               seed, digits))
            row.append(acc)
            tokens[j] += mean_tokens / len(depths)
        accuracy.append(row)
    return {"lengths": list(lengths), "depths": list(depths), "accuracy": accuracy, "tokens": tokens,
            "samples": samples, "seed": seed}


def evaluate_long(model, tokenizer, val_tokens: np.ndarray, original: int, multiples: list[float],
                  depths: list[float], samples: int, windows: int, seed: int = 0) -> dict:
    """Perplexity and the passkey grid of one model at lengths `multiples` x `original` tokens."""
    lengths = [max(1, round(m * original)) for m in multiples]
    return {"perplexity": perplexity_by_length(model, val_tokens, lengths, windows),
            "passkey": passkey_grid(model, tokenizer, lengths, depths, samples, seed)}


def evaluate_models(models: dict, data_dir: str | os.PathLike, original: int, multiples: list[float],
                    depths: list[float], samples: int, windows: int, seed: int, device: str,
                    out: str | os.PathLike) -> dict:
    """evaluate_long of every (checkpoint, ModelConfig changes or None) by label on data_dir's held-out split;
    the results, also written to out/long_context.json."""
    from seekforge.data.loader import open_tokens
    from seekforge.train.optim import pick_device

    val = np.asarray(open_tokens(data_dir, "val"))
    results = {"original_seq_len": original, "data": str(data_dir), "digits": 5, "models": {}}
    for label, (checkpoint, changes) in models.items():
        model, tokenizer = load(checkpoint, changes, str(pick_device(device)))
        r = evaluate_long(model, tokenizer, val, original, multiples, depths, samples, windows, seed)
        results["models"][label] = {"checkpoint": str(checkpoint), "changes": changes, **r, "rise": rise(r)}
        print(f"[eval] {label}: perplexity " + ", ".join(f"{p['length']}: {p['ppl']:.3f}" for p in r["perplexity"])
              + "; passkey " + ", ".join(f"{n}: {a:.2f}" for n, a in
                                         zip(r["passkey"]["lengths"], np.mean(r["passkey"]["accuracy"], axis=0))),
              flush=True)
    atomic_write_text(Path(out) / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    return results


def rise(result: dict) -> dict:
    """The seed's claim in our terms: perplexity at the longest length against at the shortest."""
    first, last = result["perplexity"][0], result["perplexity"][-1]
    return {"short_length": first["length"], "long_length": last["length"], "ppl_short": first["ppl"],
            "ppl_long": last["ppl"], "ppl_rise": last["ppl"] - first["ppl"]}


# ---------------------------------------------------------------- results, plots, report section

def read_results(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _save_png(fig, path: Path) -> Path:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return atomic_write_bytes(path, buffer.getvalue())


def plot(results: dict, run_dir: str | os.PathLike) -> list[tuple[str, Path]]:
    """The perplexity curves (every model) and one passkey heat map per model, under run_dir/plots."""
    from matplotlib.figure import Figure

    plots_dir = Path(run_dir) / PLOTS_DIR
    models, original = results["models"], results["original_seq_len"]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, r in models.items():
        ax.plot([p["length"] for p in r["perplexity"]], [p["ppl"] for p in r["perplexity"]], "o-", label=label)
    ax.axvline(original, color="grey", linestyle=":", label=f"original context ({original})")
    ax.set(xscale="log", yscale="log", title="perplexity against context length", xlabel="context (tokens)",
           ylabel="perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    out = [("perplexity against context length", _save_png(fig, plots_dir / "perplexity_by_length.png"))]
    for label, r in models.items():
        grid = r["passkey"]
        fig = Figure(figsize=(1.6 + 0.9 * len(grid["lengths"]), 1.4 + 0.5 * len(grid["depths"])),
                     layout="constrained")
        ax = fig.add_subplot()
        image = ax.imshow(np.array(grid["accuracy"]), vmin=0, vmax=1, cmap="RdYlGn", origin="lower", aspect="auto")
        ax.set_xticks(range(len(grid["lengths"])), [str(n) for n in grid["lengths"]])
        ax.set_yticks(range(len(grid["depths"])), [f"{d:.2f}" for d in grid["depths"]])
        for (i, j), value in np.ndenumerate(np.array(grid["accuracy"])):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set(title=f"passkey retrieval: {label}", xlabel="document length (tokens)", ylabel="key depth")
        fig.colorbar(image, ax=ax, label="accuracy")
        out.append((f"passkey retrieval, {label}", _save_png(fig, plots_dir / f"passkey_{_slug(label)}.png")))
    return out


def markdown(results: dict, plots: list[tuple[str, Path]], run_dir: str | os.PathLike) -> list[str]:
    """The report section: perplexity by length, the claim's counterpart, passkey accuracy, the plots."""
    models, original = results["models"], results["original_seq_len"]
    lengths = [p["length"] for p in next(iter(models.values()))["perplexity"]]
    md = ["## Long context", "",
          f"Original context {original} tokens. Perplexity on the same held-out tokens read in windows of each "
          f"length; passkey accuracy is greedy retrieval of a {results.get('digits', 5)}-digit key, mean over the "
          f"key depths {', '.join(f'{d:g}' for d in next(iter(models.values()))['passkey']['depths'])}.", "",
          "| model | " + " | ".join(f"ppl @{n}" for n in lengths) + " | rise longest vs shortest |",
          "|---|" + "---|" * (len(lengths) + 1)]
    for label, r in models.items():
        claim = rise(r)
        md.append(f"| {label} | " + " | ".join(f"{p['ppl']:.3f}" for p in r["perplexity"])
                  + f" | {claim['ppl_rise']:+.3f} |")
    md += ["", "| model | " + " | ".join(f"passkey @{n}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for label, r in models.items():
        by_length = np.array(r["passkey"]["accuracy"]).mean(axis=0)
        md.append(f"| {label} | " + " | ".join(f"{a:.2f}" for a in by_length) + " |")
    md.append("")
    for title, path in plots:
        md += [f"![{title}]({path.relative_to(run_dir).as_posix()})", ""]
    return md


def section(run_dir: str | os.PathLike) -> list[str]:
    """The report section of run_dir's long-context results (its plots drawn again); none without them."""
    results = read_results(run_dir)
    if not results:
        return []
    return markdown(results, plot(results, run_dir), run_dir)

