"""Heterogeneous expert depth (ModelConfig.n_deep_experts) on a CPU: small models pretrained alike with and without
deep experts, at equal active parameters, compared by validation loss and by which tokens their experts take.

    python bench/deep_experts.py --json docs/benchmarks/deep-experts-cpu.json --plot docs/benchmarks/deep-experts-cpu.png
    python bench/deep_experts.py --steps 40 --seeds 0 --out /tmp/de-smoke     # a smoke run, a minute

Each (variant, seed) is one `seekforge train` run of the tiny preset at --layers layers on the built-in math
corpus (same data, steps, schedule and seed for both variants; the same initial weights too, since deep experts
hold the same tensors as one-layer ones), --jobs runs at a time with one torch thread each. A run whose
final model exists under --out is reused. Then, on --analysis-batches windows of the validation split, every main
MoE layer's routing is counted by expert and by the kind of input token it routes (digit, operator, word,
other): the share of routed slots that reach the deep experts (for the baseline, the experts with the same ids:
the control, where those ids mean nothing), per kind and overall, and how far each expert's mix of token kinds
departs from the layer's (KL divergence, bits), for deep and one-layer experts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import commit, machine  # noqa: E402

from seekforge.configio import atomic_write_text  # noqa: E402

KINDS = ("digit", "operator", "word", "other")
OPERATORS = set("+-*/=^%()<>")


def token_kind(text: str) -> str:
    """The kind of one token's text: digits, operator symbols, letters, or anything else (spaces, punctuation,
    tags, mixed)."""
    s = text.strip()
    if not s:
        return "other"
    if s.isdigit():
        return "digit"
    if all(c in OPERATORS for c in s):
        return "operator"
    if s.isalpha():
        return "word"
    return "other"


def train_command(args, n_deep: int, seed: int, out: Path) -> list[str]:
    steps = args.steps
    warmup, decay = max(1, steps // 30), steps // 3
    return [sys.executable, "-m", "seekforge.cli", "train", "--config", "tiny", "--out", str(out),
            f"steps={steps}", f"seed={seed}", f"seq_len={args.seq_len}", f"batch_size={args.batch_size}",
            f"lr={args.lr}", f"warmup_steps={warmup}", f"constant_steps={steps - warmup - decay}",
            f"decay_steps={decay}", f"eval_every={max(1, steps // 6)}", f"save_every={steps}",
            f"eval_batches={args.eval_batches}", f"builtin_docs={args.docs}", "builtin_vocab=512",
            f"model_overrides.n_layers={args.layers}", "model_overrides.max_seq_len=512",
            f"model_overrides.n_deep_experts={n_deep}", "progress=false", "tensorboard=false", "device=cpu"]


def train_all(args, runs: list[tuple[str, int, int, Path]]) -> None:
    """Runs the training commands of the runs not done yet, --jobs at a time."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    todo = [r for r in runs if not (r[3] / "final" / "config.json").is_file()]
    running: list[tuple[subprocess.Popen, Path]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            _, n_deep, seed, out = todo.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            log = open(out.with_suffix(".log"), "w")
            cmd = train_command(args, n_deep, seed, out)
            print(" ".join(cmd[1:]), flush=True)
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), out))
        time.sleep(2)
        for proc, out in list(running):
            if proc.poll() is not None:
                running.remove((proc, out))
                if proc.returncode:
                    raise SystemExit(f"training {out} failed (exit {proc.returncode}); see {out.with_suffix('.log')}")


