"""KV tiers under the prefix cache on multi-turn chats, with and without the tiers, in one run.

    python bench/kv_tiers.py --json docs/benchmarks/kv-tiers-cpu.json          # CPU: the tiny shape
    python bench/kv_tiers.py --device cuda --dtype bfloat16 --preset 16b --layers 0 --cuda-graphs \\
        --system-tokens 2048 --user-tokens 256 --reply-tokens 128 --gpu-cache-tokens 65536 --kv-cpu-gb 16 \\
        --disk-side-cpu-gb 1 --json docs/benchmarks/kv-tiers-16b-h100.json

The workload: --conversations chats of --turns turns. Every chat opens with the same --system-tokens system prompt;
a turn sends the history plus a --user-tokens user message and gets --reply-tokens greedy tokens back (ignore_eos),
which join the history. --concurrency chats are in flight at once, each asking its next turn as soon as its reply is
done (a closed loop), so many other chats run between two turns of one, and the GPU cache (--gpu-cache-tokens, far
less than the histories) evicts its history meanwhile. Random weights and tokens; the shapes of the work are the
same on every side whatever the replies say (fixed lengths).

Sides, each run on a fresh LLM (and disk directory) over the same model:
- off: the GPU's prefix cache alone (it keeps the shared system prompt, which every turn revives);
- tiers: a CPU tier of --kv-cpu-gb (enough for every history) over a disk tier in a fresh directory;
- disk: a CPU tier of --disk-side-cpu-gb only (it stages the disk's reads and writes), over a fresh disk tier: the
  histories come back from the disk.

Figures per side: time to first token (TTFT: from a turn's add_request to the engine step that returns its first
token) median and p95 over the later turns (2 and on, which have a history) and over the first turns; prefill
tokens computed (LLM.stats); throughput (generated tokens, and prompt + generated tokens, over the wall time); the
tiers' hits; and where the later turns' TTFT goes (Probe: steps and time queued, steps waiting for a copy back up,
prefill chunks and time; median, p95 and mean of each). With --repeats, each figure is the best of that many runs, the sides alternating (every run is in the
JSON). Gate: every side's greedy replies are compared with the off side's, chat by chat and turn by turn. In fp32
they must be identical, else the run exits non-zero and keeps no figure. In bf16 the share of identical replies is
recorded as information: a reused latent computed during decode and a recomputed one differ in the last bits, and
near-ties in random weights flip (the lengths, and so the work, stay the same).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections import deque
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from ceilings import commit, machine  # noqa: E402

from seekforge import LLM, SamplingParams  # noqa: E402
from seekforge.model import ModelConfig, Transformer  # noqa: E402
from seekforge.model.transformer import default_dtype  # noqa: E402


def workload(args, vocab: int, seed: int) -> tuple[list[int], list[list[list[int]]]]:
    """The system prompt and each chat's user messages, turn by turn."""
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(2, vocab, (args.system_tokens,), generator=g).tolist()
    users = [[torch.randint(2, vocab, (args.user_tokens,), generator=g).tolist() for _ in range(args.turns)]
             for _ in range(args.conversations)]
    return system, users


class Probe:
    """Where each request's time to first token goes, read off the engine's scheduler (its `schedule` and its block
    manager's `match_prefix`, wrapped on this LLM): the engine steps begun and the wall time from add_request to the
    step that first schedules it (`queue`), how many of those steps it waited for its prefix to come up from a lower
    tier (match_prefix None: `copy_wait`), and the steps it is scheduled in up to its first token (`prefill`, chunks
    and time: from the start of its first scheduled step to the step that returns its first token)."""

    def __init__(self, llm: LLM):
        self.steps = 0  # schedule calls so far
        self.step_start = 0.0  # when the current one began
        self.requests: dict[str, dict] = {}
        self._by_seq: dict[int, dict] = {}
        schedule, match = llm.scheduler.schedule, llm.block_manager.match_prefix

        def probed_schedule():
            self.steps += 1
            self.step_start = time.perf_counter()
            plan = schedule()
            for seq, _ in plan.scheduled:
                r = self._by_seq.get(seq.seq_id)
                if r is not None and r["first_token"] is None:
                    if r["admitted_step"] is None:
                        r["admitted_step"], r["admitted"] = self.steps, self.step_start
                    r["chunks"] += 1
            return plan

        def probed_match(seq, *budget):
            hits = match(seq, *budget)
            r = self._by_seq.get(seq.seq_id)
            if hits is None and r is not None and r["admitted_step"] is None:
                r["copy_wait_steps"] += 1
            return hits

        llm.scheduler.schedule, llm.block_manager.match_prefix = probed_schedule, probed_match

    def arrive(self, llm: LLM, request_id: str, now: float) -> None:
        r = {"arrival": now, "arrival_step": self.steps, "admitted_step": None, "admitted": None, "chunks": 0,
             "copy_wait_steps": 0, "first_token": None}
        self.requests[request_id] = r
        for seq in llm.requests[request_id].seqs:
            self._by_seq[seq.seq_id] = r

    def first_token(self, request_id: str, now: float) -> None:
        self.requests[request_id]["first_token"] = now

    def phases(self, request_id: str) -> dict:
        """One request's breakdown (times in seconds)."""
        r = self.requests[request_id]
        return {"queue_steps": r["admitted_step"] - r["arrival_step"] - 1, "queue_s": r["admitted"] - r["arrival"],
                "copy_wait_steps": r["copy_wait_steps"], "prefill_chunks": r["chunks"],
                "prefill_s": r["first_token"] - r["admitted"]}


