"""FP8 training applied from outside the model: `convert_to_fp8` swaps the GEMMs of the transformer blocks.

What DeepSeek-V3 computes in FP8 (its report, section 3.3): the linear layers of the blocks, which are MLA's
projections (wq or wq_a/wq_b, wkv_a, wkv_b, wo), the dense and shared-expert SwiGLUs and the routed experts'
grouped GEMMs. What it keeps in higher precision, and so does this: the embedding, the output head, every
norm, the MoE router (its fp32 gate), attention itself (scores, softmax, values) and, outside the blocks, the
MTP modules' eh_proj. MLA's absorbed path, which reads wkv_b's weight directly, is inference's and stays in
the weight's precision.

Only compute changes: a converted module keeps its parameters (the same tensors, fp32 masters and all), their
names and its state dict, so checkpoints, the optimizer and Hugging Face export see no difference.
"""

from __future__ import annotations

import torch
from torch import nn

from seekforge.errors import ConfigError
from seekforge.fp8.gemm import fp8_grouped_linears, fp8_linear, fp8_linears, grouped_kernels
from seekforge.model.fp8_weights import has_fp8_weights
from seekforge.model.moe import Experts
from seekforge.model.transformer import Transformer
from seekforge.ops.blockwise_mm import scaled_mm_layout

RECIPES = ("none", "blockwise")


class FP8Linear(nn.Linear):
    """An nn.Linear (no bias) whose forward, input-gradient and weight-gradient GEMMs run in FP8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight)

    @staticmethod
    def projections(x: torch.Tensor, linears) -> tuple[torch.Tensor, ...]:
        """Several FP8Linears of one input x (`seekforge.ops.projections`' hook): x quantised once for all."""
        return fp8_linears(x, [linear.weight for linear in linears])


class FP8Experts(Experts):
    """Routed experts whose three grouped GEMMs run in FP8; w1 and w3, which read the same rows, in one."""

    def matmul(self, x, weights, offsets, expert_of_row):
        return fp8_grouped_linears(x, weights, offsets, expert_of_row)


def check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ConfigError(f"fp8 must be one of {', '.join(RECIPES)}, got {recipe!r}")


def convert_gemms(module: nn.Module) -> nn.Module:
    """Swaps the linear layers and routed experts inside `module` (one block, or a part of one: the MoE layer the
    benchmark times) for their FP8 forms, in place; returns it. The gate's fp32 weight is a parameter, not a linear
    layer, so the router stays as it is."""
    for sub in module.modules():
        if type(sub) is nn.Linear:
            if sub.bias is not None:
                raise ConfigError("fp8: a linear layer with a bias cannot be converted (the blockwise recipe "
                                  "covers bias-free layers, as DeepSeek-V3's are)")
            sub.__class__ = FP8Linear
        elif type(sub) is Experts:
            sub.__class__ = FP8Experts
    return module


def convert_to_fp8(model: Transformer, recipe: str = "blockwise") -> Transformer:
    """Converts the GEMMs of every main and MTP block in place (see the module docstring); returns the model.
    recipe "none" leaves it as it is. Call it after moving the model to its device and before torch.compile:
    on CUDA it settles there whether torch._scaled_mm runs the block scalings (with a warning where not) and loads
    the experts' Triton kernels (ConfigError where the current choice leaves them off: see `grouped_kernels`)."""
    check_recipe(recipe)
    if recipe == "none":
        return model
    if has_fp8_weights(model):
        raise ConfigError("fp8: this model's weights are FP8 inference weights (loaded with fp8_weights); train "
                          "from a 16-bit or fp32 model: load the checkpoint without fp8_weights")
    for block in model.blocks():
        convert_gemms(block)
    device = next(model.parameters()).device
    for blocks in (True, False):
        scaled_mm_layout(device, blocks)
    if any(isinstance(m, FP8Experts) for m in model.modules()):
        grouped_kernels(device)  # imports the expert GEMMs' kernels before a trace could; ConfigError where none
    return model
