"""Pipeline parallelism for the DeepSeek-V3 Transformer on torch.distributed.pipelining.

`PipelineModel(model, pp_mesh, schedule=..., n_microbatches=...)` splits a `Transformer` from outside into
stages, runs them under one of torch's schedules (`SCHEDULES`: GPipe, 1F1B, interleaved 1F1B, looped BFS,
interleaved zero-bubble) and gives the trainer one call per optimizer step, `step(tokens, labels, mtp_weight,
balance_alpha)`, whose loss and gradients equal `Transformer.loss` on the whole batch (the mean over equal
micro-batches: equal-length rows, every label a target, as in pretraining), and `evaluate(tokens, labels)`.

The split. The model's units are its main blocks and then its MTP modules (the planner's units,
`stage_split`): n_stages = pp * stages_per_rank consecutive runs of them, as even as `stage_split` makes them.
Stage 0 also holds the embedding; the last stage the final norm, the output head and every MTP module. Each
stage (`ModelStage`) holds the model's own module objects, not copies, under the model's names ("layers.7...",
"mtp.0...", "head.weight"), and runs them as `Transformer.loss` does. Stage i runs on pp rank i % pp (rank r
holds r, r + pp, ... under the multi-stage schedules).

MTP's embeddings. MTP depth k reads the embeddings of tokens k.., which only stage 0 holds, and shares the
head with the main model. The head lives on the last stage, beside the MTP modules. The embeddings travel: stage
0 sends its embedding output beside the hidden state, every stage passes it on, and the last stage slices
depth k's inputs from it. Their gradient comes back the same way and stage 0's embedding backward sums it with
the main path's, as the one-process model's two embedding lookups accumulate into one weight. So every
parameter lives on exactly one rank (the optimizer, the gradient norm and checkpoints need no shared-weight
bookkeeping), at the cost of a second [micro-batch, seq, dim] tensor on each stage boundary (each way), held by
a stage for its in-flight micro-batches. Tied embeddings (head = embedding) are refused.

The balance loss. Each stage computes the sequence-wise balance loss of its own MoE layers (balance_alpha
times the sum over layers, as `Transformer.loss`) and attaches it to its output through `_AddGradient`: the
forward passes the output on, the backward gives the balance loss the gradient it has in the total loss
(1 / n_microbatches), as Megatron's MoE aux-loss scaler does. Nothing extra crosses a stage boundary.

Micro-batches. The batch [b, s] is cut into n_microbatches of b / n_microbatches rows. The loss of a
micro-batch is main + mtp_weight * mtp + balance, divided by n_microbatches in the last stage, and the schedule
sums the gradients (`scale_grads=False`), so they are those of the mean over micro-batches. A step returns the
step's losses (means over micro-batches, summed over the pp ranks, so every rank has them) and the expert load
of this rank's MoE layers by layer id, for `update_expert_bias` over `moe_layers()`; the data-parallel
all-reduce of the loads is the caller's.

Stage metadata is given to torch statically (shapes from the batch, dtype `dtype`), so torch runs no extra
shape-inference forward whose routing would count in the loads.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seekforge.errors import ConfigError
from seekforge.model.moe import MoE, Routing, add_load
from seekforge.model.mtp import depth_targets
from seekforge.model.transformer import Transformer, sequence_balance_loss

# torch's schedule classes by our names; torch.distributed.pipelining loads on first use (seconds), so that the
# planner (seekforge.train.plan), which imports stage_split from here, starts fast. The V schedules (ZBV,
# DualPipeV: rank r holds stages r and 2 pp - 1 - r) are left out: torch's forward-only run of them (evaluation)
# fails, and torch 2.11 on gloo cannot start them.
SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B",
             "looped_bfs": "ScheduleLoopedBFS", "interleaved_zero_bubble": "ScheduleInterleavedZeroBubble"}
SINGLE_STAGE = ("gpipe", "1f1b")  # one stage per rank; the others run two or more, stage i on rank i % pp
IGNORE = -100  # the label of a position without a target (Transformer.loss's ignore_index)
# what a stage sums over a step's micro-batches: the losses' micro-batch means, the main loss times the
# micro-batch's targets, and the targets (an evaluation's mean over tokens)
RECORDS = ("main_loss", "mtp_loss", "balance_loss", "main_nll", "targets")


def stage_split(n_units: int, pp: int) -> list[int]:
    """Units per pipeline stage, as even as possible, the first stages taking the remainder."""
    base, extra = divmod(n_units, pp)
    return [base + (s < extra) for s in range(pp)]


class _AddGradient(torch.autograd.Function):
    """y = x; in backward, x's gradient passes through and `extra` receives the constant gradient `value`. Puts a
    loss computed on a stage (its balance loss) into the backward without sending it to the last stage, and
    gives an input the last stage did not read (the embeddings when MTP is off) its zero gradient."""

    @staticmethod
    def forward(ctx, x, extra, value):
        ctx.extra = (extra.shape, extra.dtype, extra.device)
        ctx.value = value
        return x.clone()  # a view of x could not be detached in place, as zero-bubble schedules do

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.extra
        return grad, torch.full(shape, ctx.value, dtype=dtype, device=device), None


@dataclass
class _StepSettings:
    """What the stages read during a step: the loss weights, the micro-batch count, the forward's context."""

    mtp_weight: float = 0.0
    balance_alpha: float = 0.0
    n_microbatches: int = 1
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


