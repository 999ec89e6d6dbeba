"""The two tiers under the GPU's prefix cache: CPU memory and a directory on disk, each a store of whole blocks
(every layer's latents of one cache block, `seekforge.engine.kv_transfer`) under a 16-byte chain key
(`seekforge.engine.tiered_blocks`), with the block's token ids beside it so that a hit is checked as the GPU
tier checks its own. Each tier has its own capacity and evicts the least recently used block first.

HostTier holds blocks in slots of one host pool (pinned when the cache is on a GPU, so copies overlap the
step). It is driven by the engine thread alone; a slot that a device copy or a disk job still reads or
writes is *held* and is neither evicted nor handed out until that work is done.

DiskTier keeps one file a block, `DIR/<identity>/<key[:1]>/<key>.kvb` (hex digits), where identity is the digest of
the model's weights and cache layout (another model writes and reads elsewhere, and each file repeats its
identity). A file is written to a temporary name and renamed (a reader sees all of it or nothing) and ends
with a CRC-32 of everything before it; a file that is short, long, foreign or fails its checksum is counted,
deleted and never served. Writes and reads run on a thread each, so the engine never waits for the disk. The
files outlive the process: a new DiskTier on the same directory finds them (least recently used first, by
modification time, which a hit refreshes) and evicts across every identity in it to stay within capacity.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from seekforge.configio import atomic_write_bytes

log = logging.getLogger("seekforge.engine")


class HostTier:
    def __init__(self, capacity: int, block_shape: tuple[int, ...], dtype: torch.dtype, pin: bool):
        self.capacity = capacity
        self._chunks = _pool(capacity, block_shape, dtype, pin)
        self._starts = list(itertools.accumulate((len(c) for c in self._chunks[:-1]), initial=0))
        self.slot_bytes = self._chunks[0][0].numel() * self._chunks[0].element_size()
        self.entries: OrderedDict[bytes, tuple[int, tuple[int, ...]]] = OrderedDict()  # key -> (slot, tokens), LRU first
        self._key_of: list[bytes | None] = [None] * capacity
        self._free = list(range(capacity - 1, -1, -1))
        self._holds = [0] * capacity
        self._pending: list[tuple[Callable[[], bool], int]] = []  # (work done?, slot) held until the work is done

    def slot(self, i: int) -> torch.Tensor:
        """Slot i's memory, [layers, block_size, width]."""
        c = bisect.bisect_right(self._starts, i) - 1
        return self._chunks[c][i - self._starts[c]]

    def __contains__(self, key: bytes) -> bool:
        return key in self.entries

    def get(self, key: bytes, tokens: tuple[int, ...]) -> int | None:
        """The slot holding the block `key`, if its tokens are `tokens` (made most recently used)."""
        entry = self.entries.get(key)
        if entry is None or entry[1] != tokens:
            return None
        self.entries.move_to_end(key)
        return entry[0]

    def take(self) -> int | None:
        """A slot to fill (unheld and unfiled: hold or file it before the next `take`): a free one, else the least
        recently used block's, evicted; None if every slot is held."""
        self._release_done()
        if self._free:
            return self._free.pop()
        for key, (slot, _) in self.entries.items():
            if not self._holds[slot]:
                del self.entries[key]
                self._key_of[slot] = None
                return slot
        return None

    def add(self, key: bytes, tokens: tuple[int, ...], slot: int) -> None:
        """File the block in `slot` (taken with `take`) under `key`."""
        self.entries[key] = (slot, tokens)
        self._key_of[slot] = key

    def hold(self, slot: int) -> None:
        """Keep `slot` from eviction and reuse until `release`."""
        self._holds[slot] += 1

    def release(self, slot: int, when: Callable[[], bool] | None = None) -> None:
        """Undo one `hold`, now or once `when()` is true (checked lazily). A slot neither held nor filed is free."""
        if when is not None and not when():
            self._pending.append((when, slot))
            return
        self._holds[slot] -= 1
        if not self._holds[slot] and self._key_of[slot] is None:
            self._free.append(slot)

    def clear(self) -> None:
        """Forget every block (held slots return to the free list once released)."""
        for slot, _ in self.entries.values():
            self._key_of[slot] = None
            if not self._holds[slot]:
                self._free.append(slot)
        self.entries.clear()

    @property
    def used_bytes(self) -> int:
        return len(self.entries) * self.slot_bytes

    def _release_done(self) -> None:
        if self._pending:
            still = []
            for done, slot in self._pending:
                if done():
                    self.release(slot)
                else:
                    still.append((done, slot))
            self._pending = still


