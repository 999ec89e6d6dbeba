"""The last program of a launch to finish does the launch's small final step (CUTLASS's serial split-K semaphore,
stream-K's fix-up), where a second kernel would otherwise run it: one launch fewer in the chain of latency-bound
kernels of a small decode step.

Each program stores its part, then counts itself in on a counter (`arrive`); the one that counts last sees every
other program's stores (read them past L1: `cache_modifier=".cg"`) and does the rest. The counters live in one
zeroed int32 buffer per device, and the last arriver sets its counter back to zero, so a launch needs no memset
and a CUDA graph replays it as captured. Launches that count on them run one at a time on a device (one stream),
as the engine's steps do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seekforge.errors import ConfigError

COUNTERS = 16384  # per device; a launch takes as many as it has groups of programs to count


@triton.jit
def arrive(counter_ptr, programs):
    """Counts this program in on the counter of its group of `programs`; True in the one that arrives last."""
    tl.debug_barrier()  # every thread of this program has issued its stores
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")  # releases them; acquires the programs counted before
    last = arrived == programs - 1
    tl.atomic_xchg(counter_ptr, 0, mask=last)  # all have arrived: ready for the next launch
    return last


_BUFFERS: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device, n: int) -> torch.Tensor:
    """n zeroed counters on `device` (int32). The buffer is made on the first call, which must not be inside a CUDA
    graph capture (the graph would own its memory): run the kernel once before capturing it."""
    if n > COUNTERS:
        raise ConfigError(f"a launch wants {n} arrival counters, more than the {COUNTERS} kept per device")
    buffer = _BUFFERS.get(device)
    if buffer is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ConfigError("the arrival counters are made on a kernel's first call, which must run before a "
                              "CUDA graph captures it (warm up first)")
        buffer = _BUFFERS[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return buffer[:n]