class ModelStage(nn.Module):
    """One pipeline stage of a Transformer: a run of its blocks (layers `layer_ids`), with the embedding on the
    first stage and the final norm, head and MTP modules on the last, the model's own modules under its names.

    forward(*inputs, labels=None): inputs are tokens [mb, s] on the first stage, else what the previous stage
    sent, (h[, emb]) [mb, s, dim]; returns (h[, emb]) for the next stage (emb, the embedding output, travels only
    when the model has MTP modules), or on the last stage the micro-batch's loss against `labels` [mb, s],
    divided by the micro-batch count. The loss is computed here, not in a separate loss function, so that the
    head and MTP modules run inside the stage's forward (where FSDP gathers their parameters) and the stage
    returns one scalar whatever runs (torch checks a stage's outputs against fixed metadata)."""

    def __init__(self, model: Transformer, index: int, n_stages: int, layer_ids: range, settings: _StepSettings,
                 dtype: torch.dtype):
        super().__init__()
        cfg = model.cfg
        self.index, self.first, self.last = index, index == 0, index == n_stages - 1
        self.relay = cfg.n_mtp_modules > 0  # the embeddings travel to the last stage's MTP modules
        self.dtype = dtype
        self.settings = settings
        if self.first:
            self.embed = model.embed
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        if self.last:
            self.norm, self.head = model.norm, model.head
            self.mtp = nn.ModuleDict({str(k): m for k, m in enumerate(model.mtp)})
        self.rope = model.rope  # buffers only (not persistent): no state-dict entries
        self.reset()

    def reset(self) -> None:
        """Clears what the stage records over a step: sums over its micro-batches (detached tensors, read once
        the step is over, so that no micro-batch waits for the host)."""
        self.forwards = 0
        self.loads: dict[int, torch.Tensor] = {}  # tokens per expert by layer id
        self.sums = dict.fromkeys(RECORDS, 0.0)
        self.ran = {"mtp_loss": False, "balance_loss": False}  # whether an MTP depth / a balance loss ran

    def blocks(self) -> list[nn.Module]:
        """This stage's blocks, main then MTP, in the order they run."""
        return [*self.layers.values(), *((m.block for m in self.mtp.values()) if self.last else ())]

    def forward(self, *inputs: torch.Tensor, labels: torch.Tensor | None = None):
        with self.settings.autocast():
            return self._forward(*inputs, labels=labels)

    def _forward(self, *inputs: torch.Tensor, labels: torch.Tensor | None = None):
        if self.first:
            h = self.embed(inputs[0])
            emb = h if self.relay else None
        else:
            h, emb = inputs if self.relay else (inputs[0], None)
        cos, sin = self._rope(h.shape[1], h.device)
        routing: dict[int, Routing] = {}
        for block in self.layers.values():
            h, routed = block(h, cos, sin)
            if routed is not None:
                routing[block.layer_id] = routed
        scale = 1.0 / self.settings.n_microbatches
        if not self.last:
            if h.dtype != self.dtype:
                raise ConfigError(f"pipeline stage {self.index} outputs {h.dtype} activations but the stages were "
                                  f"built for {self.dtype}; pass PipelineModel(dtype={h.dtype})")
            balance = self._record(routing)
            if balance is not None:
                h = _AddGradient.apply(h, balance, scale)
            if not self.relay:
                return h
            # passed on as a new tensor: torch may detach a stage's outputs in place after their backward
            # (zero-bubble schedules), which must not reach the input buffer it reuses next step
            return h, (emb if self.first else emb.clone())
        main = _cross_entropy(self.head(self.norm(h)), labels)
        total = main
        depths = self._mtp(h, emb, routing) if self.settings.mtp_weight else []
        if depths:
            mtp = torch.stack([_cross_entropy(lg, depth_targets(labels, k)) for k, lg in enumerate(depths, 1)]).mean()
            total = total + self.settings.mtp_weight * mtp
            self.sums["mtp_loss"] += mtp.detach()
            self.ran["mtp_loss"] = True
        elif emb is not None:  # the embeddings' gradient is zero where no MTP depth read them
            total = _AddGradient.apply(total, emb, 0.0)
        targets = (labels != IGNORE).sum()
        self.sums["main_loss"] += main.detach()
        self.sums["main_nll"] += main.detach() * targets
        self.sums["targets"] += targets
        balance = self._record(routing)
        if balance is not None:
            total = total + balance
        return total * scale

    def _rope(self, seq: int, device: torch.device):
        return self.rope(torch.arange(seq, device=device).unsqueeze(0))

    def _mtp(self, h: torch.Tensor, emb: torch.Tensor, routing: dict[int, Routing]) -> list[torch.Tensor]:
        """`Transformer.mtp_logits` with depth k's embeddings sliced from the ones stage 0 sent (emb[:, k:] is
        the embedding of tokens[:, k:]); adds the MTP blocks' routing to `routing`."""
        out = []
        for k, module in enumerate(self.mtp.values(), start=1):
            s = emb.shape[1] - k
            if s <= 0:
                break
            cos, sin = self._rope(s, h.device)
            h, routed = module(h[:, :s], emb[:, k:], cos, sin)
            if routed is not None:
                routing[module.block.layer_id] = routed
            out.append(self.head(module.norm(h)))
        return out

    def _record(self, routing: dict[int, Routing]) -> torch.Tensor | None:
        """Records a forward's expert loads; returns its balance loss (`Transformer.loss`'s over these layers),
        None without balance_alpha or MoE layers."""
        self.forwards += 1
        add_load(self.loads, {layer: r.load for layer, r in routing.items()})
        alpha = self.settings.balance_alpha
        if not (alpha and routing):
            return None
        balance = alpha * sum(sequence_balance_loss(r.scores, r.indices) for r in routing.values())
        self.sums["balance_loss"] += balance.detach()
        self.ran["balance_loss"] = True
        return balance