def converse(llm: LLM, probe: Probe, args, system: list[int], users: list[list[list[int]]]) -> dict:
    """Drive the chats in a closed loop on llm: at most --concurrency in flight, a chat's next turn queued as soon
    as its reply is done. Returns the replies, each turn's TTFT and its breakdown (`probe`, on llm), and the wall
    time."""
    params = SamplingParams(temperature=0, max_tokens=args.reply_tokens, ignore_eos=True)
    history = [list(system) for _ in users]
    turn = [0] * len(users)
    ready = deque(range(len(users)))
    active: dict[str, list] = {}  # request id -> [chat, turn, arrival, first token seen]
    ttft: list[list[float]] = [[] for _ in range(args.turns)]
    phases: list[list[dict]] = [[] for _ in range(args.turns)]
    replies = [[None] * args.turns for _ in users]
    start = time.perf_counter()
    while ready or active:
        while ready and len(active) < args.concurrency:
            c = ready.popleft()
            prompt = history[c] + users[c][turn[c]]
            history[c] = prompt
            rid = llm.add_request(prompt, params)
            active[rid] = [c, turn[c], time.perf_counter(), False]
            probe.arrive(llm, rid, active[rid][2])
        outs = llm.step()
        now = time.perf_counter()
        # in admission order: step() gives a set's order, which string hashing makes differ between processes
        for out in sorted(outs, key=lambda o: int(o.request_id.rpartition("-")[2])):
            c, t, arrival, seen = active[out.request_id]
            if not seen and out.outputs[0].token_ids:
                active[out.request_id][3] = True
                ttft[t].append(now - arrival)
                probe.first_token(out.request_id, now)
                phases[t].append(probe.phases(out.request_id))
            if out.finished:
                del active[out.request_id]
                replies[c][t] = out.outputs[0].token_ids
                history[c] = history[c] + replies[c][t]
                turn[c] += 1
                if turn[c] < args.turns:
                    ready.append(c)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"replies": replies, "ttft": ttft, "phases": phases, "wall_s": time.perf_counter() - start}


def p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.95 * len(values)))]


def quantiles(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "p95_s": p95(values), "n": len(values)}


def breakdown(phases: list[dict]) -> dict:
    """Each phase's median and p95 over requests (Probe.phases), and the share of requests that waited any step
    for a copy back up."""
    out = {}
    for key in phases[0]:
        values = [p[key] for p in phases]
        out[key] = {"median": statistics.median(values), "p95": p95(values), "mean": statistics.fmean(values)}
    out["share_waited_on_copy"] = sum(p["copy_wait_steps"] > 0 for p in phases) / len(phases)
    return out


