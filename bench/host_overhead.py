"""The engine's host overhead per decode step at many sequences, split into phases, and rollout throughput.

    python bench/host_overhead.py                                  # CPU: tiny model, 256 and 512 sequences
    python bench/host_overhead.py --device cuda --preset small --cuda-graphs --json out.json
    python bench/host_overhead.py --rollouts --device cuda --preset small --cuda-graphs
    python bench/host_overhead.py --seqs 1 8 --spec-tokens 0 1 --static-steps --temperature 0 --clock cpu

Decode steps. N sequences (random --prompt-len token prompts, greedy or --temperature with a seed each, as GRPO's
rollouts have) run through `LLM.generate` (or `LLM.stream` with --stream). Once all of them decode, --steps loop
iterations are timed, each from one engine step's start to the next (so the outputs generate builds between steps
count too), and each is split into phases by wrapping the engine's methods on this one LLM:

- schedule: `Scheduler.schedule` (admission, block growth);
- inputs: the step's chunks and input tensors (token ids, positions, slots, block tables; a graph's static rows);
- forward: the model's forward and logits (a graph replay where captured): device work, not host time;
- sample: sampling rows and the sampler (its small kernels included on a GPU), the drafts' sampling too;
- verify: speculative verification (`spec_decode.verify`: acceptance, the emitted tokens, their copy back);
- apply: new tokens, stop checks, prefix-cache registration (`_apply`, async scheduling's `_resolve`);
- draft: the MTP drafter's host work (`MTPProposer.propose` and `settle`: catch-up and chain chunks, the drafts'
  bookkeeping), its forward (`mtp_step`'s replay or eager run) counted as forward and its inputs as inputs;
- outputs: RequestOutputs and detokenising (`_output`);
- other: the rest of the step and loop.

Speculative decoding (--spec-tokens K ...): the model gets one MTP module and each K in the list runs with
num_speculative_tokens=K (0: plain decoding, on the same model), so a speculative step's host time stands next to a
plain step's; tokens/step is what a step emits (random weights draft poorly: acceptance near 0, so this times the
host's work per step, not the speed-up). --static-steps runs the captured-step code path on a device without CUDA
graphs (each graph's step reruns eagerly in its place, counted as forward): the host work is the graphs' (static
buffers), not the packed eager step's; with --skip-forward those steps do nothing at all (a GPU's host does not
run the forward either, so its caches stay warm): the figures are then the host's work alone, though the tokens are
meaningless (the logits stay what the capture left, so every step drafts and accepts alike).

Host time = iteration time - forward. On CUDA the forward phase ends with `torch.cuda.synchronize()`, so the GPU's
time (and the launches) fall in it and every other phase is host work: this measures the host's work per step (what
async scheduling can at best hide behind the GPU's), it does not time the overlapped pipeline.

Rollouts (--rollouts): --prompts prompts x --group completions (seeded per prompt, temperature 1, --max-tokens new
tokens each, ignore_eos so that every completion is full length) in one `LLM.generate` call, as GRPO's rollouts run;
tokens/s = generated tokens / wall time, prefill included. The host phases are summed over the whole call too.

The model has random weights; a byte-level BPE trained on the built-in corpus stands in for a checkpoint's tokenizer
(outputs carry text, as GRPO's engine gives them). The corpus offers about 780 ids' worth of merges: with a larger
vocabulary (the small preset's 8192) ids past the tokenizer's decode to nothing, so text is shorter than a real
tokenizer's, though every token is still decoded. --profile prints a cProfile of the
timed steps (its timings then include cProfile's own cost: use it to find hot spots, not for figures).
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from seekforge import LLM, SamplingParams  # noqa: E402
from seekforge.model import ModelConfig, Transformer  # noqa: E402

PHASES = ("schedule", "inputs", "forward", "sample", "verify", "apply", "draft", "outputs")
# (object's attribute on the LLM, or "" for the LLM itself; method; phase). Names absent from an engine version
# are skipped, so the same script times older and newer code alike.
WRAPPED = (
    ("scheduler", "schedule", "schedule"),
    ("", "_chunks", "inputs"),
    ("runner", "prepare", "inputs"),
    ("runner", "_fill_static", "inputs"),
    ("runner", "forward", "forward"),
    ("runner", "logits", "forward"),
    ("runner", "decode_logits", "forward"),
    ("runner", "replay", "forward"),
    ("runner", "forward_mtp", "forward"),
    ("runner", "mtp_logits", "forward"),
    ("runner", "mtp_step", "forward"),
    ("", "_sample", "sample"),
    ("_plain_batches", "get", "sample"),
    ("", "_apply", "apply"),
    ("", "_resolve", "apply"),
    ("", "_output", "outputs"),
    ("proposer", "propose", "draft"),
    ("proposer", "settle", "draft"),
)
# module-level functions the pipelined (async) step calls by name
MODULE_WRAPPED = (("seekforge.engine.async_step", "sample", "sample"),
                  ("seekforge.engine.async_step", "make_batch", "sample"),
                  ("seekforge.engine.step", "verify", "verify"),
                  ("seekforge.engine.spec_decode", "sample", "sample"),
                  ("seekforge.engine.spec_decode", "make_batch", "sample"),
                  ("seekforge.engine.sampler", "make_batch", "sample"))


class PhaseClock:
    """Exclusive time per phase: a phase entered inside another pauses the outer one."""

    def __init__(self, sync_forward: bool, now=time.perf_counter):
        self.sync_forward, self.now = sync_forward, now
        self.stack: list[list] = []  # [phase, time it (re)started]
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.on = False

    def wrap(self, fn, phase: str):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            now = self.now()
            if self.stack:
                outer = self.stack[-1]
                self.totals[outer[0]] += now - outer[1]
            self.stack.append([phase, now])
            try:
                out = fn(*args, **kwargs)
                if phase == "forward" and self.sync_forward:
                    torch.cuda.synchronize()
                return out
            finally:
                now = self.now()
                self.totals[phase] += now - self.stack.pop()[1]
                if self.stack:
                    self.stack[-1][1] = now

        return timed

    def take(self) -> dict[str, float]:
        out, self.totals = self.totals, dict.fromkeys(PHASES, 0.0)
        return out


def instrument(llm: LLM, clock: PhaseClock) -> None:
    """Wrap one LLM's methods (`instrument_modules` once for the module-level functions)."""
    for owner, name, phase in WRAPPED:
        obj = getattr(llm, owner, None) if owner else llm
        fn = getattr(obj, name, None)
        if fn is not None:
            setattr(obj, name, clock.wrap(fn, phase))


