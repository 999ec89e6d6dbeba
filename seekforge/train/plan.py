"""Sizing a distributed training run on paper: per-GPU memory and per-step communication of a parallel layout.

Arithmetic, not measurement. The layout follows PyTorch's stack: the world is dp_replicate x dp_shard x tp x pp
ranks; expert parallelism (ep) is carved out of dp_shard (`seekforge.parallel.config`: each routed expert lives
on one of ep ranks, is sharded over the dp_shard/ep ranks holding the same experts and replicated over tp), the
layout training runs. Memory is counted for the heaviest pipeline stage; communication is what one GPU sends per
optimizer step (ring collectives: an all-gather or a reduce-scatter of N bytes over g ranks sends N*(g-1)/g per
rank, an all-reduce twice that).

Precisions are choices (`Precision`). DeepSeek-V3 trained with a bf16 compute copy (FP8 GEMMs cast on the fly),
fp32 gradients, fp32 master weights and bf16 AdamW moments, and ZeRO-1 data parallelism (optimizer states
sharded, parameters and gradients not): `Precision(moments="bf16")` with `zero=1`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from seekforge.errors import ConfigError
from seekforge.model.config import ModelConfig
from seekforge.parallel.config import ParallelConfig
from seekforge.parallel.pipeline import stage_split

Dtype = Literal["fp32", "bf16"]
BYTES = {"fp32": 4, "bf16": 2}
GB = 1e9


@dataclass
class Precision:
    params: Dtype = "bf16"  # the compute copy the forward reads
    grads: Dtype = "fp32"  # gradients accumulated and reduce-scattered
    master: Literal["fp32", "none"] = "fp32"  # fp32 master weights the optimizer updates ("none": params are them)
    moments: Dtype = "fp32"  # AdamW m and v (DeepSeek-V3: bf16)


@dataclass
class PlanConfig:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # activation_checkpointing included
    precision: Precision = field(default_factory=Precision)
    zero: int = 3  # 3: FSDP2 fully_shard (params, grads, optimizer sharded); 2: grads+optimizer; 1: optimizer
    seq_len: int = 4096
    micro_batch: int = 1  # sequences per micro-batch per data-parallel rank
    micro_batches: int = 0  # micro-batches per step per data-parallel rank (0: pp, the fewest a schedule fills)


# ---------------------------------------------------------------- parameter counts
def attention_params(cfg: ModelConfig) -> int:
    h = cfg.n_heads
    q = (cfg.dim * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim if cfg.q_lora_rank
         else cfg.dim * h * cfg.qk_head_dim)
    kv = (cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
          + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    return q + kv + h * cfg.v_head_dim * cfg.dim


def block_params(cfg: ModelConfig, layer_id: int) -> tuple[int, int]:
    """(non-expert parameters, routed-expert parameters) of one block: two norms, MLA, dense MLP or MoE."""
    dense = 2 * cfg.dim + attention_params(cfg)
    if not cfg.is_moe_layer(layer_id):
        return dense + 3 * cfg.dim * cfg.inter_dim, 0
    shared = 3 * cfg.dim * cfg.n_shared_experts * cfg.moe_inter_dim
    return dense + cfg.n_routed_experts * cfg.dim + shared, cfg.n_routed_experts * 3 * cfg.dim * cfg.moe_inter_dim


def total_params(cfg: ModelConfig) -> int:
    """What `Transformer(cfg).num_parameters()["total"]` counts, from the shapes alone."""
    return sum(sum(unit) for unit in _units(cfg))


def _units(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(non-expert, expert) parameters of each pipeline unit: main blocks, then MTP modules; the embedding counts
    with the first block, the final norm and head with the last main block."""
    units = [list(block_params(cfg, i)) for i in range(cfg.n_layers + cfg.n_mtp_modules)]
    for k in range(cfg.n_mtp_modules):  # enorm, hnorm, eh_proj [dim, 2 dim], its own final norm
        units[cfg.n_layers + k][0] += 3 * cfg.dim + 2 * cfg.dim * cfg.dim
    units[0][0] += cfg.vocab_size * cfg.dim
    units[cfg.n_layers - 1][0] += cfg.dim + (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.dim)
    return [tuple(u) for u in units]