def run_side(name: str, model: Transformer, args, settings: dict, work: Path) -> tuple[dict, list]:
    kv = {}
    if name != "off":
        kv = {"kv_cpu_gb": args.kv_cpu_gb if name == "tiers" else args.disk_side_cpu_gb,
              "kv_disk": str(work / name), "kv_disk_gb": args.kv_disk_gb}
    llm = LLM(model, **settings, **kv)
    vocab = model.cfg.vocab_size
    probe = Probe(llm)
    converse(llm, probe, argparse.Namespace(**{**vars(args), "conversations": 2, "turns": 2}), *workload(args, vocab, 99))
    before = llm.stats()  # after the warm-up (kernels, graphs): the timed workload's figures are differences
    result = converse(llm, probe, args, *workload(args, vocab, 0))
    after = llm.stats()
    llm.close()
    generated = args.conversations * args.turns * args.reply_tokens
    prompt = sum(args.system_tokens + (t + 1) * args.user_tokens + t * args.reply_tokens
                 for t in range(args.turns)) * args.conversations
    side = {"side": name, "settings": kv, "wall_s": result["wall_s"],
            "ttft_first_turn": quantiles(result["ttft"][0]),
            "ttft_later_turns": quantiles([x for t in result["ttft"][1:] for x in t]),
            "ttft_median_by_turn_s": [statistics.median(t) for t in result["ttft"]],
            "ttft_later_turns_breakdown": breakdown([p for t in result["phases"][1:] for p in t]),
            "prompt_tokens": prompt, "generated_tokens": generated,
            "prefill_tokens_computed": after["prefill_tokens_computed"] - before["prefill_tokens_computed"],
            "throughput_generated_tok_s": generated / result["wall_s"],
            "throughput_total_tok_s": (prompt + generated) / result["wall_s"],
            "preemptions": after["preemptions"] - before["preemptions"]}
    if "kv_tiers" in after:
        side["kv_tiers"] = {tier: {**figures, **{k: figures[k] - before["kv_tiers"][tier][k]
                                                 for k in ("query_tokens", "hit_tokens")}}
                            for tier, figures in after["kv_tiers"].items()}
        for figures in side["kv_tiers"].values():
            figures["hit_rate"] = figures["hit_tokens"] / figures["query_tokens"] if figures["query_tokens"] else 0.0
    return side, result["replies"]