def instrument_modules(clock: PhaseClock) -> None:
    import importlib

    for module, name, phase in MODULE_WRAPPED:
        mod = importlib.import_module(module)
        fn = getattr(mod, name, None)
        if fn is not None:
            setattr(mod, name, clock.wrap(fn, phase))


class StepTimer:
    """Times loop iterations (engine step start to the next step's start) while `measuring()` holds, with phases."""

    def __init__(self, llm: LLM, clock: PhaseClock, measuring, first: int, count: int):
        self.llm, self.clock, self.measuring = llm, clock, measuring
        self.first, self.count = first, count
        self.seen = 0  # decode iterations seen
        self.started: float | None = None
        self.iterations: list[dict[str, float]] = []
        self.profiler: cProfile.Profile | None = None
        step = llm._step

        def timed_step():
            now = self.clock.now()
            if self.started is not None:
                if self.profiler is not None:
                    self.profiler.disable()
                phases = self.clock.take()
                phases["total"] = now - self.started
                self.iterations.append(phases)
                self.started = None
                self.clock.on = False
            if self.measuring() and len(self.iterations) < self.count:
                self.seen += 1
                if self.seen > self.first:
                    self.clock.take()
                    self.clock.on = True
                    if self.profiler is not None:
                        self.profiler.enable()
                    self.started = self.clock.now()
            return step()

        llm._step = timed_step


def summarise(iterations: list[dict[str, float]]) -> dict:
    """Median ms per iteration of each phase, of the total and of host time (total - forward); mean host time too."""
    host = [it["total"] - it["forward"] for it in iterations]
    out = {"steps": len(iterations), "host_ms": 1e3 * statistics.median(host), "host_ms_mean": 1e3 * statistics.mean(host),
           "step_ms": 1e3 * statistics.median(it["total"] for it in iterations)}
    for phase in PHASES:
        out[f"{phase}_ms"] = 1e3 * statistics.median(it[phase] for it in iterations)
    out["other_ms"] = 1e3 * statistics.median(it["total"] - sum(it[p] for p in PHASES) for it in iterations)
    return out


