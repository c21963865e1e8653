"""Gated residual add: out = x + gate * y.

x is the (B, N, C) residual stream, frame-major; gate is a per-sample (B, C) or shared (1, C) row (adaLN's
gate_msa / gate_mlp). With temporal=T, y is a temporal-attention output in "(B S) T C" layout and is read
back into frame-major order inside the kernel, so the rearrange + contiguous copy before the add is gone.

Forward: one pass, reads x and y, writes out. Backward: dx = dout (no kernel), dy = dout * gate written in
y's layout, and dgate, a reduction over each sample's tokens, as per-program partial sums (grid
(B, P, channel blocks)) finished by a small second reduction. No atomics, for the same reason as in
layernorm_modulate.
"""

import torch

from sora.kernels._common import (
    batch_stride,
    check_same,
    check_tokens,
    col_tile,
    compute_dtype,
    frame_count,
    layout_shape,
    new_buffer,
    per_sample_rows,
    reduce_partials,
    one_wave,
    reduction_split,
    temporal_rows,
    use_triton,
)
from sora.kernels._triton import tl, triton
from sora.kernels.layout import from_temporal_reference


@triton.jit
def _gated_residual_fwd_kernel(
    x_ptr, y_ptr, gate_ptr, out_ptr,
    N, C, T, S, gate_stride,
    TEMPORAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Grid (row blocks of a sample, B, channel blocks): one sample per program, so its gate is one row.
    sample = tl.program_id(1)
    first = tl.program_id(0) * BLOCK_M
    local = first + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (local < N)[:, None] & col_ok[None, :]
    rows = sample.to(tl.int64) * N + local
    if TEMPORAL:
        y_rows = sample.to(tl.int64) * N + temporal_rows(first, T, S, BLOCK_M)
    else:
        y_rows = rows
    x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + y_rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + sample * gate_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = x + gate[None, :] * y
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows_per_program"])  # one compile for every grid (see one_wave)
def _gated_residual_bwd_kernel(
    dout_ptr, y_ptr, gate_ptr, dy_ptr, dgate_ptr,
    N, C, T, S, gate_stride, rows_per_program,
    TEMPORAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    sample = tl.program_id(0)
    program = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, N)
    gate = tl.load(gate_ptr + sample * gate_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_gate = tl.zeros([BLOCK_C], dtype=tl.float32)

    for start in range(first, last, BLOCK_M):
        local = start + tl.arange(0, BLOCK_M)
        rows = sample.to(tl.int64) * N + local
        mask = (local < last)[:, None] & col_ok[None, :]
        if TEMPORAL:
            y_rows = sample.to(tl.int64) * N + temporal_rows(start, T, S, BLOCK_M)
        else:
            y_rows = rows
        dout = tl.load(dout_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y_offsets = y_rows[:, None] * C + cols[None, :]
        y = tl.load(y_ptr + y_offsets, mask=mask, other=0.0).to(tl.float32)
        acc_gate += tl.sum(dout * y, axis=0)
        tl.store(dy_ptr + y_offsets, (dout * gate[None, :]).to(dy_ptr.dtype.element_ty), mask=mask)

    partial = (sample * tl.num_programs(1) + program) * C + cols
    tl.store(dgate_ptr + partial, acc_gate, mask=col_ok)


def _launch_forward(x, y, gate, T):
    x = x.contiguous()
    y = y.contiguous()
    B, N, C = x.shape
    out = new_buffer(x.shape, x.dtype, x.device)
    block_m, block_c, num_warps = col_tile(C, rows_within=N // T)
    grid = (triton.cdiv(N, block_m), B, triton.cdiv(C, block_c))
    _gated_residual_fwd_kernel[grid](
        x, y, gate, out, N, C, T, N // T, batch_stride(gate),
        TEMPORAL=T > 1, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


def _launch_backward(dout, y, gate, T):
    dout = dout.contiguous()
    y = y.contiguous()
    B, N, C = dout.shape
    dy = new_buffer(y.shape, y.dtype, y.device)
    block_m, block_c, num_warps = col_tile(C, rows_within=N // T)
    flags = dict(TEMPORAL=T > 1, BLOCK_M=block_m, BLOCK_C=block_c)

    def arguments(dgate, rows_per_program):
        return dout, y, gate, dy, dgate, N, C, T, N // T, batch_stride(gate), rows_per_program

    sizing = new_buffer((1, C), torch.float32, dout.device)
    wave = one_wave(_gated_residual_bwd_kernel, dout, num_warps, *arguments(sizing, 1), **flags)
    channel_blocks = triton.cdiv(C, block_c)
    programs, rows_per_program = reduction_split(N, B * channel_blocks, block_m, wave)
    dgate = new_buffer((B * programs, C), torch.float32, dout.device)
    _gated_residual_bwd_kernel[(B, programs, channel_blocks)](
        *arguments(dgate, rows_per_program), **flags, num_warps=num_warps,
    )
    return dy, reduce_partials(dgate, B, gate)


@torch.library.custom_op("sora::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, T: int) -> torch.Tensor:
    return _launch_forward(x, y, gate, T)


@_gated_residual_op.register_fake
def _(x, y, gate, T):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("sora::gated_residual_backward", mutates_args=())
def _gated_residual_backward_op(
    dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, T: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_backward(dout, y, gate, T)


@_gated_residual_backward_op.register_fake
def _(dout, y, gate, T):
    return (
        torch.empty_like(y, memory_format=torch.contiguous_format),
        torch.empty_like(gate, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    _, y, gate, T = inputs
    ctx.save_for_backward(y, gate)
    ctx.T = T


def _backward(ctx, dout):
    y, gate = ctx.saved_tensors
    dy, dgate = _gated_residual_backward_op(dout, y, gate, ctx.T)
    return dout, dy, dgate, None


_gated_residual_op.register_autograd(_backward, setup_context=_setup_context)


def gated_residual_reference(x, y, gate, temporal=None):
    """Eager PyTorch: the definition the kernel is tested against, and the fallback off-GPU."""
    B, N, C = x.shape
    if temporal is not None:
        y = from_temporal_reference(y, B)
    acc = compute_dtype(x)
    return (x.to(acc) + gate.to(acc).reshape(-1, 1, C) * y.to(acc)).to(x.dtype)


def gated_residual(x, y, gate, temporal=None):
    """x + gate * y for the (B, N, C) residual stream x.

    gate: (B, 1, C), (1, 1, C), (B, C), (1, C) or (C,). y: (B, N, C), or with temporal=T the temporal-attention
    layout (B*S, T, C) with S = N / T. Differentiable in x, y and gate; output dtype is x.dtype, so y may not be
    of a wider dtype than x (it would be rounded to x's silently).
    """
    check_tokens("x", x)
    check_tokens("y", y)
    check_same("y", y, "x", x)
    if torch.promote_types(x.dtype, y.dtype) != x.dtype:
        raise ValueError(f"y is {y.dtype}, wider than x ({x.dtype}), and the output is x's dtype: cast y to "
                         f"{x.dtype}, or x to {y.dtype}")
    T = frame_count(temporal, x)
    expected = layout_shape(x.shape, temporal)
    if tuple(y.shape) != expected:
        layout = f"temporal layout (B*S, T, C) for temporal={T}" if temporal is not None else "the shape of x"
        raise ValueError(f"y must have {layout}, i.e. {expected}, got {tuple(y.shape)} (x is {tuple(x.shape)})")
    if gate is None:
        raise ValueError("gate is required; for a plain residual add use x + y")
    gate_rows = per_sample_rows("gate", gate, x)
    if not use_triton(x):
        return gated_residual_reference(x, y, gate_rows, temporal)
    return _gated_residual_op(x, y, gate_rows, T)  # the kernel reads y's rows, whatever its 3-D view
