"""LayerNorm + adaLN modulation in one pass: y = LN(x) * (1 + scale) + shift.

x is (B, N, C) with N = T*S tokens frame-major; LN is over C (optional affine weight/bias), with fp32
statistics. shift/scale are per-sample (B, C) or shared (1, C) rows. With temporal=T the output row of
token (b, t, s) is written straight to its place in the temporal-attention layout "(B S) T C", so the
rearrange that would follow costs nothing.

Forward reads x once and writes y once (plus 8 bytes of statistics per row).
Backward: dx needs a row reduction (done in registers, a whole row per lane block); dshift, dscale,
dweight, dbias are reductions over tokens. Those are accumulated by each program over a contiguous range
of one sample's rows into fp32 registers and written as one partial row per program; a second small
reduction over the (B * programs, C) partials finishes them. No atomics: many programs adding into one
(C,) row would serialise on it.
"""

import torch

from sora.kernels._common import (
    batch_stride,
    check_frames,
    check_tokens,
    compute_dtype,
    new_buffer,
    per_channel,
    per_sample_rows,
    reduce_partials,
    reduction_split,
    row_tile,
    temporal_row,
    temporal_shape,
    use_triton,
)
from sora.kernels._triton import tl, triton
from sora.kernels.layout import to_temporal_reference

# Whole rows live in registers; beyond this the row no longer fits a program's register file sensibly.
MAX_CHANNELS = 16384


