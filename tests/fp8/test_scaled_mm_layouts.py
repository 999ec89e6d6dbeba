"""torch._scaled_mm's arguments as `seekforge.ops.blockwise_mm` hands them over, checked where _scaled_mm cannot run (a
CPU) against torch 2.11's rules, transcribed from aten/src/ATen/native/cuda/ScaledBlas.cpp: `get_joint_scaling`'s
scale shapes and strides for each scaling (b's checked on mat2's and scale_b's transposes, as torch does), and
cuBLASLt's FP8 GEMM's mat1 row-major, mat2 column-major, sizes multiples of 16. A stand-in for _scaled_mm applies
those rules (refusing as torch does, with a RuntimeError) and multiplies as cuBLASLt reads the scales, so the FP8
linear layer's three GEMMs through it, the input gradient's on W's kept blocks read transposed included, must equal
the dequantise-and-multiply reference."""

import pytest
import torch
from scaled_mm_torch_2_11 import scaled_mm_as_torch_2_11

from seekforge.fp8 import gemm
from seekforge.ops import blockwise_mm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def scaled_mm(monkeypatch):
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm_as_torch_2_11, raising=False)


def test_the_probe_settles_on_the_layouts_torch_2_11_takes(scaled_mm):
    assert blockwise_mm._probe(torch.device("cpu"), True) == "kn"
    assert blockwise_mm._probe(torch.device("cpu"), False) == "kn"  # b's tile scales [k/128, n], row-major


@pytest.mark.parametrize("m,k,n", [(64, 384, 512), (37, 300, 200), (130, 1024, 384)],
                         ids=["input-gradient-unpadded", "partial-tiles", "forward-unpadded"])
def test_fp8_linear_through_scaled_mm_equals_the_reference(scaled_mm, monkeypatch, m, k, n):
    """Forward, input gradient (W's forward blocks read transposed: where the input gradient's GEMM needs no padding,
    n a multiple of 512 and k of 128, their scale grid stays a transposed view until laid out) and weight gradient, through _scaled_mm as torch 2.11 takes it, against the
    same layer on the reference path."""
    torch.manual_seed(1)
    x, w, dy = torch.randn(m, k), torch.randn(n, k) * 0.05, torch.randn(m, n)
    results = []
    for layout in (None, "kn"):
        monkeypatch.setattr(blockwise_mm, "scaled_mm_layout", lambda device, b_blocks, layout=layout: layout)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = gemm.fp8_linear(xg, wg)
        y.backward(dy)
        results.append((y.detach(), xg.grad, wg.grad))
    for got, want in zip(results[1], results[0]):
        assert got.shape == want.shape
        assert float((got.double() - want.double()).norm() / want.double().norm()) < 1e-6