def _pool(capacity: int, block_shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> list[torch.Tensor]:
    """`capacity` slots of block_shape, in chunks [slots, *block_shape] whose sizes sit just under powers of two:
    the pinned-memory allocator rounds each allocation up to one, which would waste up to half of one large pool."""
    slot_bytes = math.prod(block_shape) * torch.empty(0, dtype=dtype).element_size()
    chunks, left = [], capacity
    while left:
        want = min(left * slot_bytes, 1 << 30)
        n = min(left, max(1, (1 << (want.bit_length() - 1)) // slot_bytes))
        chunks.append(torch.empty((n, *block_shape), dtype=dtype, pin_memory=pin))
        left -= n
    return chunks


_MAGIC = b"SFKVBLK1"
_HEADER = struct.Struct("<8s16s16sQQ")  # magic, identity, key, number of tokens, payload bytes
_CRC = struct.Struct("<I")
_SUFFIX = ".kvb"
_STALE_TMP_S = 600  # a temporary file this old was left by a writer that died


class DiskWrite:
    """A block queued for the disk; `copied` once the writer has taken its bytes out of the host slot."""

    def __init__(self):
        self.copied = False


class DiskTier:
    def __init__(self, root: Path, capacity_bytes: int, payload_bytes: int, block_size: int, identity: bytes,
                 max_queued: int = 64):
        self.root = root
        self.capacity_bytes = capacity_bytes
        self.payload_bytes = payload_bytes
        self.file_bytes = _HEADER.size + 8 * block_size + payload_bytes + _CRC.size
        self.identity = identity
        self.max_queued = max_queued
        self.corrupt = 0  # files found torn or corrupt (deleted, recomputed)
        self.write_errors = 0
        self.skipped = 0  # blocks not written because the writer was behind
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # relative path -> bytes, least recently used first
        self._bytes = 0  # the sum of _index's sizes
        self._queued: set[str] = set()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="seekforge-kv-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="seekforge-kv-read")
        self._scan()

    # ---------------------------------------------------------------- engine thread
    def has(self, key: bytes) -> bool:
        return self._name(key) in self._index

    @property
    def used_bytes(self) -> int:
        return self._bytes

    @property
    def num_blocks(self) -> int:
        return len(self._index)

    def write(self, key: bytes, tokens: tuple[int, ...], slot: torch.Tensor,
              ready: Callable[[], None] | None) -> DiskWrite | None:
        """Queue the block in host `slot` for the disk (after `ready()`, which waits for the copy into it). None
        when the file exists or is queued already, or the writer is behind (the block is then not written)."""
        name = self._name(key)
        with self._lock:
            if name in self._index or name in self._queued:
                return None
            if len(self._queued) >= self.max_queued:
                self.skipped += 1
                return None
            self._queued.add(name)
        job = DiskWrite()
        self._writer.submit(self._write, job, name, self.identity, key, tokens, slot, ready)
        return job

    def read(self, blocks: list[tuple[bytes, tuple[int, ...], torch.Tensor]]) -> Future:
        """Read blocks (key, tokens, host slot to fill), in order, on the reader thread; the future gives how many
        were read whole before the first one that was missing or corrupt."""
        return self._reader.submit(self._read_all, self.identity, blocks)

    def flush(self) -> None:
        """Wait for every queued write."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        """Wait for every queued write and read, then stop the threads (again: a no-op)."""
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    # ---------------------------------------------------------------- worker threads
    def _write(self, job: DiskWrite, name: str, identity: bytes, key: bytes, tokens: tuple[int, ...],
               slot: torch.Tensor, ready: Callable[[], None] | None) -> None:
        try:
            if ready is not None:
                ready()
            payload = _raw(slot).tobytes()
            job.copied = True
            head = _HEADER.pack(_MAGIC, identity, key, len(tokens), len(payload)) + np.asarray(
                tokens, dtype=np.int64).tobytes()
            crc = zlib.crc32(payload, zlib.crc32(head))
            # no fsync: a file a power cut leaves half-written fails its checksum and is recomputed
            atomic_write_bytes(self.root / name, b"".join((head, payload, _CRC.pack(crc))), durable=False)
        except OSError as err:
            job.copied = True
            self.write_errors += 1
            if self.write_errors == 1:
                log.warning("seekforge: the disk KV tier cannot write to %s (%s); blocks go unsaved", self.root, err)
            with self._lock:
                self._queued.discard(name)
            return
        with self._lock:
            self._queued.discard(name)
            self._index[name] = self.file_bytes
            self._bytes += self.file_bytes
            self._fit()

    def _read_all(self, identity: bytes, blocks) -> int:
        for i, (key, tokens, slot) in enumerate(blocks):
            if not self._read(identity, key, tokens, slot):
                return i
        return len(blocks)

    def _read(self, identity: bytes, key: bytes, tokens: tuple[int, ...], slot: torch.Tensor) -> bool:
        name = self._name(key, identity)
        path = self.root / name
        try:
            with open(path, "rb") as f:
                head = f.read(_HEADER.size + 8 * len(tokens))
                body = _raw(slot)
                got = f.readinto(memoryview(body).cast("B"))
                tail = f.read(_CRC.size + 1)
        except FileNotFoundError:  # evicted meanwhile
            self._forget(name)
            return False
        except OSError as err:
            return self._corrupt(name, f"unreadable ({err})")
        if len(head) != _HEADER.size + 8 * len(tokens) or got != body.nbytes or len(tail) != _CRC.size:
            return self._corrupt(name, "wrong length")
        magic, file_identity, file_key, n, size = _HEADER.unpack_from(head)
        if (magic, file_identity, file_key, n, size) != (_MAGIC, identity, key, len(tokens), body.nbytes):
            return self._corrupt(name, "wrong header")
        if np.frombuffer(head, dtype=np.int64, offset=_HEADER.size).tolist() != list(tokens):
            return self._corrupt(name, "other tokens")
        if zlib.crc32(body, zlib.crc32(head)) != _CRC.unpack(tail)[0]:
            return self._corrupt(name, "checksum mismatch")
        with self._lock:
            if name in self._index:
                self._index.move_to_end(name)
        try:
            os.utime(path)  # the least recently used order outlives the process
        except OSError:
            pass
        return True

    def _corrupt(self, name: str, why: str) -> bool:
        self.corrupt += 1
        log.warning("seekforge: disk KV block %s is unusable (%s): deleted, to be recomputed", self.root / name, why)
        self._forget(name)
        (self.root / name).unlink(missing_ok=True)
        return False

    def _forget(self, name: str) -> None:
        with self._lock:
            self._bytes -= self._index.pop(name, 0)

    # ---------------------------------------------------------------- both
    def _name(self, key: bytes, identity: bytes | None = None) -> str:
        k = key.hex()
        return f"{(identity or self.identity).hex()}/{k[:2]}/{k}{_SUFFIX}"

    def _scan(self) -> None:
        """Index the files already in the directory, least recently used first; delete temporary files that
        writers which died left behind."""
        found = []
        now = time.time()
        for path in self.root.glob("*/*/*"):
            try:
                st = path.stat()
            except OSError:
                continue
            if path.name.endswith(_SUFFIX):
                found.append((st.st_mtime, path.relative_to(self.root).as_posix(), st.st_size))
            elif path.name.endswith(".tmp") and now - st.st_mtime > _STALE_TMP_S:
                path.unlink(missing_ok=True)
        with self._lock:
            for _, name, size in sorted(found):
                self._index[name] = size
                self._bytes += size
            self._fit()

    def _fit(self) -> None:
        """Delete the least recently used files until the tier is within capacity (the caller holds the lock)."""
        while self._bytes > self.capacity_bytes and self._index:
            name, size = self._index.popitem(last=False)
            self._bytes -= size
            try:
                (self.root / name).unlink()
            except OSError:
                pass


def _raw(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a numpy array over the same memory."""
    return t.reshape(-1).view(torch.uint8).numpy()
