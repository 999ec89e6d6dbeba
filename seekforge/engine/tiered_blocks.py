"""The prefix cache over three tiers: the GPU's paged cache, CPU memory and a directory on disk
(seekforge.engine.kv_tiers). A block the GPU evicts lives on below, and a prefix found there is copied back up
instead of being recomputed.

Write policy: write-through. A block that the prefix cache registers (full of computed tokens) is copied to the
CPU tier at the start of the next step, once the step that computed it (and the MTP drafter's catch-up, which
writes the block's drafter latents) is queued; every block entering the CPU tier is queued for the disk. An
eviction from the GPU then costs nothing, the block being below already; the disk holds whatever was computed,
without a flush at shutdown beyond the writes still queued (`LLM.close` waits for those); and on a GPU the copies
run beside later steps (seekforge.engine.kv_transfer). A GPU block reused while its copy down still runs makes
the engine's stream wait for that copy.

Keys: the GPU tier's chain of Python hashes is neither stable across processes (hash(None) differs per process
before Python 3.12) nor collision-proof, so the lower tiers key block i by a 128-bit BLAKE2b chain,
key(i) = BLAKE2b(key(i - 1) + the block's token ids), rooted at the cache identity (`cache_identity`: a digest
of the weights and the cache layout). Another model never finds this model's blocks, in memory or on disk, and
every hit is checked against the block's token ids as the GPU tier checks its own.

Bringing a prefix back: where a waiting sequence's cached prefix goes on below the GPU, `match_prefix` starts a
*load*: free GPU blocks are taken and filled from the CPU tier, and from the disk (read on a thread into CPU slots,
then copied up). The sequence waits (match_prefix answers None) while the others step; once the copies have landed,
or a step has run beside them, or they are short against the prefill of this step (the sequence's own, and any
admitted before it; the engine's stream then waits on the device for what is left), the blocks join the GPU's prefix
cache and the sequence is admitted with them as hits. A load holds its blocks, and the GPU hits before them, until then. When nothing else holds GPU blocks the
scheduler waits for the loads rather than spin; a block that another load is bringing up is waited for, not copied
twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
from array import array
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from seekforge.engine.block_manager import Block, BlockManager
from seekforge.engine.cache_size import GiB
from seekforge.engine.kv_tiers import DiskTier, HostTier
from seekforge.engine.kv_transfer import BlockCopier
from seekforge.engine.scheduler import Scheduler, SchedulerOutput
from seekforge.engine.sequence import Sequence
from seekforge.errors import ConfigError

_FORMAT = 1  # the block layout's version: changing it gives every cache another identity
# A load whose copy up is still in flight joins a step that prefills P tokens (its sequence's own, up to the step's
# budget, and those of the sequences admitted before it) when it brings up at most _JOIN * P tokens' latents: the
# step's decoders wait for that prefill anyway, and a token's latents cross PCIe about ten times faster than a token
# is prefilled (16b on an H100: ~0.8M tok/s at 25 GB/s against ~72K tok/s).
_JOIN = 16
_SAMPLE = 1 << 16  # elements of each weight tensor that go into the identity


def cache_identity(model: torch.nn.Module, block_shape: tuple[int, ...], dtype: torch.dtype) -> bytes:
    """The root of the chain keys: a BLAKE2b digest of the cache layout (dtype; block shape: layers with the
    drafter's, block size, latent width), the model config, and every parameter and buffer (name, shape, dtype and
    65,536 evenly spaced elements: reading all of a large model's bytes would take minutes). Another model, a
    fine-tune, another dtype or another block size gets other keys."""
    h = hashlib.blake2b(digest_size=16)
    layout = {"format": _FORMAT, "dtype": str(dtype), "block_shape": list(block_shape),
              "config": dataclasses.asdict(model.cfg)}
    h.update(json.dumps(layout, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            flat = t.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // _SAMPLE)][:_SAMPLE].contiguous().cpu()
            h.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
            h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.digest()


def chain_key(prev: bytes, tokens) -> bytes:
    """The lower tiers' key of a block: its tokens chained onto the key of the block before (or the root)."""
    return hashlib.blake2b(prev + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass
class TierCounters:
    query_tokens: int = 0  # prompt tokens of admitted sequences that the tiers above did not hold
    hit_tokens: int = 0  # of which this tier supplied

    def add(self, query: int, hit: int) -> None:
        self.query_tokens += query
        self.hit_tokens += hit

    def as_dict(self) -> dict:
        rate = self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
        return {"query_tokens": self.query_tokens, "hit_tokens": self.hit_tokens, "hit_rate": rate}


@dataclass
class _Part:
    """One block of a load: block `index` of the sequence, into GPU block `block`, from `source`."""

    index: int
    block: int
    hash: int  # the GPU tier's chain hash
    key: bytes
    tokens: tuple[int, ...]
    source: str  # "gpu" (there already, after a block that is not), "cpu" or "disk"
    slot: int | None = None  # the host slot it comes through


class _Load:
    def __init__(self, seq_id: int, epoch: int, held: list[int], parts: list[_Part]):
        self.seq_id, self.epoch = seq_id, epoch
        self.held = held  # GPU blocks held until the load ends, in prefix order
        self.parts = parts
        self.valid = len(parts)  # parts before the first that could not be read
        self.event: torch.cuda.Event | None = None  # the last copy up (GPU)
        self.queued = 0  # the step (TieredBlockManager.steps) in which that copy was queued
        self.reads: Future | None = None  # the disk reads


class TieredBlockManager(BlockManager):
    def __init__(self, num_blocks: int, block_size: int, copier: BlockCopier, host: HostTier, disk: DiskTier | None,
                 identity: Callable[[], bytes], root: bytes):
        super().__init__(num_blocks, block_size, enable_prefix_caching=True)
        self.copier, self.host, self.disk = copier, host, disk
        self._identity = identity
        self.root = root
        self.counters = {"gpu": TierCounters(), "cpu": TierCounters(), "disk": TierCounters()}
        self._keys: dict[int, list[bytes]] = {}  # seq id -> chain keys of its leading full blocks
        self._stores: list[tuple[int, int, bytes, tuple[int, ...]]] = []  # registered since the last flush
        self._stored: dict[int, torch.cuda.Event] = {}  # GPU block -> its copy down (GPU)
        self._loads: list[_Load] = []  # in flight
        self._loading: dict[int, _Load] = {}  # seq id -> its load in flight
        self._incoming: dict[int, _Load] = {}  # GPU chain hash -> the load bringing that block up
        self._held: Counter[int] = Counter()  # GPU blocks held by loads
        self._origin: dict[int, str] = {}  # GPU block -> the tier it came up from, until a sequence takes it
        self.steps = 0  # flushes, one at the start of each step
        self._prefilling = 0  # tokens that the sequences admitted in this step prefill

    @classmethod
    def build(cls, config, model, caches: list[torch.Tensor], num_blocks: int, block_size: int) -> TieredBlockManager:
        """The tiers EngineConfig asks for (kv_cpu_gb, kv_disk, kv_disk_gb) under a paged cache of `caches`."""
        copier = BlockCopier(caches)
        slot_bytes = math.prod(copier.block_shape) * caches[0].element_size()
        slots = int(config.kv_cpu_gb * GiB) // slot_bytes
        if slots < 1:
            raise ConfigError(f"LLM: kv_cpu_gb={config.kv_cpu_gb} holds no block ({slot_bytes} bytes each); raise "
                              f"it, or set 0 for no lower tiers")
        host = HostTier(slots, tuple(copier.block_shape), copier.dtype, pin=copier.device.type == "cuda")

        def identity() -> bytes:
            return cache_identity(model, tuple(copier.block_shape), copier.dtype)

        root = identity()
        disk = None
        if config.kv_disk is not None:
            path = Path(config.kv_disk)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"LLM: cannot use kv_disk={config.kv_disk!r} as the disk tier's directory "
                                  f"({err}); give a writable directory") from None
            if not os.access(path, os.W_OK):
                raise ConfigError(f"LLM: kv_disk={config.kv_disk!r} is not writable; give a writable directory")
            # blocks queued for the disk hold their CPU slots: a quarter of them may wait for the writer
            disk = DiskTier(path, int(config.kv_disk_gb * GiB), slot_bytes, block_size, root,
                            max_queued=max(64, slots // 4))
            if disk.file_bytes > disk.capacity_bytes:
                raise ConfigError(f"LLM: kv_disk_gb={config.kv_disk_gb} holds no block ({disk.file_bytes} bytes "
                                  f"each); raise it")
        return cls(num_blocks, block_size, copier, host, disk, identity, root)

    # ---------------------------------------------------------------- write-through
    def register(self, seq: Sequence) -> None:
        first = seq.num_hashed_blocks
        super().register(seq)
        if seq.num_hashed_blocks == first:
            return
        keys = self._chain_keys(seq, seq.num_hashed_blocks)
        for i in range(first, seq.num_hashed_blocks):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None and keys[i] not in self.host:  # registered now, not a duplicate
                self._stores.append((block.block_id, block.hash, keys[i], block.token_ids))

    def flush(self) -> None:
        """Copy the blocks registered since the last call to the CPU tier and queue them for the disk; end the loads
        that have landed. Runs at the start of each step."""
        self.steps += 1
        self._prefilling = 0
        self._poll(wait=False)  # loads of aborted sequences end here too
        if not self._stores:
            return
        stores, self._stores = self._stores, []
        blocks, slots, filed = [], [], []
        for block_id, h, key, tokens in stores:
            if self.blocks[block_id].hash != h or key in self.host:
                continue
            slot = self.host.take()
            if slot is None:  # every slot is busy with copies and disk writes
                break
            self.host.add(key, tokens, slot)
            self.host.hold(slot)
            blocks.append(block_id)
            slots.append(slot)
            filed.append((key, tokens))
        if not blocks:
            return
        event = self.copier.to_host(blocks, [self.host.slot(s) for s in slots])
        done = event.query if event is not None else None
        for block_id, slot, (key, tokens) in zip(blocks, slots, filed):
            if event is not None:
                self._stored[block_id] = event
            if self.disk is not None:
                job = self.disk.write(key, tokens, self.host.slot(slot), event.synchronize if event else None)
                if job is not None:
                    self.host.hold(slot)
                    self.host.release(slot, when=lambda job=job: job.copied)
            self.host.release(slot, when=done)

    # ---------------------------------------------------------------- lookups and loads
    def match_prefix(self, seq: Sequence, budget: int = 0) -> list[int] | None:
        """The GPU blocks holding seq's cached prefix, as BlockManager's; None while more of it is on its way up
        from a lower tier (a load started here, or by a sequence that shares the prefix). `budget`: the tokens the
        step seq would join may still compute, of which seq's own prefill counts against its load's copy (_JOIN)."""
        if seq.needs_prompt_logprobs:
            return []
        idle = len(self.free) + len(self._held) == self.num_blocks  # no sequence holds blocks: nothing else to do
        self._poll(wait=idle, seq=seq, budget=budget)
        hits = []
        for _ in range((seq.num_tokens - 1) // self.block_size + 1):  # each round brings up a block at least
            if seq.seq_id in self._loading:
                return None
            hits = super().match_prefix(seq)
            load = self._start_load(seq, hits)
            if load is None:
                return hits
            self._poll(wait=idle, seq=seq, budget=budget)  # host copies off a GPU land at once; idle: wait for the disk
            if load in self._loads:
                return None
        return hits

    def _start_load(self, seq: Sequence, hits: list[int]) -> _Load | None:
        """Start bringing up the blocks after `hits` that lower tiers hold, as many as free GPU blocks allow (one is
        left for the sequence's own tokens). The load seq must wait for (this one, or another load that brings up
        its next block), or None."""
        bs = self.block_size
        n = (seq.num_tokens - 1) // bs
        i = len(hits)
        if i >= n:
            return None
        keys = self._chain_keys(seq, n)
        h = self.blocks[hits[-1]].hash if hits else None
        room = len(self.free) - sum(1 for b in hits if self.blocks[b].ref_count == 0) - 1
        parts, waits = [], None
        for i in range(i, n):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self._chain(h, tokens)
            if h in self._incoming:
                waits = self._incoming[h]
                break
            block_id = self.hash_to_block.get(h)
            if block_id is not None and self.blocks[block_id].token_ids == tokens:
                part = _Part(i, block_id, h, keys[i], tokens, "gpu")
            elif (slot := self.host.get(keys[i], tokens)) is not None:
                part = _Part(i, -1, h, keys[i], tokens, "cpu", slot)
            elif self.disk is not None and self.disk.has(keys[i]):
                part = _Part(i, -1, h, keys[i], tokens, "disk")
            else:
                break
            cost = 1 if part.source != "gpu" or self.blocks[block_id].ref_count == 0 else 0
            if cost > room:
                break
            room -= cost
            parts.append(part)
        # hold the CPU tier's slots, then take slots for the disk's blocks (which never evicts those), ending the
        # load before the first block no slot is left for
        for p in parts:
            if p.source == "cpu":
                self.host.hold(p.slot)
        for k, p in enumerate(parts):
            if p.source == "disk":
                p.slot = self.host.take()
                if p.slot is None:
                    for q in parts[k:]:
                        if q.source == "cpu":
                            self.host.release(q.slot)
                    parts = parts[:k]
                    break
                self.host.hold(p.slot)
        while parts and parts[-1].source == "gpu":  # already where a walk of the GPU tier finds them
            parts.pop()
        if not parts:
            return waits
        for b in hits + [p.block for p in parts if p.source == "gpu"]:
            self._hold(b)
        for p in parts:
            if p.source != "gpu":
                block = self._pop_free()
                block.ref_count = 1
                self._held[block.block_id] += 1
                p.block = block.block_id
        load = _Load(seq.seq_id, self.epoch, hits + [p.block for p in parts], parts)
        up = [p for p in parts if p.source == "cpu"]
        if up:
            self._copy_up(load, up)
        down = [p for p in parts if p.source == "disk"]
        if down:
            load.reads = self.disk.read([(p.key, p.tokens, self.host.slot(p.slot)) for p in down])
        for p in parts:
            if p.source != "gpu":
                self._incoming[p.hash] = load
        self._loads.append(load)
        self._loading[seq.seq_id] = load
        return load

    def _copy_up(self, load: _Load, parts: list[_Part]) -> None:
        """Queue the copy of the parts' host slots into their GPU blocks (the load's last copy up); each slot's hold
        ends once the copy has read it."""
        load.event = self.copier.to_device([self.host.slot(p.slot) for p in parts], [p.block for p in parts])
        load.queued = self.steps
        for p in parts:
            self.host.release(p.slot, when=load.event.query if load.event is not None else None)

    def _poll(self, wait: bool, seq: Sequence | None = None, budget: int = 0) -> None:
        """End the loads whose copies have landed (all of them, waiting, with `wait`), or that join this step's
        prefill, which seq's load counts its own in (the tokens after its prefix, up to `budget`)."""
        if self._loads:
            bs = self.block_size
            self._loads = [load for load in self._loads if not self._advance(
                load, wait, min(budget, seq.num_tokens - len(load.held) * bs)
                if seq is not None and load.seq_id == seq.seq_id else 0)]

    def _advance(self, load: _Load, wait: bool, own: int = 0) -> bool:
        """Move a load on: copy up what the disk has read, and once every copy has landed (or may join this step's
        prefill, its sequence's `own` tokens included), end it. Whether it ended."""
        if load.reads is not None:
            if not wait and not load.reads.done():
                return False
            down = [p for p in load.parts if p.source == "disk"]
            got = load.reads.result()
            load.reads = None
            if got < len(down):
                load.valid = load.parts.index(down[got])
            for p in down[got:]:
                self.host.release(p.slot)
            read = down[:got]
            if read:
                for p in read:
                    if load.epoch == self.epoch and p.key not in self.host:  # into the CPU tier too
                        self.host.add(p.key, p.tokens, p.slot)
                self._copy_up(load, read)
        if load.event is not None and not load.event.query():
            if wait:
                load.event.synchronize()
            elif load.queued < self.steps or sum(p.source != "gpu" for p in load.parts) * self.block_size <= (
                    _JOIN * (self._prefilling + own)):
                # A step has run beside the copy since it was queued, so little or none of it is left; or this step
                # prefills (the sequence itself, or those admitted before it), which the copy is short against
                # (_JOIN). The load ends now and the engine's stream waits on the device for what remains (the host
                # goes on), rather than the sequence waiting a step more for the event to show on the host.
                self.copier.engine_waits(load.event)
            else:
                return False
        self._end(load)
        return True

    def _end(self, load: _Load) -> None:
        """Register the blocks a load brought up in the GPU's prefix cache and let its blocks go."""
        current = load.epoch == self.epoch  # not brought up from before a weights change
        for k, p in enumerate(load.parts):
            if self._incoming.get(p.hash) is load:
                del self._incoming[p.hash]
            if p.source != "gpu" and k < load.valid and current and p.hash not in self.hash_to_block:
                block = self.blocks[p.block]
                self.hash_to_block[p.hash] = p.block
                block.hash, block.token_ids = p.hash, p.tokens
                self._origin[p.block] = p.source
        for b in reversed(load.held):  # the last blocks first, so that a prefix outlives its continuation
            self._unhold(b)
        if self._loading.get(load.seq_id) is load:
            del self._loading[load.seq_id]

    def _hold(self, block_id: int) -> None:
        self._ref(block_id)
        self._held[block_id] += 1

    def _unhold(self, block_id: int) -> None:
        self._unref(block_id)
        self._held[block_id] -= 1
        if not self._held[block_id]:
            del self._held[block_id]

    # ---------------------------------------------------------------- the GPU tier's hooks
    def allocate(self, seq: Sequence, hits: list[int], num_tokens: int) -> None:
        super().allocate(seq, hits, num_tokens)
        self._prefilling += num_tokens - seq.num_computed
        came = Counter(self._origin.pop(b, "gpu") for b in hits)
        bs = self.block_size
        missed = seq.num_tokens - came["gpu"] * bs  # tokens the GPU tier did not hold
        self.counters["gpu"].add(seq.num_tokens, came["gpu"] * bs)
        self.counters["cpu"].add(missed, came["cpu"] * bs)
        self.counters["disk"].add(missed - came["cpu"] * bs, came["disk"] * bs)

    def _evict(self, block: Block) -> None:
        event = self._stored.pop(block.block_id, None)
        if event is not None:  # its copy down may still be reading it
            self.copier.engine_waits(event)
        self._origin.pop(block.block_id, None)
        super()._evict(block)

    def free_seq(self, seq: Sequence) -> None:
        self._loading.pop(seq.seq_id, None)  # an aborted sequence's load still ends, its blocks cached
        super().free_seq(seq)
        if seq.is_finished:
            self._keys.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix in every tier (after the weights change): the new weights give a new cache
        identity, so the disk's blocks of the old ones are never read again (they age out)."""
        super().reset_prefix_cache()
        self._stores.clear()
        self._keys.clear()
        self._origin.clear()
        self._incoming.clear()
        self.copier.engine_waits_all()  # blocks that lost their hashes are reused without _evict's wait
        self._stored.clear()
        self.host.clear()
        self.root = self._identity()
        if self.disk is not None:
            self.disk.identity = self.root

    # ---------------------------------------------------------------- keys, facts, shutdown
    def _chain_keys(self, seq: Sequence, n: int) -> list[bytes]:
        """The chain keys of seq's first n blocks (kept per sequence: its full blocks' tokens never change)."""
        keys = self._keys.setdefault(seq.seq_id, [])
        bs = self.block_size
        while len(keys) < n:
            i = len(keys)
            keys.append(chain_key(keys[-1] if keys else self.root, seq.token_ids[i * bs:(i + 1) * bs]))
        return keys

    def tier_stats(self) -> dict:
        """Each tier's hits (of the prompt tokens the tiers above missed) and, below the GPU, its use."""
        host = self.host
        out = {"gpu": self.counters["gpu"].as_dict(),
               "cpu": {**self.counters["cpu"].as_dict(), "blocks": len(host.entries), "capacity_blocks": host.capacity,
                       "used_bytes": host.used_bytes, "capacity_bytes": host.capacity * host.slot_bytes}}
        if self.disk is not None:
            d = self.disk
            out["disk"] = {**self.counters["disk"].as_dict(), "blocks": d.num_blocks, "used_bytes": d.used_bytes,
                           "capacity_bytes": d.capacity_bytes, "corrupt_blocks": d.corrupt,
                           "write_errors": d.write_errors, "skipped_writes": d.skipped}
        return out

    def close(self) -> None:
        """Finish every copy and disk write (after which nothing else may run on this manager; again: a no-op)."""
        self.flush()
        self._poll(wait=True)
        self.copier.synchronize()
        if self.disk is not None:
            self.disk.close()


class TieredScheduler(Scheduler):
    """The scheduler over a TieredBlockManager: each step first copies down what the last one registered, and a
    waiting sequence's prefix is looked up with the step's budget left (which its own prefill, joining a copy up of
    its prefix, takes from)."""

    bm: TieredBlockManager

    def schedule(self) -> SchedulerOutput:
        self.bm.flush()
        return super().schedule()

    def _match(self, seq: Sequence, budget: int) -> list[int] | None:
        return self.bm.match_prefix(seq, budget)
