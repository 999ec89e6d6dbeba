"""FP8 weights for inference, applied to a model from outside: DeepSeek's checkpoint format kept in memory.

A converted weight is float8_e4m3fn with one fp32 scale per 128x128 block beside it (`weight_scale_inv`: value =
q * scale; the blocks at an edge whose size is not a multiple of 128 are partial), as DeepSeek-V3/R1's released
checkpoints store it: one byte a parameter plus 4 bytes per 16384, about half of bf16
(`seekforge.ops.quant.quantise_blocks` makes the blocks).

`to_fp8_weights` converts, in every main and MTP block: MLA's projections (wq or wq_a and wq_b, wkv_a, wo) and the
dense and shared-expert SwiGLUs (`FP8WeightLinear`), and the routed experts (`FP8WeightExperts`). It keeps in the
model's dtype the embedding, the head, the norms, the router's gate, the MTP modules' eh_proj, and MLA's wkv_b,
whose weight the absorbed attention reads directly as per-head matrices (W_UK, W_UV): under 1% of a block's
parameters at 16b and 671b.

Compute: `FP8WeightLinear` calls `ops.fp8_linear`: on CUDA the Triton FP8 GEMV for decode's few rows, and for more
(prefill, large decode batches) the input quantised in 1x128 tiles and the blockwise FP8 GEMM (torch._scaled_mm)
against the stored e4m3 weight and its scales, kept zero-padded to the shapes the GEMM takes (the weight and its
scales are views of them, in the checkpoint's shapes). Projections of one input (MLA's wq or wq_a with wkv_a, a
SwiGLU's w1 with w3) run together (`ops.projections`), the input quantised once. The engine's MoE blocks
(`ops.moe_forward`) run decode's routed experts, with the shared ones, in the fused Triton MoE kernels, which read the
e4m3 weights and their scales as they are; elsewhere (prefill's many rows) `FP8WeightExperts` quantise the sorted
rows in 1x128 tiles and run FP8 training's grouped GEMM kernel (`fp8_grouped_mm`) against the stored expert weights.
Neither re-quantises a weight.
The reference, on the CPU, with `ops.backend("torch")`, and under autograd: each weight dequantised into the
input's dtype (for the experts, with fewer (token, expert) rows than experts, each row's expert matrix alone,
gathered, then one small matmul a row; otherwise every expert of the layer, then the model's grouped matmul).

Names follow DeepSeek's checkpoints (`wq.weight` with `wq.weight_scale_inv`; stacked experts `w1` with
`w1_scale_inv`), so `seekforge.model.hf` saves and loads them in that layout. These are inference weights: no
gradients, and casting the model's dtype after converting (model.to(torch.bfloat16)) would cast them too; set
the dtype first.
"""

from __future__ import annotations

import torch
from torch import nn

from seekforge.errors import ConfigError
from seekforge.model.moe import Experts, grouped_linear
from seekforge.model.transformer import Transformer
from seekforge.ops import fp8_linear, fp8_projections
from seekforge.ops.blockwise_mm import GROUPED, pad_weight
from seekforge.ops.quant import BLOCK, FP8, cdiv, dequantise_blocks, quantise_blocks, quantise_rows

# config.json's quantization_config of a checkpoint with these weights (DeepSeek-V3's)
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [BLOCK, BLOCK]}
SCALE_SUFFIX = "_scale_inv"  # a weight's block scales: its name with this suffix
EXPERT_WEIGHTS = ("w1", "w2", "w3")


def _quantised(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., n, k] -> (e4m3 [..., n, k], fp32 scales [..., n/128, k/128] rounded up); stacked experts one at
    a time (quantising goes through fp32); left uninitialised on the meta device (a loader fills them)."""
    *lead, n, k = weight.shape
    q = torch.empty(weight.shape, dtype=FP8, device=weight.device)
    s = torch.empty(*lead, cdiv(n, BLOCK), cdiv(k, BLOCK), dtype=torch.float32, device=weight.device)
    if not weight.is_meta:
        with torch.no_grad():
            for i in range(weight[..., 0, 0].numel()):
                q.view(-1, n, k)[i], s.view(-1, *s.shape[-2:])[i] = quantise_blocks(weight.reshape(-1, n, k)[i])
    return q, s


class FP8WeightLinear(nn.Module):
    """A bias-free linear layer whose weight [out, in] is e4m3 with 128x128 block scales (`weight_scale_inv`). Both are
    views of `gemm_operands`: the same zero-padded to the shapes the blockwise FP8 GEMM takes (`pad_weight`), made
    here and again where the module moves (`_apply`), so that no call pads them; a loader copies into the views,
    which keep the checkpoint's shapes."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, s = _quantised(weight)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale_inv", s)
        self._pad()

    def _pad(self) -> None:
        """Makes `gemm_operands` from the weight and its scales, and the two views of them."""
        n, k = self.out_features, self.in_features
        w, s = self.gemm_operands = pad_weight(self.weight.detach(), self.weight_scale_inv)
        self.weight = nn.Parameter(w[:n, :k], requires_grad=False)
        self.weight_scale_inv = s[:cdiv(n, BLOCK), :cdiv(k, BLOCK)]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._pad_if_replaced()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._pad_if_replaced()  # load_state_dict(assign=True) puts the loaded tensors in place of the views

    def _pad_if_replaced(self) -> None:
        if self.weight.is_meta or self.weight.data_ptr() != self.gemm_operands[0].data_ptr():  # new tensors
            self._pad()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.gemm_operands)

    @staticmethod
    def projections(x: torch.Tensor, linears) -> tuple[torch.Tensor, ...]:
        """Several of one input x (`seekforge.ops.projections`' hook): `fp8_projections`, x quantised once."""
        return fp8_projections(x, [(linear.weight, linear.weight_scale_inv, linear.gemm_operands)
                                   for linear in linears])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 128x128 blocks"