@triton.jit
def _layernorm_modulate_fwd_kernel(
    x_ptr, y_ptr, shift_ptr, scale_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr,
    M, N, C, T, S, shift_stride, scale_stride, eps,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    TEMPORAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # int64 rows: B*N*C passes 2**31 at 64x512 with C=4096.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]

    x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / C + eps)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    sample = rows // N
    if HAS_SCALE:
        scale = tl.load(scale_ptr + sample[:, None] * scale_stride + cols[None, :], mask=mask, other=0.0)
        y = y * (1.0 + scale.to(tl.float32))
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + sample[:, None] * shift_stride + cols[None, :], mask=mask, other=0.0)
        y = y + shift.to(tl.float32)

    if TEMPORAL:
        out_rows = temporal_row(rows, T, S)
    else:
        out_rows = rows
    tl.store(y_ptr + out_rows[:, None] * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _layernorm_modulate_bwd_kernel(
    dy_ptr, x_ptr, scale_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, dx_ptr,
    dshift_ptr, dscale_ptr, dweight_ptr, dbias_ptr,
    N, C, T, S, scale_stride, rows_per_program,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    TEMPORAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Grid (B, P): program (b, p) owns rows [p * rows_per_program, ...) of sample b, so its per-sample
    # partial sums (dshift, dscale) need no mixing of samples.
    sample = tl.program_id(0)
    program = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, N)

    if HAS_SCALE:
        one_plus_scale = 1.0 + tl.load(scale_ptr + sample * scale_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_weight = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_bias = tl.zeros([BLOCK_C], dtype=tl.float32)

    for start in range(first, last, BLOCK_M):
        local = start + tl.arange(0, BLOCK_M)
        row_ok = local < last
        rows = sample.to(tl.int64) * N + local
        mask = row_ok[:, None] & col_ok[None, :]
        offsets = rows[:, None] * C + cols[None, :]

        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if TEMPORAL:
            dy_rows = temporal_row(rows, T, S)
        else:
            dy_rows = rows
        dy = tl.load(dy_ptr + dy_rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)

        if HAS_SHIFT:
            acc_shift += tl.sum(dy, axis=0)
        dz = dy  # gradient w.r.t. z = affine(xhat), the input of the modulation
        if HAS_SCALE:
            z = xhat
            if HAS_WEIGHT:
                z = z * weight[None, :]
            if HAS_BIAS:
                z = z + bias[None, :]
            acc_scale += tl.sum(dy * z, axis=0)
            dz = dy * one_plus_scale[None, :]
        dxhat = dz
        if HAS_WEIGHT:
            acc_weight += tl.sum(dz * xhat, axis=0)
            dxhat = dz * weight[None, :]
        if HAS_BIAS:
            acc_bias += tl.sum(dz, axis=0)

        mean_dxhat = tl.sum(dxhat, axis=1) / C
        mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / C
        dx = (dxhat - xhat * mean_dxhat_xhat[:, None] - mean_dxhat[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    partial = (sample * tl.num_programs(1) + program) * C + cols
    if HAS_SHIFT:
        tl.store(dshift_ptr + partial, acc_shift, mask=col_ok)
    if HAS_SCALE:
        tl.store(dscale_ptr + partial, acc_scale, mask=col_ok)
    if HAS_WEIGHT:
        tl.store(dweight_ptr + partial, acc_weight, mask=col_ok)
    if HAS_BIAS:
        tl.store(dbias_ptr + partial, acc_bias, mask=col_ok)


def _launch_forward(x, shift, scale, weight, bias, eps, T):
    x = x.contiguous()
    B, N, C = x.shape
    M = B * N
    y = new_buffer(temporal_shape(B, N, C, T) if T > 1 else (B, N, C), x.dtype, x.device)
    mean = new_buffer((M,), torch.float32, x.device)
    rstd = new_buffer((M,), torch.float32, x.device)
    block_m, block_c, num_warps = row_tile(C)
    _layernorm_modulate_fwd_kernel[(triton.cdiv(M, block_m),)](
        x, y, shift, scale, weight, bias, mean, rstd,
        M, N, C, T, N // T, batch_stride(shift), batch_stride(scale), eps,
        HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        TEMPORAL=T > 1, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )
    return y, mean, rstd


def _launch_backward(dy, x, shift, scale, weight, bias, mean, rstd, T):
    dy = dy.contiguous()
    x = x.contiguous()
    B, N, C = x.shape
    dx = new_buffer(x.shape, x.dtype, x.device)
    block_m, block_c, num_warps = row_tile(C)
    programs, rows_per_program = reduction_split(N, B, block_m, x)

    def partials(t):
        return None if t is None else new_buffer((B * programs, C), torch.float32, x.device)

    dshift, dscale, dweight, dbias = partials(shift), partials(scale), partials(weight), partials(bias)
    _layernorm_modulate_bwd_kernel[(B, programs)](
        dy, x, scale, weight, bias, mean, rstd, dx,
        dshift, dscale, dweight, dbias,
        N, C, T, N // T, batch_stride(scale), rows_per_program,
        HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        TEMPORAL=T > 1, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )
    # Second reduction stage; an absent argument gets an empty tensor (custom ops cannot return None).
    return dx, *(x.new_empty(0) if partial is None else reduce_partials(partial, B, like)
                 for partial, like in ((dshift, shift), (dscale, scale), (dweight, weight), (dbias, bias)))


@torch.library.custom_op("sora::layernorm_modulate", mutates_args=())
def _layernorm_modulate_op(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    T: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_forward(x, shift, scale, weight, bias, eps, T)


@_layernorm_modulate_op.register_fake
def _(x, shift, scale, weight, bias, eps, T):
    B, N, C = x.shape
    y = x.new_empty(temporal_shape(B, N, C, T) if T > 1 else (B, N, C))
    stats = x.new_empty(B * N, dtype=torch.float32)
    return y, stats, torch.empty_like(stats)


@torch.library.custom_op("sora::layernorm_modulate_backward", mutates_args=())
def _layernorm_modulate_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    T: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(dy, x, shift, scale, weight, bias, mean, rstd, T)


@_layernorm_modulate_backward_op.register_fake
def _(dy, x, shift, scale, weight, bias, mean, rstd, T):
    def like(t):
        return x.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

    return torch.empty_like(x, memory_format=torch.contiguous_format), like(shift), like(scale), like(weight), like(bias)


def _setup_context(ctx, inputs, output):
    x, shift, scale, weight, bias, _, T = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, shift, scale, weight, bias, mean, rstd)
    ctx.T = T


def _backward(ctx, dy, _dmean, _drstd):
    x, shift, scale, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale, dweight, dbias = _layernorm_modulate_backward_op(
        dy, x, shift, scale, weight, bias, mean, rstd, ctx.T
    )

    def present(grad, t):
        return grad if t is not None else None

    return dx, present(dshift, shift), present(dscale, scale), present(dweight, weight), present(dbias, bias), None, None


_layernorm_modulate_op.register_autograd(_backward, setup_context=_setup_context)


def layernorm_modulate_reference(x, shift=None, scale=None, weight=None, bias=None, eps=1e-6, temporal=None):
    """Eager PyTorch: the definition the kernel is tested against, and the fallback off-GPU."""
    B, N, C = x.shape
    acc = compute_dtype(x)
    y = torch.nn.functional.layer_norm(x.to(acc), (C,), None, None, eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    if scale is not None:
        y = y * (1 + scale.to(acc).reshape(-1, 1, C))
    if shift is not None:
        y = y + shift.to(acc).reshape(-1, 1, C)
    y = y.to(x.dtype)
    if temporal is not None:
        y = to_temporal_reference(y, temporal)
    return y


def layernorm_modulate(x, shift=None, scale=None, weight=None, bias=None, eps=1e-6, temporal=None):
    """LN(x) * (1 + scale) + shift over the channels of x (B, N, C).

    shift/scale: (B, 1, C), (1, 1, C), (B, C), (1, C) or (C,). weight/bias: (C,) LayerNorm affine.
    temporal=T: return the result in temporal-attention layout (B*S, T, C) instead of (B, N, C).
    Differentiable in x, shift, scale, weight and bias; output dtype is x.dtype, statistics fp32.
    """
    check_tokens("x", x)
    if x.shape[-1] > MAX_CHANNELS:
        raise ValueError(f"layernorm_modulate supports C <= {MAX_CHANNELS}, got x of shape {tuple(x.shape)}")
    T = 1 if temporal is None else check_frames(temporal, x)  # T=1 is the identity map of rows
    shift_rows = per_sample_rows("shift", shift, x)
    scale_rows = per_sample_rows("scale", scale, x)
    weight = per_channel("weight", weight, x)
    bias = per_channel("bias", bias, x)
    if not use_triton(x):
        return layernorm_modulate_reference(x, shift_rows, scale_rows, weight, bias, eps, temporal)
    y, _, _ = _layernorm_modulate_op(x, shift_rows, scale_rows, weight, bias, float(eps), T)
    # One frame: the temporal layout (B*S, 1, C) is the same memory as (B, N, C), and the kernel wrote that.
    return y.view(-1, 1, x.shape[-1]) if temporal == 1 else y
