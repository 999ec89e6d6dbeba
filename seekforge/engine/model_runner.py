"""Runs the model over the paged latent cache: one packed forward per engine step.

A step is a list of chunks, one per scheduled sequence: the positions [start, start + n) of its tokens
(a prefill chunk, a recompute, or a decode token plus speculative drafts) and its block table. Every
token is packed into one [N, dim] batch for the projections and experts; only attention looks at
sequences, in groups:

- short chunks (decode, draft verification: n <= 1 + draft tokens), grouped by n, run the absorbed
  MLA straight over the cache blocks (`ops.paged_mla_decode`): only latents and rotary keys are read;
- longer chunks (prefill) run the explicit form (latents up-projected to per-head keys and values,
  `ops.dense_attention`) over their context, padded to one batch;
  a fresh prefill (no cached context) attends to its own new latents without touching the cache.

The blocks are the model's own (`Block.forward`, `MTPModule.forward` for the drafter); what only the engine
knows, the cache, each token's slot, the groups and the kernels, reaches them through the backend object they
take (`seekforge.engine.paged_backend`: `StepBackend` for a packed step, `DecodeBackend` for a captured step).
The model object is used as is (its weights in place): an RL trainer that updates them sees the new policy on the
next step. Decode steps can be replayed as CUDA graphs from static input buffers (`capture_cuda_graphs`): with MTP
drafting the main model's graphs take 1 + drafts tokens a sequence (verification; a plain decode step pads to it),
and the drafter has its own graphs for its catch-up over the accepted tokens and for each draft. With
`compile=True`, torch.compile fuses the dozens of small kernels around each block's matmuls (norms, rotary,
routing, SwiGLU, residuals): the captured decode block as a whole (the two cache kernels opaque to it), and in
prefill and mixed steps the work before and after the dispatch over attention groups (`paged_backend.Stages`).
In captured steps of up to 4 sequences the dense projections are Triton GEMVs (`ops.FewRowLinears`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.utils._pytree as pytree

from seekforge import ops
from seekforge.engine.device_copy import copy_into, padded_tables, to_device
from seekforge.engine.paged_backend import (AttentionGroup, DecodeBackend, Stages, StepBackend, attention_inputs,
                                            explicit_attention, run_block, second_half)
from seekforge.errors import ConfigError
from seekforge.model.block import Block
from seekforge.model.fp8_weights import has_fp8_weights
from seekforge.model.transformer import Transformer


@dataclass
class Chunk:
    block_table: list[int]
    start: int  # position of the first token
    token_ids: list[int]


@dataclass
class DeviceIds:
    """Token ids the host does not know yet (async scheduling): chunk chunks[k] (one token) takes tokens[rows[k]],
    the previous step's samples, still on the device."""

    chunks: list[int]
    rows: list[int]
    tokens: torch.Tensor

    def write(self, ids: torch.Tensor, at: list[int]) -> None:
        """ids[at[k]] = tokens[rows[k]]: at[k] is where chunk chunks[k]'s token sits in ids."""
        index = to_device(at + self.rows, torch.long, ids.device)
        ids[index[:len(at)]] = self.tokens[index[len(at):]]