class FP8WeightExperts(Experts):
    """Routed experts whose stacked w1, w2, w3 are e4m3 with 128x128 block scales per expert (`w1_scale_inv`, ...),
    multiplied by the FP8 grouped GEMM or dequantised where each grouped matmul runs (the module docstring)."""

    def stacked(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The e4m3 weights, which `matmul` multiplies in FP8 or dequantises; under autocast, which would cast them
        without their scales, all of them dequantised into `dtype` here."""
        weights = tuple(getattr(self, n) for n in EXPERT_WEIGHTS)
        if not torch.is_autocast_enabled(self.w1.device.type):
            return weights
        return tuple(dequantise_blocks(w, getattr(self, n + SCALE_SUFFIX), dtype)
                     for n, w in zip(EXPERT_WEIGHTS, weights))

    def matmul(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], offsets: torch.Tensor,
               expert_of_row: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if weights[0].dtype != FP8:  # dequantised by `stacked`
            return super().matmul(x, weights, offsets, expert_of_row)
        scales = [next(getattr(self, n + SCALE_SUFFIX) for n in EXPERT_WEIGHTS if getattr(self, n) is w)
                  for w in weights]
        kernels = GROUPED.on(x.device)
        if kernels is not None and not torch.is_grad_enabled():
            # at any row count: a row block reads its expert's e4m3 bytes once, and experts without rows none; x
            # quantised once for the weights that read it
            xq, xs = quantise_rows(x)
            return tuple(kernels.fp8_grouped_mm(xq, xs, w, s, offsets, x.dtype) for w, s in zip(weights, scales))
        return tuple(self._dequantised_matmul(x, w, s, offsets, expert_of_row) for w, s in zip(weights, scales))

    def _dequantised_matmul(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor,
                            expert_of_row: torch.Tensor) -> torch.Tensor:
        """The reference's grouped matmul of x by the e4m3 w, dequantised into x's dtype."""
        if x.shape[0] < self.n_experts:  # decode: only the rows' experts are read (rows, not experts: no sync)
            q = w.view(torch.uint8).index_select(0, expert_of_row).view(FP8)  # gathered as bytes
            rows = dequantise_blocks(q, scale.index_select(0, expert_of_row), x.dtype)  # [rows, out, in]
            return torch.bmm(x.unsqueeze(1), rows.transpose(-2, -1)).squeeze(1)
        return grouped_linear(x, dequantise_blocks(w, scale, x.dtype), offsets, expert_of_row)


def _convert_experts(experts: Experts) -> None:
    for name in EXPERT_WEIGHTS:
        q, s = _quantised(getattr(experts, name))
        delattr(experts, name)
        experts.register_parameter(name, nn.Parameter(q, requires_grad=False))
        experts.register_buffer(name + SCALE_SUFFIX, s)
    experts.__class__ = FP8WeightExperts


def has_fp8_weights(model: nn.Module) -> bool:
    return any(p.dtype == FP8 for p in model.parameters())


def to_fp8_weights(model: Transformer) -> Transformer:
    """Converts the weights of every main and MTP block to FP8 in place (see the module docstring): quantised
    blockwise from the current weights, or left uninitialised on the meta device, for a loader to fill. Returns
    the model; one whose weights are FP8 already is returned as it is."""
    if has_fp8_weights(model):
        return model
    for block in model.blocks():
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child is not block.attn.wkv_b:
                    if child.bias is not None:
                        raise ConfigError(f"fp8 weights: {name} has a bias; FP8 weights cover bias-free layers, "
                                          "as DeepSeek-V3's are")
                    setattr(parent, name, FP8WeightLinear(child.weight))
                elif type(child) is Experts:
                    _convert_experts(child)
    return model


def memory_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each tensor once (a tied head is the embedding); an FP8
    projection's weight and scales as held: zero-padded for the GEMM (`gemm_operands`, of which they are views)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for module in model.modules():
        if isinstance(module, FP8WeightLinear):
            del tensors[id(module.weight)], tensors[id(module.weight_scale_inv)]
            tensors.update((id(t), t) for t in module.gemm_operands)
    return sum(t.numel() * t.element_size() for t in tensors.values())
