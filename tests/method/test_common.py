"""The fp32-output matmuls of 16-bit tensors against float64."""

import pytest
import torch

import hf_lwf.method.common as common
from hf_lwf.method.common import matmul_f32, project_f32


@pytest.fixture(params=[False, True], ids=["cpu", "gpu-branch"])
def branch(request, monkeypatch):
    """The CPU's branch (16-bit operands upcast), or the GPU's (16-bit operands kept, fp32 output) emulated."""
    if request.param:
        monkeypatch.setattr(common, "_native_f32_output", lambda device: True)
        monkeypatch.setattr(common, "_mm_out_f32",
                            lambda a, b: (torch.bmm if a.dim() == 3 else torch.mm)(a.float(), b.float()))
    return request.param


def _relative(x, ref):
    return float((x.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matmul_f32_accumulates_16_bit_products_in_fp32(branch, dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 40, 300, generator=g).to(dtype)
    b = torch.randn(3, 300, 20, generator=g).to(dtype)
    out = matmul_f32(a, b)
    assert out.dtype == torch.float32 and out.shape == (3, 40, 20)
    assert _relative(out, a.double() @ b.double()) < 1e-6  # bf16 output would be 4e-3
    assert _relative(matmul_f32(a[0], b[0]), a[0].double() @ b[0].double()) < 1e-6


def test_project_f32_keeps_an_fp32_direction_to_2_to_the_minus_16(branch):
    """bf16 x times fp32 m: with the bf16 split m = hi + lo (GPU branch) the product stays within 2**-16 of the
    fp64 product (m rounded to bf16 alone: 2**-9)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 50, 64, generator=g).to(torch.bfloat16)
    m = torch.randn(64, 30, generator=g) * 1e-9  # as small as w = M * F * D gets: bf16 keeps fp32's range
    out = project_f32(x, m)
    assert out.dtype == torch.float32 and out.shape == (7, 50, 30)
    error = _relative(out, x.double() @ m.double())
    assert error < 2.0**-16
    rounded = _relative((x.float() @ m.to(torch.bfloat16).float()), x.double() @ m.double())
    assert rounded > 2.0**-12  # what the split avoids
    half = torch.randn(5, 64, generator=g).to(torch.float16)
    assert _relative(project_f32(half, m), half.double() @ m.double()) < 1e-6  # fp16: upcast, m is below its range
