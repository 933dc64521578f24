"""RMSNorm with Torchtune's numerics (fp32 statistics, normalised value cast back before the scale), as a
Triton forward + backward ``autograd.Function`` (the drop-in module for ``torchtune.modules.RMSNorm`` is
``mla_components.modules.triton_layers.TritonRMSNorm``).

Forward, per row ``x [d]``: ``rstd = 1 / sqrt(mean(x^2) + eps)``, ``y = cast(x * rstd) * scale``.
Backward, with ``x_hat = x * rstd`` and ``g = dy * scale``:
``dx = rstd * (g - x_hat * mean(g * x_hat))``, ``dscale = sum_rows(dy * cast(x_hat))``.
"""

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM_BWD = 8


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, dim, eps, BLOCK: tl.constexpr):
    eps = tl.cast(eps, tl.float32)  # torch.compile passes Python floats as fp64; the statistics stay fp32
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    x_hat = (x * rstd).to(x_ptr.dtype.element_ty)  # Torchtune casts before applying the scale
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    y = x_hat.to(tl.float32) * w.to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_part_ptr,
    stride_dy,
    stride_x,
    stride_dx,
    rows,
    dim,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        row = pid * ROWS_PER_PROGRAM + i
        live = row < rows
        lm = ok & live
        x = tl.load(x_ptr + row * stride_x + cols, mask=lm, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=lm, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=live, other=0.0)
        x_hat = x * rstd
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / dim))
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=lm)
        dw += dy * x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dw_part_ptr + pid * dim + cols, dw, mask=ok)


class RMSNormFunction(torch.autograd.Function):
    """``y = RMSNorm(x) * scale`` over the last dim; ``x [..., d]``, ``scale [d]`` -> ``y [..., d]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        dim = x.shape[-1]
        if scale.shape != (dim,):
            raise ValueError(f"scale must be [{dim}] to match x's last dim, got {tuple(scale.shape)}")
        x2 = x.reshape(-1, dim)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out_dtype = torch.promote_types(x.dtype, scale.dtype)
        y = torch.empty(x2.shape, device=x.device, dtype=out_dtype)
        rstd = torch.empty(x2.shape[0], device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(dim)
        if x2.shape[0]:
            _rms_norm_fwd[(x2.shape[0],)](
                x2,
                scale,
                y,
                rstd,
                x2.stride(0),
                y.stride(0),
                dim,
                eps,
                BLOCK=block,
                num_warps=4 if block <= 2048 else 8,
            )
        ctx.save_for_backward(x2, scale, rstd)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], dim)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x2, scale, rstd = ctx.saved_tensors
        rows, dim = x2.shape
        dy2 = dy.reshape(rows, dim)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        programs = max(1, triton.cdiv(rows, ROWS_PER_PROGRAM_BWD))
        dw_part = torch.empty(programs, dim, device=x2.device, dtype=torch.float32)
        if rows:
            _rms_norm_bwd[(programs,)](
                dy2,
                x2,
                scale,
                rstd,
                dx,
                dw_part,
                dy2.stride(0),
                x2.stride(0),
                dx.stride(0),
                rows,
                dim,
                ROWS_PER_PROGRAM=ROWS_PER_PROGRAM_BWD,
                BLOCK=triton.next_power_of_2(dim),
            )
        else:
            dw_part.zero_()
        return dx.view(ctx.x_shape), dw_part.sum(0).to(scale.dtype), None


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Triton RMSNorm over the last dim (differentiable in ``x`` and ``scale``)."""
    return RMSNormFunction.apply(x, scale, eps)
