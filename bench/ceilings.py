"""The machine's ceilings, measured in the same run as every benchmark figure they qualify, and the facts of the
run (machine, commit)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import torch


def _timed(fn, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / _timed(lambda: dst.copy_(src), device, 20)


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense square matmul on random data, FLOP/s."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _timed(lambda: a @ b, device, 10 if device.type == "cuda" else 3)


def machine(device: torch.device) -> dict:
    import platform

    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def commit() -> str | None:
    """The commit measured, dirty or not, where this is a git checkout."""
    try:
        git = ["git", "-C", str(Path(__file__).resolve().parent)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    return {"copy_bytes_per_s": copy_bandwidth(device), "matmul_flops": matmul_flops(device, dtype),
            "matmul_dtype": str(dtype).removeprefix("torch.")}
