"""The tiny scripted checkpoint and the `seekforge serve` child process that the server tests share.

The checkpoint is a tiny random model with a small trained tokenizer, plus one scripted path so that
reasoning and stop strings have known answers: after the assistant tag the model writes
"<think>\\n quick fox</think> lazy dog<EOS>" with near certainty (dedicated residual lanes that no layer
writes carry each transition to the head), while everywhere else it is a random model that never
picks those tokens.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

import seekforge
from seekforge.tokenizer import ASSISTANT, EOS, Tokenizer

KEY = "sk-test-key"
NAME = "tiny-chain"  # the served name of the `seekforge serve` process
IN_PROCESS_NAME = "tiny-tools"  # the served name of the in-process app (tests/server/conftest.py)
CONTEXT = 256
TEXTS = ["The quick brown fox jumps over the lazy dog.", "A lazy dog sleeps in the sun while the quick fox runs.",
         "Hello world, this is a small test of the server.", "What is 12 + 30? The answer is 42."] * 10
SCRIPT = [ASSISTANT, "<think>", "\n", " quick", " fox", "</think>", " lazy", " dog", EOS]
REASONING, ANSWER = "\n quick fox", " lazy dog"
SCRIPT_TOKENS = len(SCRIPT) - 1  # generated after the assistant tag, EOS included


def build_checkpoint(path: Path) -> tuple[Tokenizer, seekforge.Transformer]:
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    ids = [tok.token_to_id(t) if t in (ASSISTANT, EOS) else tok.encode(t)[0] for t in SCRIPT]
    assert all(len(tok.encode(t)) == 1 for t in SCRIPT[1:-1]), "script words must be single tokens"
    torch.manual_seed(0)
    model = seekforge.Transformer(seekforge.ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size))
    dim = model.cfg.dim
    lanes = list(range(dim - len(ids), dim))  # one residual lane per transition, the last marks ordinary tokens
    ordinary = lanes.pop()
    with torch.no_grad():
        for name, p in model.layers.named_parameters():  # no layer writes into the lanes
            if name.endswith(("attn.wo.weight", "ffn.w2.weight", "shared_experts.w2.weight")):
                p[lanes + [ordinary]] = 0
            elif name.endswith("experts.w2"):
                p[:, lanes + [ordinary]] = 0
        model.embed.weight[:, lanes] = 0
        model.embed.weight[:, ordinary] = 1
        model.head.weight[ids[0], ordinary] = -30  # the script starts only where a prompt starts it
        for lane, a, b in zip(lanes, ids, ids[1:]):
            model.embed.weight[a, lane] = 100
            model.embed.weight[a, ordinary] = 0
            model.head.weight[b] = 0
            model.head.weight[b, lane] = 3
            model.head.weight[b, ordinary] = -30
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return tok, model


@contextmanager
def in_process(path: Path, name: str, engine, **config) -> Iterator:
    """A starlette TestClient of the app serving the checkpoint at `path` as `name` with `engine` (an EngineConfig)
    and the other ServerConfig fields in `config`, in this process, once its engine answers /health."""
    from starlette.testclient import TestClient

    from seekforge.server import ServerConfig
    from seekforge.server.app import create_app

    with TestClient(create_app(ServerConfig(str(path), served_model_names=[name], engine=engine, **config))) as http:
        deadline = time.time() + 120
        while http.get("/health").status_code != 200:
            assert time.time() < deadline, "the engine did not get ready"
            time.sleep(0.05)
        yield http


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `seekforge serve` child process; records the /health answers seen while it started."""

    def __init__(self, path: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(path.parent / f"server-{self.port}.log", "w+")
        # one intra-op thread: on a small shared CPU, spinning OpenMP workers slow a tiny model down tenfold
        cmd = [sys.executable, "-m", "seekforge.cli", "serve", str(path), "--port", str(self.port),
               "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.startup_statuses: list[int] = []
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{self.output()}"
            try:
                status = httpx.get(self.url + "/health", timeout=30).status_code
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            self.startup_statuses.append(status)
            if status == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"server not healthy in time:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def metric(self, name: str, **labels) -> float:
        want = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and want <= set(ls))



def collect_chat(stream) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for chunk in stream:
        for c in chunk.choices:
            o = out.setdefault(c.index, {"role": None, "reasoning": "", "content": "", "finish": None, "n_after": 0})
            if o["finish"] is not None:
                o["n_after"] += 1
            o["role"] = o["role"] or c.delta.role
            o["reasoning"] += getattr(c.delta, "reasoning_content", None) or ""
            o["content"] += c.delta.content or ""
            o["finish"] = c.finish_reason or o["finish"]
    return out