def build(args) -> Transformer:
    """The random-weight model (one MTP module where a speculative run asks for drafts)."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    overrides = dict(n_mtp_modules=int(max(args.spec_tokens) > 0), init_std=0.05,
                     max_seq_len=args.prompt_len + args.max_len_room)
    if args.layers:
        overrides["n_layers"] = args.layers
    cfg = ModelConfig.preset(args.preset).replace(**overrides)
    return Transformer(cfg).to(device=device, dtype=dtype).eval()


def engine(args, model: Transformer, tokenizer, spec_tokens: int) -> LLM:
    """An LLM over the model with `spec_tokens` MTP drafts a step (0: plain decoding)."""
    settings = dict(max_num_seqs=args.max_num_seqs or max(args.seqs), max_num_batched_tokens=args.batched_tokens,
                    cuda_graphs=args.cuda_graphs, compile=args.compile)
    if spec_tokens:
        settings["num_speculative_tokens"] = spec_tokens
    if args.async_scheduling is not None:
        settings["async_scheduling"] = args.async_scheduling == "on"
    if args.num_blocks:
        settings["num_blocks"] = args.num_blocks
    llm = LLM(model, tokenizer=tokenizer, **settings)
    if args.static_steps and not llm.runner.graphs:
        with torch.inference_mode():
            llm.runner.capture_cuda_graphs(llm.config.max_num_seqs, eager=True)
        if args.skip_forward:  # a replay leaves the outputs as they are: the host's work alone, at warm caches
            for graph, _ in itertools.chain(llm.runner.graphs.values(), llm.runner.mtp_graphs.values()):
                graph.replay = lambda: None
    return llm


def corpus_tokenizer(vocab_size: int):
    from seekforge.data.corpus import generate_documents
    from seekforge.tokenizer import Tokenizer

    return Tokenizer.train(generate_documents(400), vocab_size)


def prompts_of(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n, length), generator=g).tolist()


def decode_run(llm: LLM, clock: PhaseClock, args, n: int, profile: bool) -> dict:
    """Host time per decode step with n sequences decoding."""
    sched = llm.scheduler

    def all_decoding() -> bool:
        return (len(sched.running) == n and not sched.waiting
                and all(s.num_computed >= s.num_prompt_tokens for s in sched.running))

    timer = StepTimer(llm, clock, all_decoding, args.warmup, args.steps)
    if profile:
        timer.profiler = cProfile.Profile()
    # the first sequences decode while the last ones still prefill: room for those steps too
    room = (args.warmup + args.steps + 4) * (1 + max(args.spec_tokens)) + -(-n * args.prompt_len // args.batched_tokens)
    params = [SamplingParams(temperature=args.temperature, max_tokens=room, ignore_eos=True,
                             seed=None if args.temperature == 0 else 1000 + i) for i in range(n)]
    prompts = prompts_of(n, args.prompt_len, llm.cfg.vocab_size)
    start = time.perf_counter()
    if args.stream:
        for _ in llm.stream(prompts, params):
            pass
    else:
        llm.generate(prompts, params)
    wall = time.perf_counter() - start
    del llm._step  # the class's step again
    if len(timer.iterations) < args.steps:
        raise RuntimeError(f"only {len(timer.iterations)} decode steps timed at {n} sequences ({timer.seen} seen; cache too small?)")
    out = summarise(timer.iterations)
    out["seqs"], out["wall_s"] = n, wall
    if llm.proposer is not None:
        spec = llm.proposer.stats
        out["acceptance_rate"], out["tokens_per_step"] = spec.acceptance_rate, spec.mean_tokens_per_step
    if profile:
        stats = pstats.Stats(timer.profiler)
        stats.sort_stats("tottime").print_stats(args.profile_lines)
    return out


def rollout_run(llm: LLM, clock: PhaseClock, args) -> dict:
    """GRPO-style rollouts: tokens/s of one generate call, and the host phases summed over it."""
    prompts = prompts_of(args.prompts, args.prompt_len, llm.cfg.vocab_size, seed=1)
    params = [SamplingParams(n=args.group, temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True,
                             seed=7919 * i + 1) for i in range(args.prompts)]
    llm.reset_prefix_cache()
    steps = [0]
    step = llm._step

    def counted():
        steps[0] += 1
        return step()

    llm._step = counted
    clock.take()
    clock.on = True
    start, clocked = time.perf_counter(), clock.now()
    outs = llm.generate(prompts, params)
    if llm.device.type == "cuda":
        torch.cuda.synchronize()
    wall, clocked = time.perf_counter() - start, clock.now() - clocked
    clock.on = False
    del llm._step
    phases = clock.take()
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    out = {"sequences": args.prompts * args.group, "max_tokens": args.max_tokens, "tokens": tokens, "wall_s": wall,
           "tokens_per_s": tokens / wall, "engine_steps": steps[0],
           "host_ms_per_step": 1e3 * (clocked - phases["forward"]) / steps[0]}
    out.update({f"{p}_ms_per_step": 1e3 * phases[p] / steps[0] for p in PHASES})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model shape preset (random weights)")
    ap.add_argument("--layers", type=int, default=0, help="override n_layers (0: the preset's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 elsewhere")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (tiny models are op-bound)")
    ap.add_argument("--seqs", type=int, nargs="+", default=[256, 512], help="sequences decoding together")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3, help="decode steps before timing starts")
    ap.add_argument("--steps", type=int, default=20, help="decode steps timed")
    ap.add_argument("--temperature", type=float, default=1.0, help="0: greedy; otherwise seeded sampling")
    ap.add_argument("--stream", action="store_true", help="drive LLM.stream (text deltas every step)")
    ap.add_argument("--rollouts", action="store_true", help="time GRPO-style rollouts instead of decode steps")
    ap.add_argument("--prompts", type=int, default=32, help="rollouts: prompts")
    ap.add_argument("--group", type=int, default=16, help="rollouts: completions per prompt")
    ap.add_argument("--max-tokens", type=int, default=256, help="rollouts: new tokens per completion")
    ap.add_argument("--max-num-seqs", type=int, default=0, help="engine max_num_seqs (0: the most sequences run)")
    ap.add_argument("--batched-tokens", type=int, default=4096, help="engine max_num_batched_tokens")
    ap.add_argument("--num-blocks", type=int, default=0, help="engine num_blocks (0: the engine's default)")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay decode steps from CUDA graphs")
    ap.add_argument("--static-steps", action="store_true",
                    help="without CUDA graphs (the CPU): run the captured steps' code path, each graph's step rerun "
                         "eagerly in its place")
    ap.add_argument("--skip-forward", action="store_true",
                    help="with --static-steps: replays do nothing (the outputs keep what the capture wrote), so the "
                         "host's work is timed alone, its caches not flushed by a CPU forward; tokens are then "
                         "meaningless")
    ap.add_argument("--spec-tokens", type=int, nargs="+", default=[0],
                    help="MTP drafts a step, one run each (0: plain decoding); the model gets an MTP module if any > 0")
    ap.add_argument("--compile", action="store_true", help="torch.compile the blocks")
    ap.add_argument("--async-scheduling", choices=("on", "off"), default=None,
                    help="default: the engine's (on for CUDA)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time steps by the wall clock, or by this thread's CPU time (steadier on a busy CPU host, "
                         "where the process waits for a core; no use on a GPU, where the host waits for the device)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the timed decode steps")
    ap.add_argument("--profile-lines", type=int, default=30)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    args.max_len_room = (max(args.max_tokens, (args.warmup + args.steps + 8) * (1 + max(args.spec_tokens))) + 8
                         + max(args.seqs) * args.prompt_len // args.batched_tokens)
    if args.rollouts:
        args.seqs = [args.prompts * args.group]
    model = build(args)
    tokenizer = corpus_tokenizer(model.cfg.vocab_size)
    clock = PhaseClock(sync_forward=model.embed.weight.is_cuda,
                       now=time.thread_time if args.clock == "cpu" else time.perf_counter)
    instrument_modules(clock)
    results = {"device": str(model.embed.weight.device), "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
               "threads": torch.get_num_threads(), "preset": args.preset, "layers": model.cfg.n_layers,
               "params": model.num_parameters(), "prompt_len": args.prompt_len, "temperature": args.temperature,
               "cuda_graphs": args.cuda_graphs, "static_steps": args.static_steps, "compile": args.compile,
               "stream": args.stream, "clock": args.clock}
    if model.embed.weight.is_cuda:
        results["card"] = torch.cuda.get_device_name(model.embed.weight.device)
        results["torch"] = torch.__version__
    if args.rollouts:
        llm = engine(args, model, tokenizer, args.spec_tokens[0])
        instrument(llm, clock)
        results["async_scheduling"] = llm.async_scheduling
        results["rollouts"] = r = rollout_run(llm, clock, args)
        print(f"rollouts {r['sequences']} x {r['max_tokens']}: {r['tokens_per_s']:,.0f} tok/s "
              f"({r['wall_s']:.1f} s, {r['engine_steps']} steps, host {r['host_ms_per_step']:.2f} ms/step: "
              + ", ".join(f"{p} {r[f'{p}_ms_per_step']:.2f}" for p in PHASES) + ")")
    else:
        results["decode"] = []
        for k in args.spec_tokens:
            llm = engine(args, model, tokenizer, k)
            instrument(llm, clock)
            results["async_scheduling"] = llm.async_scheduling
            for n in args.seqs:
                r = decode_run(llm, clock, args, n, args.profile)
                r["spec_tokens"] = k
                results["decode"].append(r)
                parts = ", ".join(f"{p} {r[f'{p}_ms']:.3f}" for p in (*PHASES, "other"))
                spec = (f" [{k} drafts: acceptance {r['acceptance_rate'][0]:.2f}, {r['tokens_per_step']:.2f} tokens/step]"
                        if k else "")
                print(f"{n} sequences{spec}: host {r['host_ms']:.3f} ms/step of {r['step_ms']:.3f} ({parts})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