def best(runs: list[dict]) -> dict:
    """A side's figures, each the best of its runs (the lowest times, the highest throughputs); every run kept."""
    out = dict(runs[0])
    for key in ("ttft_first_turn", "ttft_later_turns"):
        out[key] = {q: min(run[key][q] for run in runs) for q in ("median_s", "p95_s")} | {"n": runs[0][key]["n"]}
    for key in ("throughput_generated_tok_s", "throughput_total_tok_s"):
        out[key] = max(run[key] for run in runs)
    out["wall_s"] = min(run["wall_s"] for run in runs)
    # the breakdown of the run with the lowest later-turn median, which it explains
    out["ttft_later_turns_breakdown"] = min(runs, key=lambda run: run["ttft_later_turns"]["median_s"])[
        "ttft_later_turns_breakdown"]
    out["runs"] = runs
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model shape preset (random weights)")
    ap.add_argument("--layers", type=int, default=0, help="override n_layers; 0 keeps the preset's")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8, help="chats in flight at once")
    ap.add_argument("--system-tokens", type=int, default=256)
    ap.add_argument("--user-tokens", type=int, default=32)
    ap.add_argument("--reply-tokens", type=int, default=16)
    ap.add_argument("--gpu-cache-tokens", type=int, default=None,
                    help="the paged (GPU) cache's size in tokens (default: what --concurrency chats at their longest "
                         "need, plus half again)")
    ap.add_argument("--block-size", type=int, default=None, help="default: the engine's (64 on a GPU, 16 elsewhere)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-cpu-gb", type=float, default=1.0, help="the tiers side's CPU tier (GiB)")
    ap.add_argument("--disk-side-cpu-gb", type=float, default=None,
                    help="the disk side's CPU tier (GiB; default: an eighth of what every history takes)")
    ap.add_argument("--kv-disk-gb", type=float, default=16.0)
    ap.add_argument("--sides", nargs="+", default=["off", "tiers", "disk"], choices=["off", "tiers", "disk"])
    ap.add_argument("--repeats", type=int, default=1, help="runs of each side (alternating); the best figure is kept")
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    longest = args.system_tokens + args.turns * (args.user_tokens + args.reply_tokens)
    cfg = ModelConfig.preset(args.preset)
    block_size = args.block_size or (64 if device.type == "cuda" else 16)
    # max_model_len below is longest + block_size: the positions must reach it
    cfg = cfg.replace(n_layers=args.layers or cfg.n_layers, n_mtp_modules=0,
                      max_seq_len=max(cfg.max_seq_len, longest + block_size))
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = Transformer(cfg).eval()
    cache_tokens = args.gpu_cache_tokens or (longest + block_size) * args.concurrency * 3 // 2
    per_token = cfg.cache_bytes_per_token(torch.empty(0, dtype=dtype).element_size())
    histories = (args.system_tokens + args.conversations * (longest - args.system_tokens)) * per_token
    if args.disk_side_cpu_gb is None:
        args.disk_side_cpu_gb = histories / 8 / 2**30
    settings = dict(block_size=block_size, num_blocks=cache_tokens // block_size, max_model_len=longest + block_size,
                    max_num_seqs=args.concurrency, max_num_batched_tokens=args.max_num_batched_tokens,
                    cuda_graphs=args.cuda_graphs)
    results = {"preset": args.preset, "layers": cfg.n_layers, "params": model.num_parameters(), "dtype": args.dtype,
               "machine": machine(device), "commit": commit(), "command": " ".join(sys.argv),
               "workload": {k: getattr(args, k) for k in ("conversations", "turns", "concurrency", "system_tokens",
                                                           "user_tokens", "reply_tokens")},
               "gpu_cache_tokens": settings["num_blocks"] * block_size, "block_size": block_size,
               "history_tokens": histories // per_token, "cache_bytes_per_token": per_token, "sides": {}}
    print(f"{args.preset} ({cfg.n_layers} layers) in {args.dtype} on {device}: {args.conversations} chats x "
          f"{args.turns} turns, {args.concurrency} at once; histories {histories // per_token} tokens "
          f"({histories / 2**30:.3f} GiB), GPU cache {results['gpu_cache_tokens']} tokens", flush=True)
    replies, runs = {}, {name: [] for name in args.sides}
    for r in range(args.repeats):  # the sides alternate, so that a busy machine slows each alike
        for name in args.sides if r % 2 == 0 else args.sides[::-1]:
            with tempfile.TemporaryDirectory() as work:
                side, replies[name] = run_side(name, model, args, settings, Path(work))
            runs[name].append(side)
    for name in args.sides:
        results["sides"][name] = side = best(runs[name])
        later = side["ttft_later_turns"]
        print(f"{name}: TTFT later turns median {later['median_s'] * 1e3:.1f} ms, p95 {later['p95_s'] * 1e3:.1f} "
              f"ms; first turns median {side['ttft_first_turn']['median_s'] * 1e3:.1f} ms; prefill "
              f"{side['prefill_tokens_computed']} of {side['prompt_tokens']} prompt tokens; "
              f"{side['throughput_generated_tok_s']:.0f} generated tok/s; wall {side['wall_s']:.1f} s"
              + (f"; hits {json.dumps({t: f['hit_tokens'] for t, f in side['kv_tiers'].items()})}"
                 if "kv_tiers" in side else ""), flush=True)
        parts = side["ttft_later_turns_breakdown"]
        print(f"{name}: later turns' median queue {parts['queue_steps']['median']} steps "
              f"({parts['queue_s']['median'] * 1e3:.1f} ms), copy-back wait {parts['copy_wait_steps']['median']} steps "
              f"(mean {parts['copy_wait_steps']['mean']:.2f}; {parts['share_waited_on_copy']:.0%} waited), prefill "
              f"{parts['prefill_chunks']['median']} chunks ({parts['prefill_s']['median'] * 1e3:.1f} ms)", flush=True)
    gate = {}
    if "off" in replies:
        for name in replies:
            if name != "off":
                pairs = [(a, b) for ca, cb in zip(replies["off"], replies[name]) for a, b in zip(ca, cb)]
                gate[name] = sum(a == b for a, b in pairs) / len(pairs)
        off = results["sides"]["off"]
        for name, side in results["sides"].items():
            if name != "off":
                side["vs_off"] = {
                    "ttft_later_median_speedup": off["ttft_later_turns"]["median_s"] / side["ttft_later_turns"]["median_s"],
                    "ttft_later_p95_speedup": off["ttft_later_turns"]["p95_s"] / side["ttft_later_turns"]["p95_s"],
                    "prefill_tokens_ratio": side["prefill_tokens_computed"] / off["prefill_tokens_computed"],
                    "throughput_ratio": side["throughput_generated_tok_s"] / off["throughput_generated_tok_s"]}
                print(f"{name} vs off: {json.dumps({k: round(v, 3) for k, v in side['vs_off'].items()})}")
    results["identical_replies_vs_off"] = gate
    print(f"replies identical to the off side's: {gate}")
    failed = dtype == torch.float32 and any(share < 1 for share in gate.values())
    if failed:
        results["sides"] = {}
        print("bench/kv_tiers.py: in fp32 the replies must be identical with tiers on and off; no figure is kept")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
