"""Paged latent-cache blocks: allocation, block tables, prefix caching, LRU eviction.

The cache is cut into blocks of `block_size` token slots; a sequence owns a block table (list of block
ids) and position p lives in slot block_table[p // block_size] * block_size + p % block_size.

Prefix caching: once a block is full of computed tokens it is registered under a hash chained over
all blocks before it (hash(previous hash, its tokens)), so a later sequence whose prompt starts with
the same tokens takes those blocks instead of recomputing them. Blocks are reference counted; a block
whose count drops to zero goes to the back of the free list but keeps its content and hash, so it can
still be revived by a hit until allocation reaches it from the front (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict

from seekforge.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()  # the tokens behind `hash`, checked on every hit


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evicted first
        self.hash_to_block: dict[int, int] = {}
        # The prefix cache is valid for one set of weights; resetting starts a new epoch, and sequences
        # admitted before it never register blocks again (their latents came from the old weights).
        self.epoch = 0
        self._seq_epoch: dict[int, int] = {}
        self.query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of which found
        self.prefill_tokens = 0  # tokens admitted sequences had to compute (prompts and recomputes, less hits)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------- prefix cache
    def _chain(self, prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks covering the longest prefix of seq's tokens (full blocks only, and never the
        whole sequence: its last token must be computed to produce logits). None for a sequence whose
        prompt logprobs are still to compute."""
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:
            return []
        hits, prev = [], None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            prev = self._chain(prev, tokens)
            block_id = self.hash_to_block.get(prev)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def register(self, seq: Sequence) -> None:
        """Register seq's blocks that have become full of computed tokens."""
        bs = self.block_size
        if ((seq.num_hashed_blocks + 1) * bs > seq.num_computed or not self.enable_prefix_caching
                or self._seq_epoch.get(seq.seq_id) != self.epoch):
            return
        while (seq.num_hashed_blocks + 1) * bs <= seq.num_computed:
            i = seq.num_hashed_blocks
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self._chain(seq.last_hash, tokens)
            block = self.blocks[seq.block_table[i]]
            if h not in self.hash_to_block and block.hash is None:
                self.hash_to_block[h] = block.block_id
                block.hash, block.token_ids = h, tokens
            seq.last_hash = h
            seq.num_hashed_blocks += 1

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (after the weights change). Running sequences keep their blocks."""
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
        self.hash_to_block.clear()
        self.epoch += 1

    # ---------------------------------------------------------------- allocation
    def can_allocate(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Whether seq (holding no blocks) can take `hits` and new blocks up to num_tokens slots."""
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return revived + self.blocks_for(num_tokens) - len(hits) <= len(self.free)

    def allocate(self, seq: Sequence, hits: list[int], num_tokens: int) -> None:
        assert not seq.block_table
        self._seq_epoch[seq.seq_id] = self.epoch
        prev = None
        for block_id in hits:
            prev = self._ref(block_id).hash
            seq.block_table.append(block_id)
        seq.num_hashed_blocks = len(hits)
        seq.last_hash = prev
        seq.num_computed = len(hits) * self.block_size
        if not seq.num_output_tokens:  # first admission, not a recompute after preemption
            seq.num_cached_prompt_tokens = seq.num_computed
        if self.enable_prefix_caching:
            self.query_tokens += seq.num_tokens
            self.hit_tokens += seq.num_computed
        self.prefill_tokens += seq.num_tokens - seq.num_computed
        self.grow(seq, num_tokens)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Append fresh blocks until seq has at least num_tokens slots (the caller checked can_grow)."""
        while len(seq.block_table) * self.block_size < num_tokens:
            block = self._pop_free()
            block.ref_count = 1
            seq.block_table.append(block.block_id)

    def _ref(self, block_id: int) -> Block:
        """Take a reference to a block, reviving it from the free list where no one held it."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1
        return block

    def _unref(self, block_id: int) -> None:
        """Drop a reference to a block: one no one holds goes to the back of the free list, its cached prefix kept."""
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block_id] = None

    def _pop_free(self) -> Block:
        """The least recently freed block, its cached prefix (if it holds one) evicted."""
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            self._evict(block)
        return block

    def _evict(self, block: Block) -> None:
        """Drop a free block's cached prefix before the block is reused."""
        if self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids = None, ()

    def free_seq(self, seq: Sequence) -> None:
        # Last blocks first, so a prefix outlives its continuation under LRU eviction.
        for block_id in reversed(seq.block_table):
            self._unref(block_id)
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.last_hash = None
        seq.num_computed = 0
        self._seq_epoch.pop(seq.seq_id, None)
