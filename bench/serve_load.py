"""Serving under load: many concurrent streaming clients against `seekforge serve`, and the same checkpoint
behind `transformers serve --continuous-batching`, one after the other in one run, on loopback.

    python bench/serve_load.py                                    # CPU: tiny preset, 64 clients (a smoke run)
    python bench/serve_load.py --device cuda --dtype bfloat16 --preset small --vocab 8192 --requests 256 \\
        --prompt-tokens 256 --max-tokens 128 --cuda-graphs --json docs/benchmarks/serve-small-h200.json

Unless --model names a checkpoint, a random-weight model of --preset is built with a tokenizer trained on
the built-in math corpus, whose documents (cut to --prompt-tokens) are the prompts: every request has its
own prompt. Each of --clients asyncio tasks sends requests back to back until --requests are done, each a
streamed /v1/completions of --max-tokens greedy tokens (ignore_eos, so every request generates exactly
that many). Measured at the client: time to first token (request sent -> first token), time per output
token after the first, end-to-end latency, and output tokens/s over the whole run.

Correctness (seekforge): every request must answer 200, end with `data: [DONE]` once, report exactly
--max-tokens completion tokens in its usage and finish with "length"; a second, untimed pass at the same
concurrency asks for the token ids of every chunk and checks that each stream carries each of its
tokens exactly once (count, and decoded ids == streamed text); the server's own token counter must
agree with the clients'. Any failure exits non-zero. transformers is measured the same way and its
counts reported (it has no ignore_eos: an early EOS shortens a request, and the throughput counts the
tokens it really sent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Result:
    status: int
    ttft: float | None = None
    latency: float | None = None
    tokens: int = 0  # completion tokens (usage when reported, else content chunks)
    chunk_times: list[float] = field(default_factory=list)
    done_markers: int = 0
    finish: str | None = None
    text: str = ""
    ids: list[int] = field(default_factory=list)
    error: str | None = None
    response_id: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.tokens < 2 or self.ttft is None:
            return None
        return (self.latency - self.ttft) / (self.tokens - 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_checkpoint(path: Path, preset: str, vocab: int) -> None:
    import torch

    import seekforge
    from seekforge.data.corpus import generate_documents
    from seekforge.tokenizer import Tokenizer

    tok = Tokenizer.train(generate_documents(4000, seed=1), vocab_size=vocab)
    torch.manual_seed(0)
    cfg = seekforge.ModelConfig.preset(preset).replace(vocab_size=tok.vocab_size)
    seekforge.Transformer(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def make_prompts(path: Path, n: int, length: int) -> list[str]:
    from seekforge.data.corpus import generate_documents
    from seekforge.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(path)
    prompts, docs, i = [], generate_documents(4 * n + 64, seed=2), 0
    while len(prompts) < n:
        ids: list[int] = []
        while len(ids) < length:  # long enough: join documents
            ids += tok.encode(docs[i % len(docs)] + "\n")
            i += 1
        prompts.append(tok.decode(ids[:length]))
    return prompts


class ServerProcess:
    def __init__(self, name: str, cmd: list[str], url: str, log: Path, env: dict | None = None):
        self.name, self.url, self.log_path = name, url, log
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, health: str, timeout: float = 900) -> float:
        start = time.time()
        while time.time() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_path.read_text()[-3000:])
            try:
                if httpx.get(self.url + health, timeout=60).status_code == 200:
                    return time.time() - start
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            res = Result(r.status_code)
            if r.status_code != 200:
                res.error = (await r.aread()).decode()[:300]
                return res
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                now = time.perf_counter()
                if data == "[DONE]":
                    res.done_markers += 1
                    continue
                if res.done_markers:
                    res.error = "data after [DONE]"
                event = json.loads(data)
                if "error" in event:
                    res.error = str(event["error"])
                    continue
                res.response_id = event.get("id")
                if event.get("usage"):
                    res.tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    text = choice.get("text") or ""
                    lp = choice.get("logprobs")
                    if lp and lp.get("tokens"):
                        res.ids += [int(t.split(":", 1)[1]) for t in lp["tokens"]]
                    if text or lp:
                        chunks += 1
                        res.text += text
                        if res.ttft is None:
                            res.ttft = now - t0
                    res.finish = choice.get("finish_reason") or res.finish
            res.latency = time.perf_counter() - t0
            if not res.tokens:
                res.tokens = chunks
            return res
    except httpx.HTTPError as err:
        return Result(0, error=f"{type(err).__name__}: {err}")


async def run_load(url: str, model: str, prompts: list[str], clients: int, max_tokens: int,
                   extra: dict) -> tuple[list[Result], float]:
    queue: asyncio.Queue = asyncio.Queue()
    for i, p in enumerate(prompts):
        queue.put_nowait((i, p))
    results: list[Result | None] = [None] * len(prompts)
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        async def worker():
            while not queue.empty():
                i, prompt = queue.get_nowait()
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                        "stream": True, **extra}
                results[i] = await one_request(client, url, body)

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t
    return results, wall


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarise(name: str, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.status == 200 and r.error is None and r.ttft is not None]
    ttft = [r.ttft for r in ok]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    lat = [r.latency for r in ok]
    tokens = sum(r.tokens for r in ok)
    out = {"server": name, "requests": len(results), "ok": len(ok), "wall_s": wall, "output_tokens": tokens,
           "output_tok_per_s": tokens / wall, "requests_per_s": len(ok) / wall}
    for key, vals in (("ttft_s", ttft), ("tpot_s", tpot), ("latency_s", lat)):
        if vals:
            out[key] = {"mean": statistics.fmean(vals), "p50": pct(vals, 50), "p90": pct(vals, 90),
                        "p99": pct(vals, 99)}
    errors = [r.error or f"status {r.status}" for r in results if r not in ok]
    if errors:
        out["errors"] = errors[:5]
    return out


def check_seekforge(results: list[Result], max_tokens: int, with_ids: bool, tok) -> list[str]:
    problems = []
    ids = [r.response_id for r in results]
    if len(set(ids)) != len(ids):
        problems.append("duplicate response ids across requests")
    for i, r in enumerate(results):
        where = f"request {i}"
        if r.status != 200 or r.error:
            problems.append(f"{where}: status {r.status} {r.error}")
            continue
        if r.done_markers != 1:
            problems.append(f"{where}: {r.done_markers} [DONE] markers")
        if r.finish != "length":
            problems.append(f"{where}: finish_reason {r.finish}")
        if r.tokens != max_tokens:
            problems.append(f"{where}: usage says {r.tokens} tokens, asked {max_tokens}")
        if with_ids:
            if len(r.ids) != max_tokens:
                problems.append(f"{where}: {len(r.ids)} token ids streamed, expected {max_tokens}")
            elif tok.decode(r.ids, skip_special_tokens=True) != r.text:
                problems.append(f"{where}: streamed text differs from its streamed tokens")
    return problems


def metric(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: a random --preset model)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer size for a built checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine batch bound (default: --clients)")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--speculative-tokens", type=int, default=0)
    p.add_argument("--cuda-graphs", action="store_true", help="also run seekforge with CUDA graph decoding")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers serve comparison")
    p.add_argument("--transformers-requests", type=int, default=64,
                   help="requests for transformers (it may serve one at a time; default 64)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.clients < 64:
        print(f"note: {args.clients} clients (the acceptance load is 64 or more)", file=sys.stderr)

    import torch

    from seekforge.tokenizer import Tokenizer

    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    try:
        path = Path(args.model) if args.model else work / "model"
        if not args.model:
            t = time.time()
            build_checkpoint(path, args.preset, args.vocab)
            print(f"built a random {args.preset} checkpoint in {time.time() - t:.1f} s", file=sys.stderr)
        tok = Tokenizer.from_pretrained(path)
        prompts = make_prompts(path, args.requests, args.prompt_tokens)
        report = {"config": vars(args), "torch": torch.__version__,
                  "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                  "runs": []}
        failures: list[str] = []

        # ------------------------------------------------------------------ seekforge
        for graphs in (False, True) if args.cuda_graphs else (False,):
            try:
                summary, problems = _run_seekforge(path, prompts, args, work, tok, graphs)
            except RuntimeError as err:
                summary = {"server": f"seekforge{' --cuda-graphs' * graphs}", "ok": 0, "errors": [str(err)[-2000:]]}
                problems = summary["errors"]
            report["runs"].append(summary)
            failures += problems
            _save(report, args.json)

        # ------------------------------------------------------------------ transformers
        if not args.no_transformers:
            exe = shutil.which("transformers")
            if exe is None:
                report["transformers_skipped"] = "no `transformers` command (pip install 'transformers[serving]')"
            else:
                # continuous batching first; its paged cache may not take the model (MLA's keys and values
                # differ in width), then one generate() per request, transformers serve's other mode
                for mode in ("--continuous-batching", "--no-continuous-batching"):
                    summary = _run_transformers(exe, mode, path, prompts[:args.transformers_requests], args, work)
                    if summary.get("ok"):
                        report["runs"].append(summary)
                        break
                    report.setdefault("transformers_attempts", []).append(summary)
                    _save(report, args.json)

        report["failures"] = failures
        print(json.dumps(report, indent=2))
        _save(report, args.json)
        _table(report)
        if failures:
            print(f"FAILED: {len(failures)} problem(s), first: {failures[:5]}", file=sys.stderr)
            return 1
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_seekforge(path: Path, prompts: list[str], args, work: Path, tok, graphs: bool) -> tuple[dict, list[str]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "seekforge.cli", "serve", str(path), "--port", str(port), "--device", args.device,
           "--dtype", args.dtype, "--served-model-name", "m", "--max-num-seqs", str(args.max_num_seqs or args.clients),
           "--max-model-len", str(args.max_model_len), "--max-waiting", str(max(1024, args.requests)),
           "--speculative-tokens", str(args.speculative_tokens), "--log-level", "warning"] + ["--cuda-graphs"] * graphs
    name = "seekforge" + " --cuda-graphs" * graphs
    server = ServerProcess(name, cmd, url, work / f"{name.replace(' ', '')}.log")
    failures = []
    try:
        ready = server.wait_ready("/health")
        asyncio.run(run_load(url, "m", prompts[:4], 4, 8, {"ignore_eos": True}))  # warm-up
        before = metric(url, "seekforge_generation_tokens_total")
        results, wall = asyncio.run(run_load(url, "m", prompts, args.clients, args.max_tokens,
                                             {"ignore_eos": True, "stream_options": {"include_usage": True}}))
        served = metric(url, "seekforge_generation_tokens_total") - before
        summary = summarise(name, results, wall)
        summary["startup_s"] = ready
        failures += check_seekforge(results, args.max_tokens, False, tok)
        if served != args.requests * args.max_tokens:
            failures.append(f"{name}: server counted {served} generated tokens, clients asked "
                            f"{args.requests * args.max_tokens}")
        # untimed: every chunk names its token ids, each must arrive exactly once
        checked, _ = asyncio.run(run_load(url, "m", prompts, args.clients, args.max_tokens, {
            "ignore_eos": True, "stream_options": {"include_usage": True}, "logprobs": 0,
            "return_tokens_as_token_ids": True}))
        failures += check_seekforge(checked, args.max_tokens, True, tok)
        summary["validated_requests"] = len(results) + len(checked)
        return summary, failures
    finally:
        server.stop()


def _run_transformers(exe: str, mode: str, path: Path, prompts: list[str], args, work: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [exe, "serve", str(path.resolve()), "--host", "127.0.0.1", "--port", str(port), mode,
           "--device", args.device, "--dtype", _hf_dtype(args.dtype), "--log-level", "warning"]
    server = ServerProcess("transformers", cmd, url, work / f"transformers{mode}.log")
    name = f"transformers serve {mode}"
    try:
        ready = server.wait_ready("/health")
        warm, _ = asyncio.run(run_load(url, str(path.resolve()), prompts[:2], 2, 4, {}))
        if any(r.error or r.status != 200 for r in warm):
            return {"server": name, "ok": 0, "errors": [r.error or f"status {r.status}" for r in warm][:2]}
        results, wall = asyncio.run(run_load(url, str(path.resolve()), prompts, args.clients, args.max_tokens, {}))
        summary = summarise(name, results, wall)
        summary["startup_s"] = ready
        return summary
    except RuntimeError as err:
        return {"server": name, "ok": 0, "errors": [str(err)[-2000:]]}
    finally:
        server.stop()


def _save(report: dict, path: str | None) -> None:
    """Written after every run, so that a run cut short still leaves what it measured."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def _hf_dtype(dtype: str) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(dtype, "auto")


def _table(report: dict) -> None:
    print("\n| server | ok/requests | output tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | latency p50 (s) |",
          file=sys.stderr)
    print("|---|---|---|---|---|---|", file=sys.stderr)
    for r in report["runs"]:
        if "requests" not in r:
            print(f"| {r['server']} | failed: {str(r.get('errors'))[:200]} |", file=sys.stderr)
            continue
        ttft, tpot, lat = r.get("ttft_s", {}), r.get("tpot_s", {}), r.get("latency_s", {})
        print(f"| {r['server']} | {r['ok']}/{r['requests']} | {r['output_tok_per_s']:,.0f} | "
              f"{ttft.get('p50', float('nan')):.3f} / {ttft.get('p99', float('nan')):.3f} | "
              f"{1e3 * tpot.get('p50', float('nan')):.1f} / {1e3 * tpot.get('p99', float('nan')):.1f} | "
              f"{lat.get('p50', float('nan')):.2f} |", file=sys.stderr)
    if "transformers_skipped" in report:
        print(f"transformers: skipped ({report['transformers_skipped'][:300]})", file=sys.stderr)
    for attempt in report.get("transformers_attempts", []):
        print(f"{attempt['server']}: failed ({str(attempt.get('errors'))[:300]})", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