def stage_layers(model: Transformer, n_stages: int) -> list[range]:
    """The main layers of each of n_stages stages, split with the MTP modules as units (`stage_split`); the MTP
    modules must all fall on the last stage."""
    cfg = model.cfg
    units = cfg.n_layers + cfg.n_mtp_modules
    if not 2 <= n_stages <= units:
        raise ConfigError(f"a pipeline of {n_stages} stages for {cfg.n_layers} layers + {cfg.n_mtp_modules} MTP "
                          f"modules: every stage needs a block and there must be at least 2 stages; choose "
                          f"parallel.pp (times the stages per rank) between 2 and {units}")
    split = stage_split(units, n_stages)
    if split[-1] < cfg.n_mtp_modules:
        raise ConfigError(f"{n_stages} stages leave the last stage {split[-1]} of the {cfg.n_mtp_modules} MTP "
                          f"modules; they share the head and must sit together: use fewer stages")
    bounds = [sum(split[:i]) for i in range(n_stages + 1)]
    return [range(min(a, cfg.n_layers), min(b, cfg.n_layers)) for a, b in zip(bounds, bounds[1:])]


class PipelineModel(nn.Module):
    """This pp rank's part of a Transformer and the schedule that trains it with the other ranks.

    model: the whole model, built identically on every pp rank (the stages keep references to their modules;
    the rest may be dropped after construction). pp_mesh: a 1-D DeviceMesh over the pipeline ranks (or a
    ProcessGroup). schedule: a key of SCHEDULES. n_microbatches: micro-batches a step's batch is cut into
    (default: the stage count). stages_per_rank: stages each rank holds, 1 for GPipe and 1F1B, >= 2 (default 2)
    for the others. dtype: the dtype of the activations between stages (default the embedding's: fp32 parameters
    keep an fp32 residual stream under autocast; FSDP's bf16 parameters make it bf16). device: where the stages
    run (default the embedding's; pass it where the model was built on the meta device). autocast: a context
    each stage's forward runs under (the trainer's `autocast`): torch's schedule runs forwards and backwards in
    turn, and autocast belongs to the forwards only, so call `step` outside any autocast.

    As a module it holds this rank's parameters under the model's names: `state_dict()` keys are the model's
    (a checkpoint saved at one pp degree loads at another, pp=1 included), `parameters()` are what this rank's
    optimizer steps. `stages` are the per-stage modules, for wrapping (FSDP, activation checkpointing) before the
    first step."""

    def __init__(self, model: Transformer, pp_mesh, schedule: str = "1f1b", n_microbatches: int | None = None,
                 stages_per_rank: int | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None):
        super().__init__()
        key = schedule.lower()
        if key not in SCHEDULES:
            raise ConfigError(f"unknown pipeline schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
        single = key in SINGLE_STAGE
        per_rank = stages_per_rank or (1 if single else 2)
        if single and per_rank != 1 or not single and per_rank < 2:
            raise ConfigError(f"pipeline schedule {schedule!r} runs {'one stage' if single else 'two or more stages'} "
                              f"per rank, got stages_per_rank={per_rank}")
        if n_microbatches is not None and n_microbatches < 1:
            raise ConfigError(f"n_microbatches must be >= 1, got {n_microbatches}")
        if model.cfg.tie_word_embeddings:
            raise ConfigError("pipeline parallelism with tie_word_embeddings: the embedding (first stage) and the "
                              "head (last stage) sit on different ranks; untie them or train with parallel.pp=1")
        self.schedule = key
        self.group = pp_mesh.get_group() if hasattr(pp_mesh, "get_group") else pp_mesh
        self.pp, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.n_microbatches = n_microbatches or self.pp * per_rank
        self.dtype = dtype or model.embed.weight.dtype
        self.device = device or model.embed.weight.device
        self.cfg = model.cfg
        n_stages = self.pp * per_rank
        self.settings = _StepSettings(autocast=autocast or contextlib.nullcontext)
        self.stages = [ModelStage(model, i, n_stages, layers, self.settings, self.dtype)  # looped: i on rank i % pp
                       for i, layers in enumerate(stage_layers(model, n_stages)) if i % self.pp == self.rank]
        # this rank's modules under the model's names
        if self.has_first_stage:
            self.embed = model.embed
        self.layers = nn.ModuleDict({k: v for s in self.stages for k, v in s.layers.items()})
        if self.has_last_stage:
            self.norm, self.head, self.mtp = model.norm, model.head, nn.ModuleDict(
                {str(k): m for k, m in enumerate(model.mtp)})
        self.rope = model.rope
        self._schedules: dict[tuple[int, int, bool], object] = {}  # by (micro-batch rows, seq, training)

    @property
    def has_first_stage(self) -> bool:
        return any(s.first for s in self.stages)

    @property
    def has_last_stage(self) -> bool:
        return any(s.last for s in self.stages)

    def moe_layers(self) -> dict[int, MoE]:
        """This rank's MoE layers by layer id (as `Transformer.moe_layers` numbers them)."""
        return {b.layer_id: b.ffn for s in self.stages for b in s.blocks() if isinstance(b.ffn, MoE)}

    def _schedule(self, tokens: torch.Tensor, labels: torch.Tensor, training: bool):
        """The schedule for batches of tokens' shape: torch's stages, with static metadata for its micro-batches,
        made on first use. Training and evaluation keep apart, as torch's stages set up their buffers for one."""
        if tokens.shape != labels.shape or tokens.dim() != 2:
            raise ConfigError(f"pipeline: tokens and labels must both be [batch, seq], got {tuple(tokens.shape)} "
                              f"and {tuple(labels.shape)}")
        b, seq = tokens.shape
        if b % self.n_microbatches:
            raise ConfigError(f"a batch of {b} rows does not split into {self.n_microbatches} micro-batches; make "
                              f"the batch a multiple of the micro-batch count")
        micro = b // self.n_microbatches
        key = (micro, seq, training)
        if key in self._schedules:
            return self._schedules[key]
        from torch.distributed import pipelining

        n_stages = self.pp * len(self.stages)
        # requires_grad: the gradients of what a stage sends come back (torch derives the backward's buffers)
        hidden = torch.empty(micro, seq, self.cfg.dim, dtype=self.dtype, device="meta", requires_grad=training)
        carried = (hidden, hidden) if self.cfg.n_mtp_modules else (hidden,)
        stages = []
        for s in self.stages:
            inputs = (torch.empty(micro, seq, dtype=torch.long, device="meta"),) if s.first else carried
            outputs = (torch.empty((), device="meta"),) if s.last else carried  # the last stage: its loss
            stages.append(pipelining.PipelineStage(s, s.index, n_stages, self.device, input_args=inputs,
                                                   output_args=outputs, group=self.group))
        schedule = getattr(pipelining, SCHEDULES[self.schedule])
        try:  # the loss is divided by the micro-batch count in the stage (scale_grads=False)
            self._schedules[key] = schedule(stages[0] if self.schedule in SINGLE_STAGE else stages,
                                            n_microbatches=self.n_microbatches, loss_fn=_stage_loss,
                                            scale_grads=False)
        except ValueError as e:  # torch's own checks (micro-batches against stages)
            raise ConfigError(f"pipeline schedule {self.schedule!r} with {self.n_microbatches} micro-batches over "
                              f"{n_stages} stages on {self.pp} ranks: {e}") from e
        return self._schedules[key]

    def _run(self, tokens: torch.Tensor, labels: torch.Tensor, training: bool, mtp_weight: float,
             balance_alpha: float) -> dict[str, float]:
        """One pass of the schedule over the batch; the stages' RECORDS and whether MTP and a balance loss ran,
        summed over this rank's stages and then over the pp ranks."""
        schedule = self._schedule(tokens, labels, training)
        self.settings.mtp_weight, self.settings.balance_alpha = mtp_weight, balance_alpha
        self.settings.n_microbatches = self.n_microbatches
        for s in self.stages:
            s.reset()
        # contiguous: torch checks the first stage's input against the metadata's strides
        args = (tokens.to(self.device).contiguous(),) if self.has_first_stage else ()
        target = labels.to(self.device).contiguous() if self.has_last_stage else None
        kwargs = {"labels": target} if self.has_last_stage else {}
        if training:
            schedule.step(*args, target=target, return_outputs=False, **kwargs)
        else:
            with torch.no_grad():
                schedule.eval(*args, target=target, return_outputs=False, **kwargs)
        for s in self.stages:
            if s.forwards != self.n_microbatches:
                raise RuntimeError(f"pipeline stage {s.index} ran {s.forwards} forwards for {self.n_microbatches} "
                                   f"micro-batches; its loads and balance loss would be wrong")
        values = [sum(torch.as_tensor(s.sums[k], dtype=torch.float64, device=self.device) for s in self.stages)
                  for k in RECORDS]
        values += [torch.tensor(float(any(s.ran[k] for s in self.stages)), dtype=torch.float64, device=self.device)
                   for k in ("mtp_loss", "balance_loss")]
        sums = torch.stack(values)
        dist.all_reduce(sums, group=self.group)
        return dict(zip([*RECORDS, "ran_mtp", "ran_balance"], sums.tolist()))

    def step(self, tokens: torch.Tensor, labels: torch.Tensor, mtp_weight: float = 0.0,
             balance_alpha: float = 0.0) -> tuple[dict[str, float | None], dict[int, torch.Tensor]]:
        """Forward and backward of one optimizer step over the batch tokens/labels [b, s] (the pp ranks of one
        data-parallel coordinate pass the same rows: stage 0 reads tokens, the last stage labels; -100 marks a
        position without a target), accumulating into this rank's .grad. Attention is causal over whole rows
        (pretraining's batches; packed documents with their own positions and mask are not supported here).

        Returns ({"loss", "main_loss", "mtp_loss", "balance_loss"}: means over micro-batches, equal on every pp
        rank; mtp_loss None where no MTP depth ran, balance_loss None without one, as `Transformer.loss`), and
        the tokens per expert of this rank's MoE layers that ran, by layer id, summed over the micro-batches."""
        sums = self._run(tokens, labels, True, mtp_weight, balance_alpha)
        n = self.n_microbatches
        losses = {"main_loss": sums["main_loss"] / n,
                  "mtp_loss": sums["mtp_loss"] / n if sums["ran_mtp"] else None,
                  "balance_loss": sums["balance_loss"] / n if sums["ran_balance"] else None}
        losses["loss"] = (losses["main_loss"] + mtp_weight * (losses["mtp_loss"] or 0.0)
                          + (losses["balance_loss"] or 0.0))
        loads: dict[int, torch.Tensor] = {}
        for s in self.stages:
            add_load(loads, s.loads)
        return losses, loads

    def evaluate(self, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        """The main loss of the batch without gradients (`Transformer.loss(...).main_loss` on the whole batch):
        the mean over its targets, on every pp rank."""
        sums = self._run(tokens, labels, False, 0.0, 0.0)
        return sums["main_nll"] / sums["targets"] if sums["targets"] else math.nan


def _stage_loss(loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The schedule's loss function: the last stage's forward returned the loss already (`ModelStage`)."""
    return loss


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
