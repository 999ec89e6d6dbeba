"""Runs a test's function on several CPU processes joined by torch.distributed (gloo), as torchrun would.

    def work(scale):                       # module level in a test file; runs on every rank
        import torch.distributed as dist
        dist.init_process_group("gloo")    # RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK are set
        ...
        return result                      # anything torch.save can write

    results = run_ranks(work, 4, scale=2.0)  # [rank 0's result, ..., rank 3's]

Each rank is a fresh `python` process that loads the test file by path (tests are imported by path, not by a
module name a child could import), so only the environment torchrun gives its workers is shared. A rank that
fails or hangs fails the call with its own traceback; the others are stopped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_CHILD = r"""
import importlib.util, sys, torch
path, name, args_file, out_file = sys.argv[1:5]
spec = importlib.util.spec_from_file_location("dist_test_module", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
kwargs = torch.load(args_file, weights_only=False)
result = getattr(module, name)(**kwargs)
import torch.distributed as dist
if dist.is_initialized():
    dist.destroy_process_group()
torch.save(result, out_file)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world_size: int, timeout: float = 300.0, env: dict | None = None, **kwargs) -> list:
    """fn(**kwargs) on `world_size` processes; their return values by rank."""
    path = Path(fn.__code__.co_filename)
    tests = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        args_file = Path(tmp) / "args.pt"
        torch.save(kwargs, args_file)
        port = free_port()
        base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")])),
                **(env or {})}
        procs = []
        for rank in range(world_size):
            out = Path(tmp) / f"out{rank}.pt"
            log = open(Path(tmp) / f"log{rank}.txt", "w+")
            proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), fn.__name__, str(args_file), str(out)],
                                    env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=log,
                                    stderr=subprocess.STDOUT, text=True)
            procs.append((proc, log, out))
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p, _, _ in procs):
                failed = [r for r, (p, _, _) in enumerate(procs) if p.returncode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            for p, _, _ in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        problems = []
        for rank, (p, log, out) in enumerate(procs):
            log.seek(0)
            text = log.read()
            log.close()
            if p.returncode != 0 or not out.is_file():
                problems.append(f"--- rank {rank} (exit {p.returncode}):\n{text[-6000:]}")
        if problems:
            timed_out = time.monotonic() > deadline
            raise AssertionError(("timed out after %.0f s\n" % timeout if timed_out else "")
                                 + "\n".join(problems))
        return [torch.load(out, weights_only=False) for _, _, out in procs]