def curves(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"] + 1, r["eval_loss"]) for r in records if "eval_loss" in r]
    last = records[-1]
    return {"eval": evals, "final_eval_loss": evals[-1][1], "final_eval_bpb": last.get("eval_bpb"),
            "final_train_loss": last["main_loss"], "train_s": last["time"] - records[0]["time"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[len(records) // 10:])}


@torch.no_grad()
def analyse(out: Path, args, deep_ids: list[int]) -> dict:
    """On the validation windows: per main MoE layer, routed slots by expert and input token kind; and the
    next-token loss by the kind of the token predicted."""
    from seekforge.data.loader import eval_batches
    from seekforge.model.hf import from_pretrained
    from seekforge.tokenizer import Tokenizer

    model = from_pretrained(out / "final", dtype="float32")
    tok = Tokenizer.from_pretrained(out / "final")
    kind_of = torch.tensor([KINDS.index(token_kind(tok.decode([i]))) for i in range(model.cfg.vocab_size)])
    n_experts = model.cfg.n_routed_experts
    counts: dict[int, torch.Tensor] = {}
    token_kinds = torch.zeros(len(KINDS))
    loss_sums, target_kinds = torch.zeros(len(KINDS)), torch.zeros(len(KINDS))
    for batch in eval_batches(out / "data", args.seq_len, args.batch_size, args.analysis_batches):
        tokens = batch["input_ids"]
        kinds = kind_of[tokens]
        token_kinds += torch.bincount(kinds.flatten(), minlength=len(KINDS))
        h, routing = model.hidden(tokens)
        losses = torch.nn.functional.cross_entropy(model.head(model.norm(h)).flatten(0, 1),
                                                   batch["labels"].flatten(), reduction="none")
        label_kinds = kind_of[batch["labels"]].flatten()
        loss_sums += torch.zeros(len(KINDS)).index_add_(0, label_kinds, losses)
        target_kinds += torch.bincount(label_kinds, minlength=len(KINDS))
        for layer, r in routing.items():
            k = r.indices.shape[-1]
            pair = r.indices.flatten() * len(KINDS) + kinds.unsqueeze(-1).expand(-1, -1, k).flatten()
            c = torch.bincount(pair, minlength=n_experts * len(KINDS)).view(n_experts, len(KINDS)).float()
            counts[layer] = counts.get(layer, 0) + c
    deep = torch.zeros(n_experts, dtype=torch.bool)
    deep[deep_ids] = True
    layers = {}
    for layer, c in sorted(counts.items()):
        by_kind = c.sum(0)
        mix = by_kind / by_kind.sum()
        kl = []
        for e in range(n_experts):
            p = c[e] / c[e].sum().clamp_min(1)
            kl.append(sum(float(p[j] * math.log2(p[j] / mix[j])) for j in range(len(KINDS)) if p[j] > 0))
        layers[str(layer)] = {
            "slots_by_expert_and_kind": c.long().tolist(),
            "deep_load_share": float(c[deep].sum() / c.sum()),
            "deep_share_by_kind": {kind: float(c[deep, j].sum() / c[:, j].sum()) for j, kind in enumerate(KINDS)},
            "kind_kl_bits": {"deep": statistics.mean(kl[e] for e in range(n_experts) if deep[e]),
                             "one_layer": statistics.mean(kl[e] for e in range(n_experts) if not deep[e])},
        }
    return {"tokens_by_kind": dict(zip(KINDS, token_kinds.long().tolist())), "layers": layers,
            "loss_by_target_kind": dict(zip(KINDS, (loss_sums / target_kinds.clamp_min(1)).tolist())),
            "parameters": model.num_parameters()}


def summarise(results: dict) -> dict:
    """Means over seeds, the deep variant minus the baseline (eval loss; per-seed differences too)."""
    out = {}
    for variant, runs in results["runs"].items():
        layers = [run["analysis"]["layers"] for run in runs]
        out[variant] = {
            "final_eval_loss": statistics.mean(r["final_eval_loss"] for r in runs),
            "deep_share_by_kind_per_seed": [{k: statistics.mean(lay["deep_share_by_kind"][k] for lay in ls.values())
                                             for k in KINDS} for ls in layers],
            "deep_load_share": statistics.mean(lay["deep_load_share"] for ls in layers for lay in ls.values()),
            "deep_share_by_kind": {k: statistics.mean(lay["deep_share_by_kind"][k] for ls in layers
                                                      for lay in ls.values()) for k in KINDS},
            "kind_kl_bits": {t: statistics.mean(lay["kind_kl_bits"][t] for ls in layers for lay in ls.values())
                             for t in ("deep", "one_layer")},
            "loss_by_target_kind": {k: statistics.mean(r["analysis"]["loss_by_target_kind"][k] for r in runs)
                                    for k in KINDS},
        }
    diffs = [d["final_eval_loss"] - b["final_eval_loss"] for b, d in zip(results["runs"]["baseline"],
                                                                         results["runs"]["deep"])]
    out["eval_loss_deep_minus_baseline"] = {"per_seed": diffs, "mean": statistics.mean(diffs)}
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    axes = axes.flatten()
    colours = {"baseline": "tab:blue", "deep": "tab:orange"}
    for variant, runs in results["runs"].items():
        for i, run in enumerate(runs):
            steps, losses = zip(*run["eval"])
            axes[0].plot(steps, losses, color=colours[variant], alpha=0.8, marker=".",
                         label=f"{variant} (seed {run['seed']})", linestyle=("-", "--", ":")[i % 3])
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("validation loss (nats/token, log scale)")
    axes[0].set_title("validation loss")
    axes[0].legend(fontsize=7)
    summary = results["summary"]
    width = 0.38
    for i, variant in enumerate(("baseline", "deep")):
        shares = [summary[variant]["deep_share_by_kind"][k] for k in KINDS]
        axes[1].bar([j + (i - 0.5) * width for j in range(len(KINDS))], shares, width, color=colours[variant],
                    label=f"{variant}" + (" (same expert ids: control)" if variant == "baseline" else ""))
    axes[1].axhline(results["setup"]["n_deep_experts"] / results["setup"]["n_routed_experts"], color="grey",
                    linestyle=":", label="deep experts' share of experts")
    axes[1].set_xticks(range(len(KINDS)), KINDS)
    axes[1].set_ylabel("share of routed slots to the deep experts' ids")
    axes[1].set_title("which tokens reach the deep experts")
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=7, loc="upper right")
    for i, variant in enumerate(("baseline", "deep")):
        kl = summary[variant]["kind_kl_bits"]
        axes[2].bar([j + (i - 0.5) * width for j in range(2)], [kl["one_layer"], kl["deep"]], width,
                    color=colours[variant], label=variant)
    axes[2].set_xticks(range(2), ["one-layer ids", "deep ids"])
    axes[2].set_ylabel("mean KL(expert's token kinds || layer's), bits")
    axes[2].set_title("expert specialisation by token kind")
    axes[2].legend(fontsize=7)
    for i, variant in enumerate(("baseline", "deep")):
        losses = [summary[variant]["loss_by_target_kind"][k] for k in KINDS]
        axes[3].bar([j + (i - 0.5) * width for j in range(len(KINDS))], losses, width, color=colours[variant],
                    label=variant)
    axes[3].set_xticks(range(len(KINDS)), KINDS)
    axes[3].set_ylabel("validation loss (nats/token), mean over seeds")
    axes[3].set_title("loss by the kind of token predicted")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/deep-experts", help="where the training runs go (reused if there)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--n-deep", type=int, default=4, help="deep experts of the tiny preset's 8 (2 groups of 4)")
    p.add_argument("--layers", type=int, default=4, help="transformer layers (the first dense, the rest MoE)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--docs", type=int, default=8000, help="built-in corpus documents")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--analysis-batches", type=int, default=16)
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    from seekforge.model import ModelConfig
    from seekforge.model.moe import Experts

    cfg = ModelConfig.preset("tiny").replace(n_layers=args.layers, n_deep_experts=args.n_deep)
    experts = Experts(cfg.n_routed_experts, 1, 2, cfg.n_deep_experts, cfg.n_expert_groups)
    deep_ids = torch.nonzero(experts.is_deep(torch.arange(cfg.n_routed_experts))).flatten().tolist()
    out = Path(args.out)
    runs = [(variant, n, seed, out / f"{variant}-seed{seed}") for seed in args.seeds
            for variant, n in (("baseline", 0), ("deep", args.n_deep))]
    train_all(args, runs)
    results = {
        "bench": "deep_experts", "commit": commit(), "machine": machine(torch.device("cpu")),
        "setup": {"preset": "tiny", "n_layers": args.layers, "n_routed_experts": cfg.n_routed_experts,
                  "n_activated_experts": cfg.n_activated_experts, "n_expert_groups": cfg.n_expert_groups,
                  "n_deep_experts": args.n_deep, "deep_expert_ids": deep_ids, "moe_inter_dim": cfg.moe_inter_dim,
                  "steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": args.lr,
                  "builtin_docs": args.docs, "eval_batches": args.eval_batches,
                  "analysis_batches": args.analysis_batches, "threads_per_run": args.threads,
                  "commands": {f"{v}-seed{s}": " ".join(train_command(args, n, s, o)[1:]) for v, n, s, o in runs}},
        "runs": {"baseline": [], "deep": []},
    }
    for variant, _, seed, run_dir in runs:
        print(f"analysing {run_dir}", flush=True)
        results["runs"][variant].append({"seed": seed, **curves(run_dir),
                                         "analysis": analyse(run_dir, args, deep_ids)})
    results["summary"] = summarise(results)
    print(json.dumps(results["summary"], indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
