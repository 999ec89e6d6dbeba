"""Parallelism applied to a model from outside it (torchtitan's order): tensor parallelism (seekforge.parallel.tensor,
over the dense mesh's "tp"), then expert parallelism (seekforge.parallel.expert, over the sparse mesh's "ep"), then
activation checkpointing (full or selective), then torch.compile, then FSDP2. The model's code knows none of it;
parameter names (checkpoints, Hugging Face export) stay as they are. With parallel.pp > 1 the model is cut into
pipeline stages after tensor and expert parallelism (seekforge.parallel.pipeline.PipelineModel: 1F1B, as many
micro-batches as stages) and what follows applies to this rank's stages; `parallelize` returns the PipelineModel,
whose parameters and state dict are this rank's, under the model's names.

FSDP2 units (per pipeline stage when pipelined, the stage taking the root's part): with expert parallelism, each
MoE's routed experts over the ranks that hold the same experts (`Mesh.expert_fsdp`, FSDP2's default mean:
expert.py's gradient rule, no extra factor); each main block, each MTP module's block, and the root (embedding,
final norm, head and the MTP modules' own norms and projection, which `Transformer.mtp_logits` uses outside the
MTP module's forward). `Transformer.loss` and `Transformer.logits_at` (GRPO's) are registered as forward methods, so
the root's parameters are gathered for them as for `forward`. Mixed precision keeps fp32 master weights and reduces gradients in fp32; in bf16 the
parameters are gathered in bf16 for compute, but the MoE routers (their own units) in fp32 as DeepSeek-V3 keeps
them; in fp32 everything is fp32 and the result is the single-process one up to the order of summation (without
autocast, parameters of another dtype are gathered and reduced in it).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from seekforge.errors import ConfigError
from seekforge.model.moe import MoE
from seekforge.model.transformer import Transformer
from seekforge.parallel.compile import compile_blocks
from seekforge.parallel.config import ParallelConfig
from seekforge.parallel.expert import ExpertParallel, apply_expert_parallel
from seekforge.parallel.mesh import Mesh
from seekforge.parallel.pipeline import PipelineModel
from seekforge.parallel.tensor import apply_tensor_parallel


def blocks(model: Transformer | PipelineModel) -> list[torch.nn.Module]:
    """The transformer blocks: the main layers, then each MTP module's block (a PipelineModel: its stages')."""
    if isinstance(model, PipelineModel):
        return [b for stage in model.stages for b in stage.blocks()]
    return model.blocks()


def parallelize(model: Transformer, mesh: Mesh | None, layout: ParallelConfig, compute_dtype: torch.dtype | None = None,
                compile: bool = False) -> Transformer | PipelineModel:
    """Apply `layout` to `model` in place (FP8 conversion, when wanted, comes before; it does not combine with tp):
    tensor parallelism, expert parallelism, activation checkpointing per block, torch.compile per block
    (`compile`), FSDP2 over the mesh's data-parallel ranks (`mesh` None: a single process, nothing to split or
    shard). `compute_dtype`: bf16 when training under bf16 autocast, else None. Returns the model, or with
    parallel.pp > 1 this rank's PipelineModel."""
    if mesh is not None:
        apply_tensor_parallel(model, mesh.dense["tp"])
        apply_expert_parallel(model, mesh.sparse["ep"])
    if layout.pp > 1:
        if compile:
            raise ConfigError("compile=true with parallel.pp > 1: torch.compile of pipeline stages is not wired; "
                              "set compile=false or parallel.pp=1")
        model = PipelineModel(model, mesh.dense["pp"], schedule="1f1b")
    if layout.activation_checkpointing:
        checkpoint_blocks(model, selective=layout.activation_checkpointing == "selective")
    if compile:
        compile_blocks(model, compute_dtype)
    if mesh is not None:
        shard(model, mesh, compute_dtype)
    return model


def _kept_ops() -> list:
    """The ops whose outputs selective checkpointing keeps: the matmuls (dense, batched, grouped: the experts)
    and fused attention, the work that recomputing would cost most."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu"]
    return [getattr(aten, name).default for name in names if hasattr(aten, name)]


def checkpoint_blocks(model: Transformer | PipelineModel, selective: bool = False) -> None:
    """Each block keeps only its inputs for the backward and recomputes the rest there (torch.utils.checkpoint,
    non-reentrant); `selective`: it keeps the outputs of its matmuls and attention too and recomputes only the
    elementwise work (torch's op-level selective checkpointing). The block's forward is wrapped in place, so
    its parameters keep their names."""
    options = {}
    if selective:
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _kept_ops())
    for block in blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, **options)


def shard(model: Transformer | PipelineModel, mesh: Mesh, compute_dtype: torch.dtype | None = None) -> None:
    """FSDP2 (`fully_shard`): expert-parallel experts over `mesh.expert_fsdp`, then each block and the root over
    `mesh.fsdp` (see the module doc). Gradients are reduced in fp32 under mixed precision (the parameters, fp32,
    gathered in `compute_dtype`); without it they are reduced in the parameters' own dtype, that of the gradients,
    so that no cast into and out of a wider reduction buffer is paid for nothing. Each unit is freed after its
    forward and gathered again for its backward, except the last block's, whose backward follows at once (the
    root's, as FSDP2 does for a root, is kept too)."""
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype,
                                  reduce_dtype=None if compute_dtype is None else torch.float32)
    router = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    units = blocks(model)
    for block in units:
        if isinstance(block.ffn, MoE) and isinstance(block.ffn.experts, ExpertParallel):
            fully_shard(block.ffn.experts, mesh=mesh.expert_fsdp, mp_policy=policy)
        if compute_dtype is not None and isinstance(block.ffn, MoE):
            fully_shard(block.ffn.gate, mesh=mesh.fsdp, mp_policy=router)
        fully_shard(block, mesh=mesh.fsdp, mp_policy=policy, reshard_after_forward=block is not units[-1])
    if isinstance(model, PipelineModel):
        for stage in model.stages:
            fully_shard(stage, mesh=mesh.fsdp, mp_policy=policy)
        return
    fully_shard(model, mesh=mesh.fsdp, mp_policy=policy)
    for method in ("loss", "logits_at"):
        register_fsdp_forward_method(model, method)


def gathered(model: Transformer | PipelineModel, mesh: Mesh | None) -> Transformer | None:
    """The whole model on one process, for export: `model` itself in a single process; in a distributed run (a
    collective: every rank calls it) a plain copy on rank 0's CPU, None on the other ranks. A PipelineModel's
    stages are gathered whole on their ranks, then their parts sent to rank 0."""
    if mesh is None:
        return model
    if isinstance(model, PipelineModel):
        mine = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object({k: v.cpu() for k, v in mine.items()}, parts, dst=0)
        state = {k: v for part in parts or () for k, v in part.items()}
    else:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:
        return None
    with torch.device("meta"):
        whole = Transformer(model.cfg)
    whole.load_state_dict(state, assign=True)
    whole.rope.to_empty(device="cpu").reset_parameters()  # non-persistent: not in the state dict
    return whole
