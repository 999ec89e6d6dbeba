"""Tensor parallelism for the DeepSeek-V3 model, on DTensor (`torch.distributed.tensor.parallel`), applied to the
model from outside.

`apply_tensor_parallel(model, tp_mesh)` splits, in every main and MTP block:

- MLA by heads: the per-head up-projections (wq, or wq_b under a query LoRA, and wkv_b) column-wise, so each tp
  rank holds n_heads / tp whole heads and attends with them alone; wo row-wise, its partial sums all-reduced. The
  low-rank down-projections (wq_a, wkv_a) and their norms are narrow and feed every head: they stay whole.
- the dense SwiGLU MLPs and the MoE's shared experts: w1 and w3 column-wise, w2 row-wise.

Kept whole on every tp rank and computed by each: the embedding, the output head, every norm, the MTP modules'
eh_proj, and the MoE's gate and routed experts. The gate must score each token's full hidden state and choose the
same experts on every rank, so that the ranks agree on the routing, the expert load (the bias update) and the
balance loss; the routed experts are many and narrow, and their cut is expert parallelism's
(`seekforge.parallel.expert`): whole experts on different ranks, tokens moved by all-to-all, not a split of each
expert's width.

Between modules flow plain tensors, replicated over the tp ranks, except inside attention (the rank's heads) and
inside an MLP (the rank's share of its width). Each block all-reduces twice in forward, a [tokens, dim] sum of
partial outputs (wo's, and w2's of its MLP or shared experts), and four times in backward, each a gradient at
the input of a column-wise split: the query's (q_lora_rank wide, or dim without a query LoRA), the latent's
(kv_lora_rank), the MLP's (dim; w1 and w3 reduced together) and the rotary key's (qk_rope_head_dim). The last
one is MLA's own: the one rotary key every head shares (`MLA.latent`) gets from each rank's heads only their part
of its gradient, summed over the tp ranks before it reaches wkv_a (`SumRopeKeyGrad`).

Parameters keep their names: the split projections' weights become DTensors on tp_mesh (Shard(0) column-wise,
Shard(1) row-wise), which torch.distributed.checkpoint saves as shards and reshards on load; every other
parameter stays a plain tensor, the same on every tp rank since every rank computes the same gradient for it.
Such a mix of kinds is refused by AdamW's foreach and fused steps (one list of DTensors and tensors) until
fully_shard makes every parameter a DTensor, and clip_grad_norm_ refuses norms of DTensors on different meshes
(dp x tp and dp after fully_shard): sum the squared norms of each mesh's gradients apart.

Training only: MLA's absorbed path (`Backend(absorbed=True)`, the inference engine's) reads wkv_b's weight whole
and raises a ConfigError on a tensor-parallel model.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               parallelize_module)

from seekforge.errors import ConfigError
from seekforge.model.block import Block
from seekforge.model.config import ModelConfig
from seekforge.model.mla import MLA
from seekforge.model.mlp import MLP
from seekforge.model.transformer import Transformer


def split_widths(cfg: ModelConfig) -> dict[str, int]:
    """The widths tensor parallelism splits, by what a user sets: the attention heads, and the widths of the
    dense SwiGLU and of the shared experts where the model has them."""
    widths = {"n_heads": cfg.n_heads}
    if cfg.n_dense_layers or not cfg.n_routed_experts:
        widths["inter_dim"] = cfg.inter_dim
    if cfg.n_routed_experts and cfg.n_shared_experts:
        widths["n_shared_experts * moe_inter_dim"] = cfg.n_shared_experts * cfg.moe_inter_dim
    return widths


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """ConfigError where tp does not split the model evenly (`split_widths`), naming the degrees that do."""
    widths = split_widths(cfg)
    uneven = [f"{name}={width}" for name, width in widths.items() if width % tp]
    if uneven:
        fits = [d for d in range(1, cfg.n_heads + 1) if all(w % d == 0 for w in widths.values())]
        raise ConfigError(f"parallel.tp={tp} does not divide the model's {', '.join(uneven)}: tensor parallelism "
                          f"gives each rank an equal share of the attention heads and of the dense and shared-"
                          f"expert widths; set parallel.tp to one of {', '.join(map(str, fits))}")


class SumRopeKeyGrad(ParallelStyle):
    """For MLA's wkv_a, kept whole: an identity in forward on its output whose backward sums, over the tp ranks,
    the gradient of the output's last `rope_dim` columns, the rotary key that every head shares. Each rank's heads
    contribute only their part of that gradient; the latent's columns need no sum, wkv_b's column-wise split
    already all-reduces theirs."""

    def __init__(self, rope_dim: int):
        super().__init__()
        self.rope_dim = rope_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def hook(_module, _inputs, out: torch.Tensor) -> torch.Tensor:
            latent, rope_key = out.split([out.shape[-1] - self.rope_dim, self.rope_dim], dim=-1)
            rope_key = DTensor.from_local(rope_key, device_mesh, [Replicate()], run_check=False)
            return torch.cat([latent, rope_key.to_local(grad_placements=[Partial()])], dim=-1)

        module.register_forward_hook(hook)
        return module


def _mlp_plan(prefix: str) -> dict[str, ParallelStyle]:
    # one replicated DTensor input for w1 and w3: their input gradients add up as partial sums, all-reduced once
    return {prefix: PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),),
                                       use_local_output=False),
            f"{prefix}.w1": ColwiseParallel(), f"{prefix}.w3": ColwiseParallel(), f"{prefix}.w2": RowwiseParallel()}


def block_plan(block: Block) -> dict[str, ParallelStyle]:
    """The parallelize_module plan of one block, by submodule name."""
    attn = block.attn
    plan = {"attn.wq_b" if hasattr(attn, "wq_a") else "attn.wq": ColwiseParallel(),
            "attn.wkv_a": SumRopeKeyGrad(attn.rope_dim),
            "attn.wkv_b": ColwiseParallel(),
            "attn.wo": RowwiseParallel()}
    if isinstance(block.ffn, MLP):
        plan.update(_mlp_plan("ffn"))
    elif block.ffn.shared_experts is not None:
        plan.update(_mlp_plan("ffn.shared_experts"))
    return plan


_BACKEND_ARG = list(inspect.signature(MLA.forward).parameters).index("backend") - 1  # position after self


def _refuse_absorbed(mla: MLA, args: tuple, kwargs: dict) -> None:
    backend = args[_BACKEND_ARG] if len(args) > _BACKEND_ARG else kwargs.get("backend")
    if getattr(backend, "absorbed", False):
        raise ConfigError("absorbed MLA (Backend(absorbed=True), the inference engine's path) reads wkv_b's weight "
                          "whole, and tensor parallelism splits it by heads: run a tensor-parallel model with the "
                          "explicit path (the default backend), or serve an unsplit copy of its weights")


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> Transformer:
    """Splits every block of `model` (main and MTP, wherever it sits: a pipeline stage's part of the model, a block
    wrapped for activation checkpointing) in place over the 1-D mesh `tp_mesh` and returns the model; a mesh of
    one rank leaves it as it is. Every rank of the mesh must pass the same model (same seed, or the same
    checkpoint): the split weights are cut from the mesh's first rank's, the whole ones stay each rank's own.
    Apply it before torch.compile and fully_shard (on a 2-D dp x tp mesh, FSDP2 shards the DTensors along dp), and
    not to a model converted to FP8, whose GEMMs take no DTensors."""
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel takes the 1-D tp mesh, got a {tp_mesh.ndim}-D mesh; pass mesh['tp']")
    tp = tp_mesh.size()
    check_tensor_parallel(model.cfg, tp)
    if tp == 1:
        return model
    plans = {block: block_plan(block) for block in model.modules() if isinstance(block, Block)}
    for block, plan in plans.items():  # all checked before any is split
        for name in plan:
            module = block.get_submodule(name)
            if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
                raise ConfigError(f"tensor parallelism splits plain linear layers, but {name} of layer "
                                  f"{block.layer_id} is a {type(module).__name__}: fp8 and parallel.tp > 1 do not "
                                  f"combine; set fp8=none or parallel.tp=1")
    for block, plan in plans.items():
        parallelize_module(block, tp_mesh, plan)
        block.attn.register_forward_pre_hook(_refuse_absorbed, with_kwargs=True)
    return model
