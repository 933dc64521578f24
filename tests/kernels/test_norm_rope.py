"""Triton RMSNorm and interleaved RoPE: forward and gradients against autograd of the PyTorch references, with
outputs and gradients allocated poisoned (``poisoned`` in conftest.py)."""

import pytest
import torch
from torchtune.modules import RMSNorm

from tests._requirements import require_module

require_module("triton", 'pip install -e ".[triton]"')

from mla_components.modules.rope import DecoupledRotaryEmbedding  # noqa: E402
from mla_components.modules.triton_layers import TritonDecoupledRotaryEmbedding, TritonRMSNorm  # noqa: E402
from mla_kernels.rms_norm import rms_norm  # noqa: E402
from mla_kernels.rope import apply_interleaved_rope  # noqa: E402

YARN = {"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 0.8}


def reference_rms_norm(x, scale, eps):
    """Torchtune's RMSNorm formula (the module the Triton one replaces)."""
    x32 = x.float() if x.dtype != torch.float64 else x
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return normed * scale


@pytest.mark.parametrize("dim", [40, 512])
def test_rms_norm_forward_and_gradients_match_autograd(poisoned, device, dim):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, dim, generator=gen).to(device)
    scale = (1 + 0.3 * torch.randn(dim, generator=gen)).to(device)
    dy = torch.randn(3, 7, dim, generator=gen).to(device)

    x_t, s_t = x.clone().requires_grad_(), scale.clone().requires_grad_()
    y = rms_norm(x_t, s_t, 1e-6)
    y.backward(dy)

    x_r, s_r = x.double().requires_grad_(), scale.double().requires_grad_()
    y_r = reference_rms_norm(x_r, s_r, 1e-6)
    y_r.backward(dy.double())

    torch.testing.assert_close(y.double(), y_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_t.grad.double(), x_r.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_t.grad.double(), s_r.grad, atol=1e-4, rtol=1e-5)


def test_triton_rms_norm_is_a_drop_in_for_torchtune(poisoned, device):
    reference = RMSNorm(48, eps=1e-5).to(device)
    with torch.no_grad():
        reference.scale.copy_(torch.linspace(0.5, 1.5, 48))
    triton_norm = TritonRMSNorm(48, eps=1e-5).to(device)
    triton_norm.load_state_dict(reference.state_dict())  # same parameter name
    x = torch.randn(5, 48, device=device)
    torch.testing.assert_close(triton_norm(x), reference(x), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="scale must be"):
        rms_norm(x, torch.ones(47, device=device))


@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["rope", "yarn"])
@pytest.mark.parametrize("positions", ["default", "per_sample"])
def test_rope_module_forward_and_gradient_match_torchtune(poisoned, device, rope_scaling, positions):
    """Same cache, same numerics as DecoupledRotaryEmbedding (Torchtune's forward), and the same gradient."""
    b, s, h, d = 2, 9, 5, 16
    torch_rope = DecoupledRotaryEmbedding(d, max_seq_len=64, rope_scaling=rope_scaling).to(device)
    triton_rope = TritonDecoupledRotaryEmbedding(d, max_seq_len=64, rope_scaling=rope_scaling).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, s, h, d, generator=gen).to(device)
    dy = torch.randn(b, s, h, d, generator=gen).to(device)
    input_pos = None if positions == "default" else torch.randint(0, 64, (b, s), generator=gen).to(device)

    x_t = x.clone().requires_grad_()
    y_t = triton_rope(x_t, input_pos=input_pos)
    y_t.backward(dy)
    x_r = x.clone().requires_grad_()
    y_r = torch_rope(x_r, input_pos=input_pos)
    y_r.backward(dy)

    torch.testing.assert_close(y_t, y_r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x_t.grad, x_r.grad, atol=1e-6, rtol=1e-6)


def test_rope_backward_is_the_adjoint_with_scaled_cos_sin(poisoned, device):
    """<dy, R x> == <R^T dy, x> for cos/sin of magnitude != 1 (YaRN's attention factor), per-sample angles."""
    gen = torch.Generator().manual_seed(2)
    angles = torch.rand(2, 3, 4, generator=gen) * 6.28
    cos, sin = (1.3 * torch.cos(angles)).to(device), (1.3 * torch.sin(angles)).to(device)
    x = torch.randn(2, 3, 5, 8, generator=gen).to(device).requires_grad_()
    dy = torch.randn(2, 3, 5, 8, generator=gen).to(device)
    y = apply_interleaved_rope(x, cos, sin)
    (grad,) = torch.autograd.grad(y, x, dy)
    lhs, rhs = (dy.double() * y.double()).sum(), (grad.double() * x.double()).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-4, rtol=1e-5)
    # and against an explicit rotation matrix built from the same cos/sin
    rot = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    for i in range(4):
        c, s_ = cos[..., i].double().cpu(), sin[..., i].double().cpu()
        rot[..., 2 * i, 2 * i], rot[..., 2 * i, 2 * i + 1] = c, -s_
        rot[..., 2 * i + 1, 2 * i], rot[..., 2 * i + 1, 2 * i + 1] = s_, c
    want = torch.einsum("bsij,bshi->bshj", rot, dy.double().cpu())
    torch.testing.assert_close(grad.double().cpu(), want, atol=1e-5, rtol=1e-5)


def test_rope_rejects_mismatched_cos_sin(device):
    x = torch.randn(1, 3, 2, 8, device=device)
    with pytest.raises(ValueError, match="cos/sin"):
        apply_interleaved_rope(x, torch.ones(1, 3, 3, device=device), torch.ones(1, 3, 3, device=device))
