"""Structured output's cost per engine step: a decode batch with no constrained sequence, with one of them
under a JSON-Schema grammar, and with all of them, on the same random-weight model.

    python bench/structured_output.py                                  # CPU: tiny preset, batch 8
    python bench/structured_output.py --device cuda --preset small --batch 64 --json out.json

Each scenario runs --batch sequences of the same prompt to --steps decode steps (ignore_eos; the grammar,
an array of at least --steps one-digit integers, cannot end earlier), and times every decode step after the
prefill. The grammar's work is on the host per constrained row (xgrammar fills the row's token bitmask,
then the row is masked on the device); the unconstrained rows of the batch are sampled exactly as without
it. Correctness: each constrained output must be a prefix of JSON the schema admits (checked token by token
by a fresh matcher), and the unconstrained sequences of the mixed batch must equal those of the plain one
(same seeds). Prints and optionally writes JSON: mean and median step time per scenario and the overheads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ceilings import machine  # noqa: E402

import seekforge  # noqa: E402
from seekforge.data.corpus import generate_documents  # noqa: E402
from seekforge.engine import LLM, SamplingParams  # noqa: E402
from seekforge.engine.grammar import Grammars  # noqa: E402
from seekforge.tokenizer import Tokenizer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = Tokenizer.train(generate_documents(2000), vocab_size=1024)
    torch.manual_seed(0)
    cfg = seekforge.ModelConfig.preset(args.preset).replace(vocab_size=tok.vocab_size)
    model = seekforge.Transformer(cfg).to(args.device).eval()
    llm = LLM(model, tokenizer=tok, max_num_seqs=args.batch, async_scheduling=False)
    grammars = Grammars(tok, cfg.vocab_size, llm.eos_ids)
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": args.steps}
    start = time.perf_counter()
    grammar = grammars.json_schema(schema)
    compile_s = time.perf_counter() - start
    prompt = tok.encode_prompt("Write the digits: ")

    def params(constrained: int) -> list[SamplingParams]:
        return [SamplingParams(temperature=1.0, seed=i, max_tokens=args.steps, ignore_eos=True,
                               constraint=grammar if i < constrained else None) for i in range(args.batch)]

    scenarios = {"none": 0, "one": 1, "all": args.batch}
    results, outputs = {}, {}
    for name, k in scenarios.items():
        times = []
        for _ in range(args.repeats):
            ids = [llm.add_request(prompt, p) for p in params(k)]
            llm.step()  # the prefill
            while llm.has_unfinished_requests():
                t0 = time.perf_counter()
                for out in llm.step():
                    if out.finished:
                        outputs.setdefault(name, {})[out.request_id] = out.outputs[0].token_ids
                if llm.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        outputs[name] = [outputs[name][rid] for rid in ids]  # the last repeat's, in seed order
        results[name] = {"constrained": k, "mean_step_ms": 1e3 * statistics.mean(times),
                         "median_step_ms": 1e3 * statistics.median(times), "steps": len(times)}
    # correctness: grammar-valid constrained outputs; unconstrained rows unchanged by constrained neighbours
    for name, k in scenarios.items():
        for ids in outputs[name][:k]:
            matcher = grammar.start().matcher
            assert all(matcher.accept_token(t) for t in ids), f"{name}: an output the grammar rejects"
    assert outputs["one"][1:] == outputs["none"][1:], "unconstrained rows changed beside a constrained one"
    base = results["none"]["median_step_ms"]
    report = {"bench": "structured_output", "preset": args.preset, "device": args.device, "batch": args.batch,
              "vocab": cfg.vocab_size, "steps": args.steps, "repeats": args.repeats, "grammar_compile_s": compile_s,
              "scenarios": results,
              "overhead_one_constrained_ms": results["one"]["median_step_ms"] - base,
              "overhead_all_constrained_ms": results["all"]["median_step_ms"] - base,
              "overhead_per_constrained_row_ms": (results["all"]["median_step_ms"] - base) / args.batch,
              "torch": torch.__version__, "machine": machine(torch.device(args.device))}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
