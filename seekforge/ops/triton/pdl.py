"""Programmatic dependent launch (PDL, Hopper and newer) for the chain of small kernels of a decode step.

A batch-1 step is a chain of ~300 kernels, most of them a few microseconds long, each waiting for the one
before it. Launched with PDL (`launch_pdl`), a kernel's programs may start while the kernel before it still runs:
each reads what no kernel of the step writes (its first weight slice) first, then waits for the previous
kernel to finish with its writes visible (`griddepcontrol.wait`), and only then lets the kernel after it start
launching, so no more than one kernel's programs ever wait at once (programs of several kernels waiting together
slow the whole chain). The outputs of kernels further back are safe to read
anywhere: the kernel between let this one launch only after its own wait, when they had finished.

Every program must pass `wait_for_inputs` before it writes anything or ends, and nothing before it may read what
the kernel just before writes. SEEKFORGE_PDL=0 turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Waits for the previous kernel on the stream (PDL), then lets the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.cache
def _supported(device_type: str, index: int | None) -> bool:
    if device_type != "cuda" or triton.knobs.runtime.interpret or os.environ.get("SEEKFORGE_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


ENABLED = True  # benchmarks switch it off to compare


def launch_options(device: torch.device) -> dict:
    """The kernel arguments of a launch on `device`: {"PDL": True, "launch_pdl": True} on Hopper and newer (unless
    SEEKFORGE_PDL=0), {"PDL": False} elsewhere and under the interpreter."""
    if ENABLED and _supported(device.type, device.index):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
