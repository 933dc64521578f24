"""Interleaved RoPE on MLA's decoupled slice (``q_pe`` per head, the shared ``k_pe``), Triton forward + backward.

Pairs are adjacent, ``(x0, x1), (x2, x3), ...`` (DeepSeek / Torchtune / HF ``rope_interleave=True``)::

    y[2i]   = x[2i] * cos_i - x[2i+1] * sin_i
    y[2i+1] = x[2i+1] * cos_i + x[2i] * sin_i

The map is linear in ``x`` with the transposed rotation as its adjoint, so the backward pass is the same kernel
with ``sin`` negated (cos/sin may carry YaRN's attention factor; the adjoint is still the transpose).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_interleaved(
    x_ptr,
    cos_ptr,
    sin_ptr,
    y_ptr,
    seq_len,
    num_heads,
    stride_xb,
    stride_xs,
    stride_xh,
    stride_cb,
    stride_cs,
    stride_yb,
    stride_ys,
    stride_yh,
    sin_sign,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    sin_sign = tl.cast(sin_sign, tl.float32)  # torch.compile passes Python floats as fp64; rotate in fp32
    token = tl.program_id(0)  # b * seq_len + s
    b = token // seq_len
    s = token % seq_len
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < HALF
    ok = (offs_h[:, None] < num_heads) & p_ok[None, :]
    cos = tl.load(cos_ptr + b * stride_cb + s * stride_cs + offs_p, mask=p_ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * stride_cb + s * stride_cs + offs_p, mask=p_ok, other=0.0).to(tl.float32) * sin_sign
    x_base = x_ptr + b * stride_xb + s * stride_xs + offs_h[:, None] * stride_xh + 2 * offs_p[None, :]
    x0 = tl.load(x_base, mask=ok, other=0.0).to(tl.float32)
    x1 = tl.load(x_base + 1, mask=ok, other=0.0).to(tl.float32)
    y0 = x0 * cos[None, :] - x1 * sin[None, :]
    y1 = x1 * cos[None, :] + x0 * sin[None, :]
    y_base = y_ptr + b * stride_yb + s * stride_ys + offs_h[:, None] * stride_yh + 2 * offs_p[None, :]
    tl.store(y_base, y0.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(y_base + 1, y1.to(y_ptr.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sin_sign: float) -> torch.Tensor:
    b, s, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return y
    block_h = min(16, triton.next_power_of_2(h))
    stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
    _rope_interleaved[(b * s, triton.cdiv(h, block_h))](
        x, cos, sin, y, s, h,
        x.stride(0), x.stride(1), x.stride(2),
        stride_cb, cos.stride(1),
        y.stride(0), y.stride(1), y.stride(2),
        sin_sign,
        HALF=d // 2, BLOCK_H=block_h, BLOCK_P=triton.next_power_of_2(d // 2),
    )  # fmt: skip
    return y


class InterleavedRoPEFunction(torch.autograd.Function):
    """``x [b, s, n_h, d]``, ``cos``/``sin`` ``[b or 1, s, d/2]`` (unit last stride) -> rotated ``[b, s, n_h, d]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] % 2:
            raise ValueError(f"x must be [b, s, n_h, d] with an even d, got {tuple(x.shape)}")
        want = (x.shape[1], x.shape[-1] // 2)
        if (
            cos.shape != sin.shape
            or cos.ndim != 3
            or tuple(cos.shape[1:]) != want
            or cos.shape[0]
            not in (
                1,
                x.shape[0],
            )
        ):
            raise ValueError(f"cos/sin must be [1 or {x.shape[0]}, {want[0]}, {want[1]}], got {tuple(cos.shape)}")
        if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride() != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, -1.0), None, None


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Differentiable interleaved rotation of ``x [b, s, n_h, d]`` by ``cos``/``sin`` ``[b or 1, s, d/2]``."""
    return InterleavedRoPEFunction.apply(x, cos, sin)