@dataclass
class StepInput:
    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    slot_mapping: torch.Tensor  # [N] cache slot of each token
    groups: list[AttentionGroup]
    offsets: list[int]  # packed offset of each chunk, in the caller's chunk order
    order: list[int]  # chunk indices in packed order

    def pack(self, per_chunk: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-chunk rows (given in the caller's order) in packed order."""
        return torch.cat([per_chunk[i] for i in self.order])


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, max_model_len: int,
                 mtp: bool = False, max_absorbed_query: int = 1, compile: bool = False,
                 keep_heads: int | None = None):
        self.model = model
        # dynamic sparse heads: how many heads each decoded query keeps (None: all, without choosing)
        self.keep_heads = keep_heads
        self.cfg = cfg = model.cfg
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.max_absorbed_query = max_absorbed_query
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        # One extra block (id num_blocks) never handed out: padding rows write and read there.
        self.scratch_block = num_blocks
        shape = (num_blocks + 1, block_size, width)
        self.kv_cache = torch.zeros(cfg.n_layers, *shape, dtype=self.dtype, device=self.device)
        self.mtp_cache = torch.zeros(1, *shape, dtype=self.dtype, device=self.device) if mtp else None
        # tokens a sequence in the main model's captured steps (1 + drafts); the static buffer's width per field
        self.graph_rows = max_absorbed_query
        # captured decode steps by (routed experts a token, None for the config's; batch size): the graph and its
        # outputs (logits [size * graph_rows, vocab], tokens per expert by layer id, hidden [size * graph_rows, dim])
        self.graphs: dict[tuple[int | None, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        # the drafter's captured steps by (tokens a sequence: graph_rows for its catch-up, 1 for a draft; batch
        # size): the graph and its outputs (draft logits [size, vocab], hidden [size, dim] at each sequence's last
        # token)
        self.mtp_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self._sampled: torch.Tensor | None = None  # see token_buffer
        if compile:
            _settle_before_tracing(self.device, self.dtype, has_fp8_weights(model))
        # the decode block compiled once for all blocks alike and every batch size; the cache kernels are opaque
        # ops to it (written in place into the cache, which the graph never copies), so each block is one graph
        self._decode_block = _compile(run_block) if compile else run_block
        self._cache_ops = ((ops.store_latents_op, ops.paged_mla_decode_op) if compile
                           else (ops.store_latents, ops.paged_mla_decode))
        self._step_inputs = _compile(step_inputs) if compile else step_inputs
        self._logits = _compile(final_logits) if compile else final_logits
        stages = (attention_inputs, second_half, explicit_attention)
        self._stages = Stages(*(map(_compile, stages) if compile else stages),
                              ops.values_padded_for_sdpa(self.device))

    @property
    def cache_bytes_per_token(self) -> int:
        """Bytes the main model's cache holds per token (what `ModelConfig.cache_bytes_per_token` states)."""
        c = self.kv_cache
        return c.element_size() * c.shape[0] * c.shape[-1]

    @property
    def mtp_cache_bytes_per_token(self) -> int:
        c = self.mtp_cache
        return 0 if c is None else c.element_size() * c.shape[0] * c.shape[-1]

    # ---------------------------------------------------------------- step input
    def prepare(self, chunks: list[Chunk], device_ids: DeviceIds | None = None) -> StepInput:
        """Pack chunks: absorbed groups first (by query length), then the explicit (prefill) group.
        `device_ids` gives the token of some one-token chunks as device values (see DeviceIds).
        The per-token arrays (ids, positions, slots) and the padded block tables are built with numpy over the
        chunks' lists, never element by element in Python: a step of hundreds of sequences stays cheap."""
        num = len(chunks)
        bs, dev = self.block_size, self.device
        lens = np.fromiter((len(ch.token_ids) for ch in chunks), np.int64, num)
        # absorbed chunks by query length, then the explicit ones; each in the caller's order (a stable sort)
        key = np.where(lens <= self.max_absorbed_query, lens, self.max_absorbed_query + 1)
        order_np = np.argsort(key, kind="stable")
        order = order_np.tolist()
        lens = lens[order_np]
        starts = np.fromiter((chunks[i].start for i in order), np.int64, num)
        tables_np = padded_tables([chunks[i].block_table for i in order], int(-(-(starts + lens).max() // bs)),
                                  self.scratch_block)
        cu_np = np.zeros(num + 1, np.int64)
        np.cumsum(lens, out=cu_np[1:])
        total = int(cu_np[-1])
        positions_np = np.repeat(starts - cu_np[:-1], lens) + np.arange(total)
        slots_np = tables_np[np.repeat(np.arange(num), lens), positions_np // bs] * bs + positions_np % bs
        ids_np = np.fromiter(itertools.chain.from_iterable(chunks[i].token_ids for i in order), np.int64, total)
        tables = to_device(tables_np, torch.long, dev)
        positions = to_device(positions_np, torch.long, dev)
        input_ids = to_device(ids_np, torch.long, dev)
        slot_mapping = to_device(slots_np, torch.long, dev)

        cu, lens, starts = cu_np.tolist(), lens.tolist(), starts.tolist()
        groups = []
        c = 0
        for n in sorted(set(lens[:int((key <= self.max_absorbed_query).sum())])):
            b = lens.count(n)  # chunks of query length n, contiguous from c
            lo, hi = cu[c], cu[c + b]
            ctx = max(starts[c:c + b]) + n
            plan = ops.plan_paged_attention(tables[c:c + b, :-(-ctx // bs)], positions[lo:hi].view(b, n), bs, ctx)
            groups.append(AttentionGroup(lo, hi, True, b, n, plan))
            c += b
        if c < num:
            groups.append(self._explicit_group(c, cu, lens, starts, tables, positions))
        offsets = np.empty(num, np.int64)
        offsets[order_np] = cu_np[:-1]
        offsets = offsets.tolist()
        if device_ids is not None:
            device_ids.write(input_ids, [offsets[i] for i in device_ids.chunks])
        return StepInput(input_ids, positions, slot_mapping, groups, offsets, order)

    def _explicit_group(self, c, cu, lens, starts, tables, positions) -> AttentionGroup:
        b = len(lens) - c
        lo, hi = cu[c], cu[-1]
        lens, starts = lens[c:], starts[c:]
        S = max(lens)
        fresh = all(s == 0 for s in starts)
        if b == 1:
            qpos = positions[lo:hi].view(1, -1)
            plan = (None if fresh else
                    ops.plan_paged_attention(tables[c:c + 1], qpos, self.block_size, starts[0] + S))
            return AttentionGroup(lo, hi, False, 1, S, plan)
        dev = self.device
        ar = torch.arange(S, device=dev)
        lens_t = torch.tensor(lens, device=dev).unsqueeze(1)
        index = torch.tensor(cu[c:-1], device=dev).unsqueeze(1) + torch.minimum(ar.unsqueeze(0), lens_t - 1)
        valid = ar.unsqueeze(0) < lens_t
        qpos = positions[index]
        if fresh:
            return AttentionGroup(lo, hi, False, b, S, None, index, valid, ar.view(1, 1, -1) <= qpos.unsqueeze(-1))
        ctx = max(s + n for s, n in zip(starts, lens))
        plan = ops.plan_paged_attention(tables[c:, :-(-ctx // self.block_size)], qpos, self.block_size, ctx)
        return AttentionGroup(lo, hi, False, b, S, plan, index, valid)

    # ---------------------------------------------------------------- forward
    def run_blocks(self, h: torch.Tensor, step: StepInput, blocks: list[Block], cache: torch.Tensor,
                   topk: int | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """h [N, dim] -> ([N, dim] through `blocks` (block i caching into cache[i]), the tokens per expert [experts]
        of each MoE block by layer id). `topk`: routed experts a token (None: the config's)."""
        cos, sin = self.model.rope(step.positions.unsqueeze(0))
        h = h.unsqueeze(0)
        loads = {}
        for i, block in enumerate(blocks):
            h, routed = block(h, cos, sin, None, self._backend(cache[i], step, topk))
            if routed is not None:
                loads[block.layer_id] = routed[1]
        return h[0], loads

    def _backend(self, cache: torch.Tensor, step: StepInput, topk: int | None = None) -> StepBackend:
        """The blocks' backend for one layer's cache in a packed step."""
        return StepBackend(cache, step.slot_mapping, step.groups, self._stages, topk, self.keep_heads)

    def forward(self, step: StepInput, topk: int | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Main model over the step's tokens: (hidden states [N, dim] before the final norm, the tokens per expert
        [experts] fp32 of each MoE layer by layer id). `topk`: routed experts a token (None: the config's)."""
        m = self.model
        return self.run_blocks(m.embed(step.input_ids), step, list(m.layers), self.kv_cache, topk)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._logits(self.model, hidden)

    def forward_mtp(self, h_prev: torch.Tensor, step: StepInput) -> torch.Tensor:
        """The first MTP module (the drafter; see spec_decode) at the step's positions: step.input_ids hold
        the *next* tokens t_{p+1}, h_prev [N, dim] the hidden states at p. Returns its hidden [N, dim]."""
        cos, sin = self.model.rope(step.positions.unsqueeze(0))
        emb = self.model.embed(step.input_ids)
        h, _ = self.model.mtp[0](h_prev.unsqueeze(0), emb.unsqueeze(0), cos, sin, None,
                                 self._backend(self.mtp_cache[0], step))
        return h[0]  # the drafter's load: no metric reads it

    def mtp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.mtp[0].norm(hidden)).float()

    def mtp_step(self, chunks: list[Chunk], h_prev: list[torch.Tensor], device_ids: DeviceIds | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The drafter over each chunk's tokens (`forward_mtp`: chunk.token_ids hold the next tokens, h_prev[i]
        [len(chunk.token_ids), dim] the hidden states before them): (its hidden [b, dim], its draft logits [b, vocab]
        fp32) at each chunk's last token. `device_ids` gives some one-token chunks' tokens on the device (the last
        drafts, as DeviceIds). Replayed from a captured graph where the step fits one (then both are the graph's output
        buffers, which its next replay overwrites)."""
        b = len(chunks)
        s = 1 if all(len(ch.token_ids) == 1 for ch in chunks) else self.graph_rows
        size = self._graph_size(chunks, s, [n for rows, n in self.mtp_graphs if rows == s])
        if size is None:
            step = self.prepare(chunks, device_ids)
            hidden = self.forward_mtp(step.pack(list(h_prev)), step)
            last = [step.offsets[i] + len(ch.token_ids) - 1 for i, ch in enumerate(chunks)]
            if last != list(range(len(hidden))):
                hidden = hidden.index_select(0, to_device(last, torch.long, hidden.device))
            return hidden, self.mtp_logits(hidden)
        rows = sum(len(ch.token_ids) for ch in chunks)
        torch.cat(list(h_prev), out=self._hidden[:rows])
        self._fill_static(chunks, size, rows_per_seq=s, from_hidden=True)
        if device_ids is not None:  # a one-token chunk's token is its row's first id
            device_ids.write(self._static[:, 0], device_ids.chunks)
        graph, (logits, hidden) = self.mtp_graphs[s, size]
        graph.replay()
        return hidden[:b], logits[:b]

    # ---------------------------------------------------------------- decode through CUDA graphs
    def _graph_size(self, chunks: list[Chunk], rows_per_seq: int, sizes) -> int | None:
        """Where every step decides between a graph and eager code: the smallest of the captured batch `sizes` that
        holds the step's sequences, if each chunk has at most rows_per_seq tokens (the graphs' rows a sequence);
        None (run eagerly) when none does: a prefill chunk, more sequences than the largest graph, none captured."""
        if any(len(ch.token_ids) > rows_per_seq for ch in chunks):
            return None
        return min((n for n in sizes if n >= len(chunks)), default=None)

    def replay(self, chunks: list[Chunk], device_ids: DeviceIds | None = None, topk: int | None = None
               ) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor, int] | None:
        """A decode or verification step (chunks of 1 .. graph_rows tokens) at `topk` routed experts a token (None:
        the config's) replayed from a captured graph: (logits [R, vocab], tokens per expert of each MoE layer by
        layer id, hidden states [R, dim] before the final norm, graph_rows), chunk i's token j at row
        i * graph_rows + j; None when the step does not fit one (`_graph_size`). All are the graph's output
        buffers: the next replay of this graph overwrites them."""
        s = self.graph_rows
        size = self._graph_size(chunks, s, [n for k, n in self.graphs if k == topk])
        if size is None:
            return None
        in_buffer = device_ids is not None and device_ids.tokens.data_ptr() == self._sampled.data_ptr()
        self._fill_static(chunks, size, device_ids if in_buffer else None)
        if device_ids is not None and not in_buffer:
            device_ids.write(self._static[:, 0], device_ids.chunks)
        graph, (logits, loads, hidden) = self.graphs[topk, size]
        graph.replay()
        return logits, loads, hidden, s

    def decode_logits(self, chunks: list[Chunk], device_ids: DeviceIds | None = None,
                      topk: int | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]] | None:
        """(Logits [b, vocab], tokens per expert of each MoE layer by layer id) of a plain decode step (one token a
        chunk) replayed from a captured graph (`replay`); None when it does not fit one."""
        replayed = self.replay(chunks, device_ids, topk)
        if replayed is None:
            return None
        logits, loads, _, s = replayed
        return logits[:len(chunks) * s:s], loads

    def capture_cuda_graphs(self, max_batch: int, topks: tuple[int | None, ...] = (None,), eager: bool = False) -> None:
        """Capture plain decode steps for batch sizes 1, 2, 4, 8, then every 16 up to 256 and every 64 past it, up
        to max_batch, once for each routed top-k of `topks` (None: the config's): a graph replays the k it was
        captured with. The graphs attend over the whole static block table (max_model_len); fused kernels make that
        cheap. Past 256 sequences an eager step's launches would cost more host time than padding to a coarser size
        costs the device. With MTP the main model's graphs take graph_rows tokens a sequence, and the drafter's
        catch-up (graph_rows tokens a sequence) and draft steps (one) are captured at the same sizes. `eager`: on
        a device without CUDA graphs, take `Rerun`s for them (the same static-buffer steps, run at each replay)."""
        if self.device.type != "cuda" and not eager:
            return
        self._allocate_static(max_batch)
        sizes = list(reversed(graph_sizes(max_batch)))
        steps = [(self.graphs, (k, n), partial(self._graph_step, n, k)) for k in topks for n in sizes]
        if self.mtp_cache is not None:
            steps += [(self.mtp_graphs, (s, n), partial(self._mtp_graph_step, n, s))
                      for s in sorted({self.graph_rows, 1}) for n in sizes]
        if self.device.type != "cuda":
            for graphs, key, step in steps:
                rerun = Rerun(step)
                graphs[key] = (rerun, rerun.outputs)
            return
        pool = None
        for graphs, key, step in steps:
            step()  # warm up (lazy initialisation must not happen during capture)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    outputs = step()
            except RuntimeError as err:
                self.graphs.clear()
                self.mtp_graphs.clear()
                raise ConfigError(f"cannot capture the decode step as a CUDA graph in {self.dtype} ({err}); some "
                                  f"operator synchronises with the host here (float32 grouped matmul does): use "
                                  f"bfloat16, or cuda_graphs=False") from err
            pool = graph.pool()
            graphs[key] = (graph, outputs)

    def token_buffer(self, n: int) -> torch.Tensor | None:
        """Where a caller that samples a captured step's n tokens on the device should write them (None: anywhere):
        a next captured step given them as DeviceIds reads them from here inside its graph, with no copy of its own."""
        return None if self._sampled is None or n > len(self._sampled) else self._sampled[:n]

    def _allocate_static(self, max_batch: int) -> None:
        """The graphs' input: one buffer, one row a sequence, so a step's inputs reach the device in one copy: for
        each of its graph_rows tokens the token id, then the positions, the cache slots and the sources (the main
        model: the row of `token_buffer` that holds the token instead, or -1; the drafter: the row of the hidden
        buffer that holds its h_prev), then the row of the sequence's last token among the step's rows, then the
        block table over max_model_len. With MTP, the hidden buffer [max_batch * graph_rows, dim] holds the
        drafter's h_prev rows."""
        width, s = -(-self.max_model_len // self.block_size), self.graph_rows
        self._static = torch.full((max_batch, 4 * s + 1 + width), self.scratch_block, dtype=torch.long,
                                  device=self.device)
        self._static[:, :2 * s] = 0
        self._static[:, 2 * s:3 * s] = self.scratch_block * self.block_size
        self._static[:, 3 * s:4 * s] = -1
        self._static[:, 4 * s] = 0
        self._sampled = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        if self.mtp_cache is not None:
            self._hidden = torch.zeros(max_batch * s, self.cfg.dim, dtype=self.dtype, device=self.device)

    def _fill_static(self, chunks: list[Chunk], size: int, device_ids: DeviceIds | None = None,
                     rows_per_seq: int | None = None, from_hidden: bool = False) -> None:
        """Rows for the chunks (each of 1 .. rows_per_seq tokens; None: graph_rows, the main model's), then padding
        sequences up to the graph's size. A chunk shorter than rows_per_seq is padded with rows at its last position
        writing into the scratch block, as are the padding sequences' rows. `device_ids` (tokens in `token_buffer`)
        give some one-token chunks' tokens by their row there; `from_hidden`: each row's h_prev is the hidden
        buffer's row at its place among the chunks' tokens (the drafter's step). Built with numpy over the chunks'
        lists, copied to the device in one transfer."""
        bs, scratch, S = self.block_size, self.scratch_block, self.graph_rows
        s = rows_per_seq or S
        b, width = len(chunks), self._static.shape[1] - 4 * S - 1
        lens = np.zeros(size, np.int64)
        starts = np.zeros(size, np.int64)
        lens[:b] = [len(ch.token_ids) for ch in chunks]
        starts[:b] = [ch.start for ch in chunks]
        j = np.arange(s)
        real = j < lens[:, None]  # [size, s]
        last = np.maximum(lens - 1, 0)
        at = np.minimum(j, last[:, None])  # each row's place in its chunk (padding rows repeat the last)
        positions = starts[:, None] + at
        rows = np.full((size, 4 * S + 1 + width), -1, np.int64)
        tables = rows[:, 4 * S + 1:]
        tables[:] = padded_tables([ch.block_table for ch in chunks] + [[]] * (size - b), width, scratch)
        rows[:, 0:s] = 0
        rows[:, 0:s][real] = list(itertools.chain.from_iterable(ch.token_ids for ch in chunks))
        rows[:, S:S + s] = positions
        slots = tables[np.arange(size)[:, None], positions // bs] * bs + positions % bs
        rows[:, 2 * S:2 * S + s] = np.where(real, slots, scratch * bs)
        if from_hidden:
            first = np.zeros(size, np.int64)
            np.cumsum(lens[:-1], out=first[1:])
            rows[:, 3 * S:3 * S + s] = first[:, None] + at
        if device_ids is not None:
            rows[device_ids.chunks, 3 * S] = device_ids.rows
        rows[:, 4 * S] = np.arange(0, size * s, s) + last
        copy_into(self._static[:size], rows)

    def _static_rows(self, b: int, s: int):
        """The static buffer's fields for a graph of b sequences of s rows each: ids, positions, slots and sources
        [b * s], the last rows [b] and the block tables [b, width]."""
        S, rows = self.graph_rows, self._static[:b]
        ids, pos, slots, source = (rows[:, f * S:f * S + s].reshape(-1) for f in range(4))
        return ids, pos, slots, source, rows[:, 4 * S], rows[:, 4 * S + 1:]

    def _plan(self, pos: torch.Tensor, tables: torch.Tensor) -> ops.PagedAttentionPlan:
        """A captured step's attention over the whole static block table; pos [b, s]."""
        return ops.plan_paged_attention(tables, pos, self.block_size, tables.shape[1] * self.block_size)

    def _graph_step(self, b: int, topk: int | None = None
                    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor]:
        """The step a graph of size b captures at `topk` routed experts a token (None: the config's), graph_rows
        tokens a sequence: (logits [b * graph_rows, vocab], tokens per expert of each MoE layer by layer id,
        counting the sequences' rows only, not the padding rows, hidden [b * graph_rows, dim] before the final
        norm)."""
        s = self.graph_rows
        ids, pos, slots, source, _, tables = self._static_rows(b, s)
        plan = self._plan(pos.view(b, s), tables)
        h, cos, sin = self._step_inputs(self.model, ids, pos, source, self._sampled)
        chosen = {}
        with ops.FewRowLinears(self.device):  # the projections of steps up to 4 sequences as Triton GEMVs
            for i, block in enumerate(self.model.layers):
                backend = DecodeBackend(self.kv_cache[i], slots, plan, *self._cache_ops, topk=topk,
                                        keep_heads=self.keep_heads, query_len=s)
                h, routed = self._decode_block(block, h, cos, sin, backend)
                if routed is not None:
                    chosen[block.layer_id] = routed[0]
            logits = self.logits(h[0])  # the head too, where its GEMV beats cuBLAS (`ops.FewRowLinears`)
        # padding rows write into the scratch block, which no sequence's row does
        real = slots < self.scratch_block * self.block_size
        return logits, rows_load(chosen, real, self.cfg.n_routed_experts), h[0]

    def _mtp_graph_step(self, b: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The drafter's step a graph of size b captures, s tokens a sequence (`forward_mtp` over the static rows,
        h_prev from the hidden buffer): (draft logits [b, vocab] fp32, hidden [b, dim]) at each sequence's last
        token."""
        ids, pos, slots, source, last, tables = self._static_rows(b, s)
        plan = self._plan(pos.view(b, s), tables)
        cos, sin = self.model.rope(pos.unsqueeze(0))
        backend = DecodeBackend(self.mtp_cache[0], slots, plan, *self._cache_ops, keep_heads=self.keep_heads,
                                query_len=s)
        with ops.FewRowLinears(self.device):
            h, _ = self.model.mtp[0](self._hidden[source].unsqueeze(0), self.model.embed(ids).unsqueeze(0), cos, sin,
                                     None, backend)
            h = h[0][last]
            return self.mtp_logits(h), h


class Rerun:
    """A captured step's stand-in where CUDA graphs do not exist (the CPU, in tests): `replay` runs the step function
    again and copies its outputs into those of its first run, the buffers a graph's replay writes."""

    def __init__(self, step):
        self.step = step
        self.outputs = step()

    def replay(self) -> None:
        for out, new in zip(pytree.tree_leaves(self.outputs), pytree.tree_leaves(self.step())):
            out.copy_(new)


def graph_sizes(max_batch: int) -> list[int]:
    """The batch sizes decode graphs are captured for, ascending: 1, 2, 4, 8, every 16 up to 256, every 64 past it,
    and max_batch."""
    sizes = ([s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, min(max_batch, 257), 16))
             + list(range(320, max_batch, 64)) + [max_batch])
    return sorted(set(sizes))


def step_inputs(model: Transformer, ids: torch.Tensor, pos: torch.Tensor, source: torch.Tensor,
                sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A captured step's input embeddings [1, b, dim] (`step_embeddings`) and the rotary cos, sin of its positions
    pos [b]: one compiled graph, where eager code launched a kernel an op."""
    cos, sin = model.rope(pos.unsqueeze(0))
    return step_embeddings(model.embed, ids, source, sampled).unsqueeze(0), cos, sin


def final_logits(model: Transformer, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [N, vocab] in fp32 of the last hidden states [N, dim]: the final norm, the head, the cast. Compiled, the
    norm's ops fuse, where eager code launched a kernel an op."""
    return model.head(model.norm(hidden)).float()


def step_embeddings(embed: torch.nn.Embedding, ids: torch.Tensor, source: torch.Tensor,
                    sampled: torch.Tensor) -> torch.Tensor:
    """A captured step's input embeddings [b, dim]: of ids [b], or of sampled[source] where source [b] >= 0 (the
    last step's samples, still on the device). Compiled, inductor fuses the gather, the choice and the lookup into
    one kernel, where writing the samples into the step's input before the replay took two copies to the device
    and two index kernels."""
    return embed(torch.where(source >= 0, sampled[source.clamp(min=0)], ids))


def rows_load(chosen: dict[int, torch.Tensor], real: torch.Tensor, n_experts: int) -> dict[int, torch.Tensor]:
    """Tokens per expert [n_experts] fp32 of each layer (chosen: experts [b, k] by layer id) over the rows where
    real [b] is True; one count for all layers (a captured step's padding rows route too, and must not count)."""
    if not chosen:
        return {}
    experts = torch.stack(list(chosen.values())).flatten(1)  # [layers, b * k]
    weight = real.to(torch.float32).repeat_interleave(experts.shape[1] // real.shape[0]).expand_as(experts)
    counts = torch.zeros(len(chosen), n_experts, device=real.device, dtype=torch.float32)
    return dict(zip(chosen, counts.scatter_add_(1, experts, weight).unbind(0)))


def _settle_before_tracing(device: torch.device, dtype: torch.dtype, fp8: bool) -> None:
    """What the blocks look up once (the model's grouped-matmul probe, a test call per device and dtype; with FP8
    weights, torch._scaled_mm's block-scale layout, probed per device; the Triton kernels, imported) happens here,
    never inside a trace, where it would break the graph."""
    from seekforge.model.moe import _grouped_mm_works
    from seekforge.ops.blockwise_mm import scaled_mm_layout

    _grouped_mm_works(torch.empty(0, device=device, dtype=dtype), torch.empty(0))
    if fp8:
        scaled_mm_layout(device, True)
    if ops.triton_runs_on(device):
        ops.load_triton_kernels()


def _compile(fn):
    """torch.compile with dynamic shapes, allowed more variants than dynamo's default of 8 per function: the
    kernel choices by token count (one block a pair, shared experts joined, fused or grouped experts) and the
    dense and MoE layers each make one, and past the limit dynamo would run the rest eagerly. Float constants
    (norm eps, route scale) stay baked in: with dynamic shapes dynamo otherwise passes them as CPU scalar
    tensors, and inductor builds CPU kernels for them inside GPU blocks (on the H200 one such build stalled a
    test's compile for minutes). Int arguments (a step's routed top-k) are specialised too: each k compiles its
    own variant, never a symbolic k in the routing's shapes."""
    compiled = torch.compile(fn, dynamic=True)

    def run(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, specialize_float=True,
                                           specialize_int=True):
            return compiled(*args, **kwargs)

    return run


_RECOMPILE_LIMIT = 32
