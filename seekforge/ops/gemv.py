"""The projections of small decode steps as GEMVs: y = x W^T for a few rows of x.

cuBLAS's GEMMs read a small step's weights at a fraction of the memory bandwidth; where the backend takes Triton,
`FewRowLinears` (the dense projections), `head_matmul` (MLA's absorbed per-head products) and `normed_projections`
(a block's input norm with MLA's two input projections, one launch) run the GEMV kernels of
`seekforge.ops.triton.gemv` for up to GEMV_ROWS rows of one 16-bit dtype, and their PyTorch form otherwise.
`fp8_linear` is the projection of FP8 weights (e4m3 with 128x128 block scales): the FP8 GEMV for those rows, the
blockwise FP8 GEMM for more (`seekforge.ops.blockwise_mm`), dequantise-then-F.linear as the reference;
`fp8_projections` several of one input, which the GEMMs take quantised once (`projections`: linear layers of one
input, through their class's hook where it has one); `normed_projections` fuses the norm with two FP8 projections alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from seekforge.ops.blockwise_mm import blockwise_mm, weights_in_fp8
from seekforge.ops.dispatch import TritonOp
from seekforge.ops.quant import dequantise_blocks, quantise_rows


def _load():
    from seekforge.ops.triton import gemv

    return gemv


GEMV = TritonOp("gemv", _load)


class FewRowLinears(TorchFunctionMode):
    """While active: F.linear without bias over at most GEMV_ROWS rows of a 16-bit tensor on `device` runs the Triton
    GEMV, where the backend takes Triton on `device` when the mode is entered; every other call as it was. The
    model's projections (wq, wkv_a, wo, dense MLPs) are plain nn.Linear and stay so: the runner enters this around
    the blocks of the decode steps it captures as CUDA graphs, and torch.compile traces the mode into the compiled
    block. Projections with FP8 weights (`seekforge.model.fp8_weights`) are not F.linear: they call `fp8_linear`,
    which takes the FP8 GEMV for the same rows on its own, inside the mode or not. (Under a mode dynamo inlines the
    Python-level Tensor methods, and Tensor.unflatten's call to super() breaks the graph: code on the decode path
    reshapes with view.)"""

    def __init__(self, device: torch.device):
        super().__init__()
        if device.type == "cuda" and device.index is None:  # "cuda" means the current device: x says cuda:0
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.kernel = GEMV.on(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is F.linear and self.kernel is not None and not kwargs
                and (len(args) == 2 or (len(args) == 3 and args[2] is None))):
            x, weight = args[0], args[1]
            rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
            if (x.device == self.device and weight.dim() == 2 and fits_gemv(x, weight, rows, self.kernel.GEMV_ROWS)
                    and not torch.is_grad_enabled()):
                return self.kernel.gemv(x, weight)
        return func(*args, **kwargs)


def fits_gemv(x: torch.Tensor, weight: torch.Tensor, rows: int, max_rows: int) -> bool:
    """Where a Triton GEMV applies: x and weight of one 16-bit dtype, at most `max_rows` (GEMV_ROWS) rows of x."""
    return x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and rows <= max_rows


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               padded: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """F.linear(x, weight * scale) (no bias) for weight [N, K] float8_e4m3fn with one fp32 scale per 128x128 block,
    scale [ceil(N / 128), ceil(K / 128)] (DeepSeek's weight_scale_inv), in x's dtype: `fp8_projections` of one
    weight (`padded` as that takes it)."""
    return fp8_projections(x, ((weight, scale, padded),))[0]


def fp8_projections(x: torch.Tensor, weights) -> tuple[torch.Tensor, ...]:
    """`fp8_linear` of x by each (weight, scale, padded) of `weights`: F.linear(x, weight * scale) in x's dtype.
    Outside autograd: with Triton, for up to GEMV_ROWS rows of a 16-bit x, the FP8 GEMV of each weight (`fp8_gemv`:
    reads the e4m3 weight and its scales, accumulates in fp32); for more rows, where `weights_in_fp8` holds, x
    quantised in 1x128 tiles once for all the weights, then the blockwise FP8 GEMM against each as stored
    (`blockwise_mm`: torch._scaled_mm on CUDA), which reads `padded` (the weight and scale zero-padded to its shapes,
    `pad_weight`) where given, and pads them itself where None. Otherwise the reference: each weight dequantised into
    x's dtype, then F.linear."""
    kernel = GEMV.on(x.device)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not torch.is_grad_enabled():
        if kernel is not None and x.dtype in (torch.bfloat16, torch.float16) and rows <= kernel.GEMV_ROWS:
            return tuple(kernel.fp8_gemv(x, weight, scale) for weight, scale, _ in weights)
        # past the GEMV's rows: the GEMM reads the weight's e4m3 bytes once, where dequantising writes it and reads
        # it again in 16 bits (5 bytes a weight against 1), at any row count
        if weights_in_fp8(x.device):
            xq, xs = quantise_rows(x.reshape(-1, x.shape[-1]))
            outputs = []
            for weight, scale, padded in weights:
                b, b_scale, n = (weight, scale, None) if padded is None else (*padded, weight.shape[0])
                # contiguous: the output of a weight with n padded for torch._scaled_mm is a slice of a wider one
                y = blockwise_mm(xq, xs, b, b_scale, True, x.dtype, n).contiguous()
                outputs.append(y.view(*x.shape[:-1], -1))
            return tuple(outputs)
    return tuple(F.linear(x, dequantise_blocks(weight, scale, x.dtype)) for weight, scale, _ in weights)


def projections(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """Each bias-free linear layer of `linears` over x, as it computes it. Layers all of one class that has a static
    `projections(x, linears)` go through it together: FP8 weights (`seekforge.model.fp8_weights`: `fp8_projections`)
    and FP8 training's layers (`seekforge.fp8.convert`), which quantise x once for all of them."""
    together = getattr(type(linears[0]), "projections", None)
    if together is not None and all(type(linear) is type(linears[0]) for linear in linears):
        return together(x, linears)
    return tuple(linear(x) for linear in linears)


def normed_projections(h: torch.Tensor, norm, wa: torch.Tensor, wb: torch.Tensor,
                       scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                       padded: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(h) wa^T, norm(h) wb^T) for an RMSNorm `norm` (its `weight`, `eps`, and called as the norm): a block's
    input norm and MLA's two input projections. With Triton, for up to GEMV_ROWS rows of one 16-bit dtype, one
    launch (`norm_gemv`) where the compiled block ran three (the norm, then a GEMV per weight). `scales`: wa and wb
    are FP8 weights with these block scales (`fp8_linear`'s), fused alike (`fp8_norm_gemv`), else the norm then
    `fp8_projections` of both (x quantised once); `padded`: theirs as `fp8_linear` takes it, for wa and wb."""
    kernel = GEMV.on(h.device)
    rows = h.numel() // h.shape[-1] if h.shape[-1] else 0
    if scales is not None:
        if (kernel is not None and h.dtype in (torch.bfloat16, torch.float16) and norm.weight.dtype == h.dtype
                and rows <= kernel.GEMV_ROWS and not torch.is_grad_enabled()):
            return kernel.fp8_norm_gemv(h, norm.weight, norm.eps, wa, scales[0], wb, scales[1])
        pa, pb = padded or (None, None)
        return fp8_projections(norm(h), ((wa, scales[0], pa), (wb, scales[1], pb)))
    if (kernel is not None and fits_gemv(h, wa, rows, kernel.GEMV_ROWS) and wb.dtype == h.dtype == norm.weight.dtype
            and wa.stride(-1) == wb.stride(-1) == 1 and not torch.is_grad_enabled()):
        return kernel.norm_gemv(h, norm.weight, norm.eps, wa, wb)
    x = norm(h)
    return F.linear(x, wa), F.linear(x, wb)


def head_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per head: x [n, h, K], weight [h, N, K] (any strides) -> [n, h, N], torch.einsum("nhk,hjk->nhj") (MLA's
    absorbed products). With Triton, for up to GEMV_ROWS rows of one 16-bit dtype, the GEMV (`head_gemv`), which
    reads the weights at more of the bandwidth than cuBLAS's batched GEMM at a few rows."""
    kernel = GEMV.on(x.device)
    if kernel is not None and fits_gemv(x, weight, x.shape[0], kernel.GEMV_ROWS):
        return kernel.head_gemv(x, weight)
    return torch.einsum("nhk,hjk->nhj", x, weight)
