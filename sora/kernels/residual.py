"""Gated residual add: out = x + gate * y.

x is the (B, N, C) residual stream, frame-major; gate is a per-sample (B, C) or shared (1, C) row (adaLN's
gate_msa / gate_mlp), or with frames=F one row per frame (B, F, C), F=N per token. With temporal=T, y is a
temporal-attention output in "(B S) T C" layout and is read back into frame-major order inside the kernel, so
the rearrange + contiguous copy before the add is gone.

Forward: one pass, reads x and y, writes out. Backward: dx = dout (no kernel), dy = dout * gate written in
y's layout, and dgate, a reduction over each sample's (or frame's) tokens, as per-program partial sums (grid
(B * F, P, channel blocks)) finished by a small second reduction. No atomics, for the same reason as in
layernorm_modulate.
"""

import torch

from sora.kernels._common import (
    batch_stride,
    check_frames,
    check_same,
    check_tokens,
    col_tile,
    compute_dtype,
    frame_count,
    frame_stride,
    layout_shape,
    new_buffer,
    modulation_per_token,
    modulation_rows,
    reduce_partials,
    one_wave,
    reduction_split,
    temporal_rows,
    use_triton,
)
from sora.kernels._triton import tl, triton
from sora.kernels.layout import from_temporal_reference
from sora.kernels.norm import SAMPLE_FRAMES, frames_mode, modulation_piece