# ---------------------------------------------------------------- validation
def resolve(cfg: ModelConfig, plan: PlanConfig, gpus: int) -> ParallelConfig:
    """The degrees with dp_shard filled in, checked against the world size and the model (the checks training
    makes, `ParallelConfig.resolve`), and the plan's own settings."""
    par = plan.parallel.resolve(gpus, cfg, world_name="--gpus")
    if plan.zero not in (1, 2, 3):
        raise ConfigError(f"zero must be 1, 2 or 3, got {plan.zero}")
    if plan.seq_len < 1 or plan.micro_batch < 1 or plan.micro_batches < 0:
        raise ConfigError("seq_len and micro_batch must be positive and micro_batches >= 0")
    return par


# ---------------------------------------------------------------- activations
def block_activation_elements(cfg: ModelConfig, layer_id: int, tokens: int, tp: int) -> int:
    """Elements autograd keeps for one block's backward over `tokens` tokens (fused attention: no score matrix;
    head- and width-split tensors divided by tp). An estimate of the tensors saved, not a trace."""
    h = cfg.n_heads // tp
    attn = 2 * cfg.dim + (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    attn += 2 * cfg.q_lora_rank + h * cfg.qk_head_dim  # query latent and its norm; per-head queries
    attn += h * (cfg.qk_nope_head_dim + cfg.v_head_dim) + h * cfg.qk_head_dim + h * cfg.v_head_dim  # kv_b, keys, out
    ffn = 2 * cfg.dim
    if not cfg.is_moe_layer(layer_id):
        ffn += 3 * cfg.inter_dim // tp
    else:  # router scores; each token's k routed copies (input, w1, w3, act); the shared experts
        ffn += cfg.n_routed_experts + cfg.n_activated_experts * (cfg.dim + 3 * cfg.moe_inter_dim)
        ffn += 3 * cfg.n_shared_experts * cfg.moe_inter_dim // tp
    return tokens * (attn + ffn)


def block_matmul_elements(cfg: ModelConfig, layer_id: int, tokens: int, tp: int) -> int:
    """Elements of one block's matmul and attention outputs over `tokens` tokens (what selective checkpointing
    keeps besides the block's input; head- and width-split tensors divided by tp). An estimate, as
    block_activation_elements."""
    h = cfg.n_heads // tp
    attn = cfg.q_lora_rank + h * cfg.qk_head_dim + cfg.kv_lora_rank + cfg.qk_rope_head_dim  # query, latent
    attn += h * (cfg.qk_nope_head_dim + cfg.v_head_dim) + h * cfg.v_head_dim + cfg.dim  # kv_b, attention, wo
    if not cfg.is_moe_layer(layer_id):
        ffn = 2 * cfg.inter_dim // tp + cfg.dim
    else:  # router logits; each token's k routed copies (w1, w3, w2); the shared experts
        ffn = cfg.n_routed_experts + cfg.n_activated_experts * (2 * cfg.moe_inter_dim + cfg.dim)
        ffn += 2 * cfg.n_shared_experts * cfg.moe_inter_dim // tp + cfg.dim
    return tokens * (attn + ffn)


# ---------------------------------------------------------------- the plan
@dataclass
class Stage:
    index: int
    blocks: int
    memory: dict[str, float]  # bytes per GPU by kind


def _ring(nbytes: float, group: int, all_reduce: bool = False) -> float:
    return (2 if all_reduce else 1) * nbytes * (group - 1) / group


def plan(cfg: ModelConfig, config: PlanConfig, gpus: int) -> dict:
    """Per-stage memory per GPU (bytes), and bytes one GPU sends per step along each parallel dimension."""
    par = resolve(cfg, config, gpus)
    prec = config.precision
    pb, gb, mb = BYTES[prec.params], BYTES[prec.grads], BYTES[prec.moments]
    master = 0 if prec.master == "none" else 4
    tokens = config.seq_len * config.micro_batch
    n_micro = config.micro_batches or par.pp
    units = _units(cfg)
    split = stage_split(len(units), par.pp)
    dense_dp, expert_dp = par.dp_shard, par.dp_shard // par.ep
    act_bytes = 2  # bf16 activations
    stages, start = [], 0
    for s, n in enumerate(split):
        ids = range(start, start + n)
        start += n
        dense = sum(units[i][0] for i in ids) / par.tp
        expert = sum(units[i][1] for i in ids) / par.ep
        shard_p = config.zero >= 3
        shard_g = config.zero >= 2
        local = lambda count, sharded, dp: count / dp if sharded else count  # noqa: E731
        mem = {
            "parameters": pb * (local(dense, shard_p, dense_dp) + local(expert, shard_p, expert_dp)),
            "gradients": gb * (local(dense, shard_g, dense_dp) + local(expert, shard_g, expert_dp)),
            "optimizer": (2 * mb + master) * (dense / dense_dp + expert / expert_dp),
        }
        if shard_p:  # one block's parameters gathered whole while it runs
            mem["parameters"] += pb * max(units[i][0] / par.tp + units[i][1] / par.ep for i in ids)
        per_block = [block_activation_elements(cfg, i, tokens, par.tp) for i in ids]
        in_flight = min(par.pp - s, n_micro)  # 1F1B: stage s holds pp - s micro-batches' activations
        if par.activation_checkpointing == "selective":  # block inputs and matmul outputs kept, the rest rebuilt
            kept = sum(block_matmul_elements(cfg, i, tokens, par.tp) for i in ids)
            held = in_flight * (n * tokens * cfg.dim + kept) + max(per_block)
        elif par.activation_checkpointing:  # block inputs kept, one block's activations rebuilt at a time
            held = in_flight * n * tokens * cfg.dim + max(per_block)
        else:
            held = in_flight * sum(per_block)
        if s == par.pp - 1:  # fp32 logits of the head and each MTP depth for the loss
            held += 2 * tokens * (1 + cfg.n_mtp_modules) * cfg.vocab_size / par.tp
        mem["activations"] = act_bytes * held
        stages.append(Stage(s, n, mem))

    heaviest = max(stages, key=lambda st: sum(st.memory.values()))
    hs = split[heaviest.index]
    h_ids = range(sum(split[:heaviest.index]), sum(split[:heaviest.index]) + hs)
    dense = sum(units[i][0] for i in h_ids) / par.tp
    expert = sum(units[i][1] for i in h_ids) / par.ep
    moe_blocks = sum(1 for i in h_ids if cfg.is_moe_layer(i))
    comm = {}
    param_bytes = pb * dense, pb * expert
    grad_bytes = gb * dense, gb * expert
    if config.zero >= 3:  # gather forward and backward every micro-batch, reduce-scatter once a step
        gathers = 2 * n_micro
    else:  # gather the updated shards once a step
        gathers = 1
    comm["fsdp all-gather (dp_shard)"] = gathers * (_ring(param_bytes[0], dense_dp) + _ring(param_bytes[1], expert_dp))
    comm["fsdp reduce-scatter (dp_shard)"] = _ring(grad_bytes[0], dense_dp) + _ring(grad_bytes[1], expert_dp)
    comm["hsdp all-reduce (dp_replicate)"] = _ring(grad_bytes[0] / dense_dp + grad_bytes[1] / expert_dp,
                                                   par.dp_replicate, all_reduce=True)
    # two all-reduces of the [tokens, dim] activations per block forward (attention, FFN), two backward
    comm["tp all-reduce (tp)"] = n_micro * hs * 4 * _ring(act_bytes * tokens * cfg.dim, par.tp, all_reduce=True)
    comm["ep all-to-all (ep)"] = n_micro * moe_blocks * 4 * all_to_all_bytes(cfg, tokens, par.ep, act_bytes)
    # activations forward, their gradients backward, at each stage boundary
    comm["pp send/recv (pp)"] = 0.0 if par.pp == 1 else n_micro * 2 * act_bytes * tokens * cfg.dim
    return {"parallel": par, "split": split, "stages": stages, "heaviest": heaviest, "communication": comm,
            "micro_batches": n_micro, "total_params": sum(sum(u) for u in units)}


def all_to_all_bytes(cfg: ModelConfig, tokens: int, ep: int, element_bytes: int = 2) -> float:
    """Bytes one rank sends in one all-to-all (dispatch or combine) of one MoE block: each of `tokens` tokens goes
    to its top-k experts, a `dim`-wide row each, and with balanced routing (ep-1)/ep of the rows leave the rank.
    A block's forward and backward make four: dispatch and combine, each way."""
    return tokens * cfg.n_activated_experts * cfg.dim * element_bytes * (ep - 1) / ep
