"""Whole blocks between the paged cache and host memory, for the tiers under the prefix cache.

A block's content is its slice of every cache tensor (the main model's layers, then the MTP drafter's, which
shares the block ids), one host slot of [layers, block_size, width]. On a GPU the copies run on a stream of
their own, ordered after everything the engine's stream has queued so far (the steps that wrote the blocks,
or that may still write into blocks just taken from the free list), and each batch records an event: the
copies overlap later steps, and the engine checks the event instead of waiting. Elsewhere they run at once.
"""

from __future__ import annotations

import contextlib

import torch

from seekforge.engine.device_copy import to_device


class BlockCopier:
    def __init__(self, caches: list[torch.Tensor]):
        self.caches = caches  # each [layers, blocks, block_size, width]
        self.device = caches[0].device
        self.dtype = caches[0].dtype
        self.block_shape = (sum(c.shape[0] for c in caches), *caches[0].shape[2:])
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def to_host(self, blocks: list[int], slots: list[torch.Tensor]) -> torch.cuda.Event | None:
        """Copy cache blocks into host slots; on a GPU the event that marks them done (None: done already)."""
        self._after_engine()
        with self._side():
            index = to_device(blocks, torch.long, self.device)
            rows = torch.cat([c.index_select(1, index) for c in self.caches]).transpose(0, 1).contiguous()
            for row, slot in zip(rows, slots):
                slot.copy_(row, non_blocking=True)
            return self._record()

    def to_device(self, slots: list[torch.Tensor], blocks: list[int]) -> torch.cuda.Event | None:
        """Copy host slots into cache blocks (free blocks the caller holds); on a GPU the event that marks them
        done. The engine reads the blocks only once the event has completed."""
        self._after_engine()
        with self._side():
            staged = torch.empty((len(slots), *self.block_shape), dtype=self.dtype, device=self.device)
            for row, slot in zip(staged, slots):
                row.copy_(slot, non_blocking=True)
            index = to_device(blocks, torch.long, self.device)
            lo = 0
            for c in self.caches:
                c.index_copy_(1, index, staged[:, lo:lo + c.shape[0]].transpose(0, 1))
                lo += c.shape[0]
            return self._record()

    def engine_waits(self, event: torch.cuda.Event) -> None:
        """Order the engine's later work after `event` (on the device; the host goes on)."""
        torch.cuda.current_stream(self.device).wait_event(event)

    def engine_waits_all(self) -> None:
        """Order the engine's later work after every copy queued so far."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def _after_engine(self) -> None:
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def _side(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _record(self) -> torch.cuda.Event | None:
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

