"""The GPU figures of docs/BENCHMARKS.md in one command, as one JSON file.

    python bench/gpu.py --out docs/benchmarks/gpu-h200.json [--quick] [--parts engine train mla_decode moe mtp
                                                                           fp8_engine fp8_train fp8_experts kv_tiers]

Runs, each side by side with its peer and with the machine's ceilings measured in the same run:
training forward+backward at the 16b shape (bench/train.py, compiled, vs transformers), the engine's
decode at batch 1 and 64 and prefill 1 x 4096 at the 16b shape (bench/engine.py, CUDA graphs and the
compiled decode step, vs transformers' generate; its batch-1 roofline is (active weight bytes + cache
bytes read per step) / measured copy bandwidth), MLA decode attention alone (bench/mla_decode.py), the
fused MoE kernels alone (bench/moe.py), and MTP speculative decoding at batch 1 and 8 (bench/engine.py's MTP
part: a tiny model trained with MTP for 300 steps on the built-in corpus, MTP with CUDA graphs and compile
against plain decoding with both, speedup and acceptance per draft position, greedy outputs gated equal), and FP8
(bench/fp8.py: the engine on FP8 weights against bf16 at the 16b shape cut to 14 layers, training forward+backward
with fp8=blockwise against bf16 at the 16b shape, and its routed experts' GEMMs and quantisation kernels alone,
each gated against its reference), and the KV tiers' later-turn TTFT on multi-turn chats with long histories at
the 16b shape (bench/kv_tiers.py, tiers against the GPU prefix cache alone, outputs gated equal). The engine's
parts first check its bf16 logits against transformers' in fp32 (bench/engine.py's "logit_parity"); a part
that fails its check or its run is recorded with an "error", and the command exits non-zero.
Each part takes several minutes (the two 16b models load once per part); --parts runs some of them and
merges their results into an existing --out file, so the parts can run as separate commands.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PARTS = ["train", "mla_decode", "moe", "engine", "mtp", "fp8_engine", "fp8_train", "fp8_experts", "kv_tiers"]


def run(script: str, args: list[str], out: Path, timeout: int) -> dict:
    cmd = [sys.executable, str(HERE / script), *args, "--json", str(out)]
    print("$", " ".join(cmd), flush=True)
    # the scripts import seekforge from this checkout whether or not it is pip-installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, timeout=timeout, text=True, capture_output=True, env=env)
    print(proc.stdout[-4000:], proc.stderr[-2000:] if proc.returncode else "", flush=True)
    result = json.loads(out.read_text()) if out.is_file() else {}  # a failed check still writes its numbers
    if proc.returncode or not result:
        result.update({"error": f"exit {proc.returncode}", "stderr": proc.stderr[-2000:]})
    result["command"] = " ".join(cmd[1:])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench/gpu.py measures a CUDA GPU"
    tmp = Path(tempfile.mkdtemp())
    repeats = "1" if args.quick else "3"
    parts = {
        "train": lambda: run("train.py", ["--config", "16b", "--batch", "2", "--seq", "4096", "--iters", "5",
                                          "--compile"], tmp / "train.json", 900),
        "mla_decode": lambda: run("mla_decode.py", [], tmp / "mla.json", 600),
        "moe": lambda: run("moe.py", [], tmp / "moe.json", 600),
        "engine": lambda: run("engine.py", ["--device", "cuda", "--dtype", "bfloat16", "--preset", "16b", "--layers",
                                            "27", "--batches", "1", "64", "--new-tokens", "128", "--prompt-len", "128",
                                            "--prefill-len", "4096", "--repeats", repeats, "--mtp-steps", "0",
                                            "--cuda-graphs", "--compile", "--no-rollout"], tmp / "engine.json", 1500),
        # FP8: the engine on FP8 weights against bf16 (14 layers: three 16b models of 27 do not fit 80 GB), and
        # training forward+backward, fp8=blockwise against bf16, both compiled
        "fp8_engine": lambda: run("fp8.py", ["engine", "--config", "16b", "--layers", "14", "--device", "cuda",
                                             "--batch", "64", "--prompt-len", "128", "--new-tokens", "64",
                                             "--prefill-len", "2048", "--gate-tokens", "32", "--iters", repeats,
                                             "--kv-cache-gib", "4"], tmp / "fp8_engine.json", 900),
        "fp8_train": lambda: run("fp8.py", ["speed", "--config", "16b", "--batch", "2", "--seq", "4096", "--device",
                                            "cuda", "--iters", "8" if repeats == "3" else "4"],
                                 tmp / "fp8_train.json", 900),
        "fp8_experts": lambda: run("fp8.py", ["experts", "--config", "16b", "--tokens", "8192", "--iters",
                                              "10" if repeats == "3" else "5"], tmp / "fp8_experts.json", 600),
        "kv_tiers": lambda: run("kv_tiers.py", ["--device", "cuda", "--dtype", "bfloat16", "--preset", "16b",
                                                "--layers", "0", "--cuda-graphs", "--conversations", "16", "--turns",
                                                "8", "--concurrency", "2", "--system-tokens", "1024", "--user-tokens",
                                                "512", "--reply-tokens", "32", "--gpu-cache-tokens", "16384",
                                                "--kv-cpu-gb", "16", "--sides", "off", "tiers", "--repeats",
                                                "1" if repeats == "1" else "2"], tmp / "kv_tiers.json", 900),
        "mtp": lambda: run("engine.py", ["--mtp-only", "--device", "cuda", "--dtype", "bfloat16", "--cuda-graphs",
                                         "--compile", "--mtp-batches", "1", "8", "--mtp-text", "builtin",
                                         "--mtp-steps", "300", "--repeats", repeats], tmp / "mtp.json", 900),
    }
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name in args.parts:
        results[name] = parts[name]()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    status = {k: v.get("error", "ok") if isinstance(v, dict) else v for k, v in results.items()}
    print(json.dumps(status))
    if any(state != "ok" for name, state in status.items() if name in args.parts):
        sys.exit("bench/gpu.py: a part failed (its check or its run): see its entry in " + str(out))


if __name__ == "__main__":
    main()