@triton.jit
def _gated_residual_fwd_kernel(
    x_ptr, y_ptr, gate_ptr, out_ptr,
    N, C, T, S, gate_stride, SF, gate_frame_stride,
    TEMPORAL: tl.constexpr, FRAMES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Grid (row blocks of a sample, B, channel blocks): one sample per program, so its gate is one row;
    # per frame the row of the block's first frame, and with ROW_FRAMES each row's own (see frames_mode).
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
    block_frame = 0
    if FRAMES != SAMPLE_FRAMES:
        block_frame = first // SF
    frame_offsets = (tl.minimum(local, N - 1) // SF - block_frame).to(tl.int64) * gate_frame_stride  # ROW_FRAMES
    gate_row = gate_ptr + sample * gate_stride + block_frame * gate_frame_stride
    gate = modulation_piece(gate_row, frame_offsets, cols, C, True, FRAMES)
    out = x + gate * y
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_per_token_bwd(dout_ptr, y_ptr, gate_ptr, dy_ptr, dgate_ptr, N, C, T, S, gate_stride,
                                  gate_frame_stride, TEMPORAL: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_C: tl.constexpr):
    """The backward for a (B or 1, N, C) gate: grid (row blocks of a sample, B, channel blocks)."""
    sample = tl.program_id(1)
    first = tl.program_id(0) * BLOCK_M
    local = first + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (local < N)[:, None] & (cols < C)[None, :]
    rows = sample.to(tl.int64) * N + local
    if TEMPORAL:
        y_rows = sample.to(tl.int64) * N + temporal_rows(first, T, S, BLOCK_M)
    else:
        y_rows = rows
    offsets = rows[:, None] * C + cols[None, :]
    y_offsets = y_rows[:, None] * C + cols[None, :]
    gate_offsets = sample * gate_stride + local.to(tl.int64)[:, None] * gate_frame_stride + cols[None, :]
    dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + y_offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + gate_offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(dy_ptr + y_offsets, (dout * gate).to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + offsets, dout * y, mask=mask)


@triton.jit(do_not_specialize=["rows_per_program"])  # one compile for every grid (see one_wave)
def _gated_residual_bwd_kernel(
    dout_ptr, y_ptr, gate_ptr, dy_ptr, dgate_ptr,
    N, C, T, S, gate_stride, F, SF, gate_frame_stride, rows_per_program,
    TEMPORAL: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    if PER_TOKEN:  # a gate row per token: dgate = dout * y needs no reduction; the forward's grid and tiles
        _gated_residual_per_token_bwd(dout_ptr, y_ptr, gate_ptr, dy_ptr, dgate_ptr, N, C, T, S, gate_stride,
                                      gate_frame_stride, TEMPORAL, BLOCK_M, BLOCK_C)
        return
    # Grid (B*F, P, channel blocks): program (b*F + f, p, .) owns rows [p * rows_per_program, ...) of frame f of
    # sample b (F frames of SF rows; F=1 per sample), so one gate row, and its partial dgate mixes no frames.
    segment = tl.program_id(0)
    sample = segment // F
    frame = segment - sample * F
    program = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    first = frame * SF + program * rows_per_program
    last = tl.minimum(first + rows_per_program, (frame + 1) * SF)
    gate_row = gate_ptr + sample * gate_stride + frame * gate_frame_stride
    gate = tl.load(gate_row + cols, mask=col_ok, other=0.0).to(tl.float32)
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

    partial = (segment * tl.num_programs(1) + program) * C + cols
    tl.store(dgate_ptr + partial, acc_gate, mask=col_ok)


def _launch_forward(x, y, gate, T):
    x = x.contiguous()
    y = y.contiguous()
    B, N, C = x.shape
    out = new_buffer(x.shape, x.dtype, x.device)
    F = gate.shape[1]
    block_m, block_c, num_warps = col_tile(C, rows_within=N // T)
    grid = (triton.cdiv(N, block_m), B, triton.cdiv(C, block_c))
    _gated_residual_fwd_kernel[grid](
        x, y, gate, out, N, C, T, N // T, batch_stride(gate), N // F, frame_stride(gate),
        TEMPORAL=T > 1, FRAMES=frames_mode(F, N, block_m), BLOCK_M=block_m, BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out


def _launch_backward(dout, y, gate, T):
    dout = dout.contiguous()
    y = y.contiguous()
    B, N, C = dout.shape
    dy = new_buffer(y.shape, y.dtype, y.device)
    F = gate.shape[1]

    def arguments(dgate, rows_per_program):
        return (dout, y, gate, dy, dgate, N, C, T, N // T, batch_stride(gate), F, N // F, frame_stride(gate),
                rows_per_program)

    if F == N > 1:  # per token: elementwise, tiled as the forward
        block_m, block_c, num_warps = col_tile(C, rows_within=N // T)
        dgate = new_buffer((B * N, C), torch.float32, dout.device)
        _gated_residual_bwd_kernel[(triton.cdiv(N, block_m), B, triton.cdiv(C, block_c))](
            *arguments(dgate, 0), TEMPORAL=T > 1, PER_TOKEN=True, BLOCK_M=block_m, BLOCK_C=block_c,
            num_warps=num_warps,
        )
        return dy, reduce_partials(dgate, B, gate)
    block_m, block_c, num_warps = col_tile(C, rows_within=min(N // T, N // F))
    flags = dict(TEMPORAL=T > 1, PER_TOKEN=False, BLOCK_M=block_m, BLOCK_C=block_c)
    sizing = new_buffer((1, C), torch.float32, dout.device)
    wave = one_wave(_gated_residual_bwd_kernel, dout, num_warps, *arguments(sizing, 1), **flags)
    channel_blocks = triton.cdiv(C, block_c)
    programs, rows_per_program = reduction_split(N // F, B * F * channel_blocks, block_m, wave)
    dgate = new_buffer((B * F * programs, C), torch.float32, dout.device)
    _gated_residual_bwd_kernel[(B * F, programs, channel_blocks)](
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


def gated_residual_reference(x, y, gate, temporal=None, frames=None):
    """Eager PyTorch: the definition the kernel is tested against, and the fallback off-GPU."""
    B, N, C = x.shape
    if temporal is not None:
        y = from_temporal_reference(y, B)
    acc = compute_dtype(x)
    return (x.to(acc) + modulation_per_token("gate", gate, x, frames, acc) * y.to(acc)).to(x.dtype)


def gated_residual(x, y, gate, temporal=None, frames=None):
    """x + gate * y for the (B, N, C) residual stream x.

    gate: per sample (B, 1, C), (1, 1, C), (B, C), (1, C) or (C,), or per token (B, N, C) / (1, N, C); with
    frames=F per frame, (B, F, C) or (1, F, C): token n reads frame n // (N/F). y: (B, N, C), or with
    temporal=T the temporal-attention layout (B*S, T, C) with S = N / T.
    Dtypes may differ (fp32 gate on bf16 x and y, as Wan's `(x.float() + y * gate).type_as(x)`): the sum is
    computed in fp32 and rounded once to x.dtype, the output dtype; so y may not be of a wider dtype than x (a
    ValueError rather than a silent rounding of y). Differentiable in x, y and gate; each gradient has its input's
    dtype and shape.
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
    if frames is not None:
        check_frames(frames, x, "frames")
    gate_rows = modulation_rows("gate", gate, x, frames)
    if not use_triton(x):
        return gated_residual_reference(x, y, gate_rows, temporal, gate_rows.shape[1])
    return _gated_residual_op(x, y, gate_rows, T)  # the kernel reads y's rows, whatever its 3-D view
