"""Every GPU figure of the performance issue in one command, as one JSON file.

    python bench/gpu.py --out docs/benchmarks/gpu-h200.json [--quick]

Runs, each side by side with its peer and with the machine's ceilings measured in the same run:
training forward+backward at the 16b shape (bench/train.py, compiled, vs transformers), the engine's
decode at batch 1 and 64 and prefill 1 x 4096 at the 16b shape (bench/engine.py vs transformers'
generate), and MLA decode attention alone (bench/mla_decode.py). The batch-1 decode roofline is
(active weight bytes + cache bytes read per step) / measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def run(script: str, args: list[str], out: Path, timeout: int) -> dict:
    cmd = [sys.executable, str(HERE / script), *args, "--json", str(out)]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, timeout=timeout, text=True, capture_output=True)
    print(proc.stdout[-4000:], proc.stderr[-2000:] if proc.returncode else "", flush=True)
    if proc.returncode or not out.is_file():
        return {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-2000:], "command": " ".join(cmd)}
    result = json.loads(out.read_text())
    result["command"] = " ".join(cmd[1:])
    return result


def decode_roofline(copy_bytes_per_s: float, prompt: int, new: int) -> dict:
    """Tokens/s at batch 1 if every step only read the active weights and the cache once."""
    from seekforge.model.config import ModelConfig
    from seekforge.train.flops import active_matmul_params

    cfg = ModelConfig.preset("16b")
    weight_bytes = active_matmul_params(cfg) * 2  # bf16; the head is read, the embedding row is negligible
    mean_context = prompt + new / 2
    cache_bytes = cfg.cache_bytes_per_token(2) * mean_context
    # the copy figure counts bytes read + written, and matches read-only streaming on this GPU (REFERENCE.md)
    step_s = (weight_bytes + cache_bytes) / copy_bytes_per_s
    return {"active_weight_bytes": weight_bytes, "cache_bytes_per_step": cache_bytes, "tokens_per_s": 1 / step_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench/gpu.py measures a CUDA GPU"
    tmp = Path(tempfile.mkdtemp())
    repeats = "1" if args.quick else "3"
    results = {
        "train": run("train.py", ["--config", "16b", "--batch", "2", "--seq", "4096", "--iters", "5", "--compile"],
                     tmp / "train.json", 900),
        "mla_decode": run("mla_decode.py", [], tmp / "mla.json", 600),
        "engine": run("engine.py", ["--device", "cuda", "--dtype", "bfloat16", "--preset", "16b", "--layers", "27",
                                    "--batches", "1", "64", "--new-tokens", "128", "--prompt-len", "128",
                                    "--prefill-len", "4096", "--repeats", repeats, "--mtp-steps", "0",
                                    "--cuda-graphs"], tmp / "engine.json", 1500),
    }
    copy = results["train"].get("ceilings", {}).get("copy_bytes_per_s")
    if copy:
        results["decode_roofline_batch1"] = decode_roofline(copy, 128, 128)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v.get("error", "ok") if isinstance(v, dict) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
