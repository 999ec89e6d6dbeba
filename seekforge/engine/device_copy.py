"""Host lists to device tensors without waiting for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory, which blocks the host until the stream
has drained: the host could not prepare step t+1 while the GPU runs step t. A copy from pinned memory with
non_blocking=True is queued behind the running step instead (stream order keeps it correct), and PyTorch's
pinned-memory cache keeps the source alive until the copy is done.
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def copy_into(dst: torch.Tensor, values) -> None:
    """dst.copy_(values) for a device tensor dst, queued like `to_device`."""
    src = torch.tensor(values, dtype=dst.dtype)
    if dst.is_cuda:
        src = src.pin_memory()
    dst.copy_(src, non_blocking=dst.is_cuda)
