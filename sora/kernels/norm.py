"""LayerNorm + adaLN modulation in one pass: y = LN(x) * (1 + scale) + shift.

x is (B, N, C) with N = T*S tokens frame-major; LN is over C (optional affine weight/bias), with fp32
statistics. shift/scale are per-sample (B, C) or shared (1, C) rows, or with frames=F one row per frame
(B, F, C) (F=N: per token, Wan 2.2 TI2V), each row of x reading its frame's. With temporal=T the output row of
token (b, t, s) is written straight to its place in the temporal-attention layout "(B S) T C", so the
rearrange that would follow costs nothing.

Forward reads x once and writes y once (plus 8 bytes of statistics per row).
Backward: dx needs a row reduction (done in registers, a whole row per lane block); dshift, dscale,
dweight, dbias are reductions over tokens. Those are accumulated by each program over a contiguous range
of one sample's rows into fp32 registers and written as one partial row per program; a second small
reduction over the (B * programs, C) partials finishes them. Per frame, programs own rows of one frame, and
the partials are (B * F * programs, C). No atomics: many programs adding into one
(C,) row would serialise on it.
"""

import torch

from sora.kernels._common import (
    batch_stride,
    check_tokens,
    compute_dtype,
    check_frames,
    frame_count,
    frame_stride,
    modulation_frames,
    modulation_per_token,
    modulation_rows,
    new_buffer,
    per_channel,
    reduce_partials,
    one_wave,
    reduction_split,
    backward_pieces,
    row_pieces,
    temporal_rows,
    layout_shape,
    use_triton,
)
from sora.kernels._triton import tl, triton
from sora.kernels.layout import to_temporal_reference

# Whole rows live in registers. At C=16384 the backward spilled 240 B per thread (sm_90, 16 warps, the most a
# program has); 8192 is the widest it holds without spilling (bench/kernel_report.py). DiT/STDiT use 1152.
MAX_CHANNELS = 8192


@triton.jit
def _channel_row(ptr, cols, C, MASKED: tl.constexpr):
    """One (piece of a) per-channel row: shift, scale, weight or bias, in fp32."""
    if MASKED:
        return tl.load(ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    return tl.load(ptr + cols).to(tl.float32)


# The FRAMES constexpr of the forward kernels: one modulation row per sample; per frame, a block's rows all in one
# frame (one row per block, its frame found with one scalar division); per frame, blocks crossing frames (a row
# per row, gathered).
SAMPLE_FRAMES, BLOCK_FRAMES, ROW_FRAMES = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


def frames_mode(F: int, N: int, block_m: int) -> int:
    """The forward kernels' FRAMES for F modulation rows per sample over N rows, BLOCK_M rows a block."""
    if F == 1:
        mode = SAMPLE_FRAMES
    else:
        mode = BLOCK_FRAMES if (N // F) % block_m == 0 else ROW_FRAMES
    return getattr(mode, "value", mode)  # the int inside the constexpr (a plain int where Triton is missing)


@triton.jit
def modulation_piece(ptr, frame_offsets, cols, C, MASKED: tl.constexpr, FRAMES: tl.constexpr):
    """A block's modulation (shift, scale or gate) over one piece of channels, fp32, broadcastable to
    (BLOCK_M, piece): one row at ptr, or with FRAMES == ROW_FRAMES each row's frame row at frame_offsets."""
    if FRAMES == ROW_FRAMES:  # one return statement: compiled Triton wants one return type across all of them
        offsets = ptr + frame_offsets[:, None] + cols[None, :]
        if MASKED:
            rows = tl.load(offsets, mask=(cols < C)[None, :], other=0.0).to(tl.float32)
        else:
            rows = tl.load(offsets).to(tl.float32)
    else:
        rows = _channel_row(ptr, cols, C, MASKED)[None, :]
    return rows


@triton.jit
def _normalize_piece(x, mean, rstd, cols, C, scale_ptr, shift_ptr, weight_ptr, bias_ptr, scale_rows, shift_rows,
                     HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, MASKED: tl.constexpr, FRAMES: tl.constexpr):
    """(x - mean) * rstd, affine, modulated: one power-of-two piece of a block of rows."""
    y = (x - mean[:, None]) * rstd[:, None]
    if HAS_WEIGHT:
        y = y * _channel_row(weight_ptr, cols, C, MASKED)[None, :]
    if HAS_BIAS:
        y = y + _channel_row(bias_ptr, cols, C, MASKED)[None, :]
    if HAS_SCALE:
        y = y * (1.0 + modulation_piece(scale_ptr, scale_rows, cols, C, MASKED, FRAMES))
    if HAS_SHIFT:
        y = y + modulation_piece(shift_ptr, shift_rows, cols, C, MASKED, FRAMES)
    return y


@triton.jit
def _layernorm_modulate_fwd_kernel(
    x_ptr, y_ptr, shift_ptr, scale_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr,
    N, C, T, S, shift_stride, scale_stride, SF, shift_frame_stride, scale_frame_stride, eps,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    TEMPORAL: tl.constexpr, FRAMES: tl.constexpr, BLOCK_M: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr,
):
    # Grid (row blocks of a sample, B): one sample per program, so its shift and scale are one (C,) row each;
    # per frame (SF rows each, FRAMES > SAMPLE_FRAMES) the rows of the block's first frame, and with ROW_FRAMES (a
    # block may cross a frame boundary) each row's own frame row, gathered per row.
    # The row's C channels are two power-of-two pieces, HEAD <= C and TAIL (0 when C is a power of two):
    # 1152 = 1024 + 128 issues no masked lane, where one next_power_of_2 block would mask 44% of them.
    sample = tl.program_id(1)
    first = tl.program_id(0) * BLOCK_M
    local = first + tl.arange(0, BLOCK_M)
    row_ok = local < N
    rows = sample.to(tl.int64) * N + local  # int64: B*N*C passes 2**31 at 64x512 with C=4096
    x_rows = x_ptr + rows * C
    if TEMPORAL:
        y_rows = y_ptr + (sample.to(tl.int64) * N + temporal_rows(first, T, S, BLOCK_M)) * C
    else:
        y_rows = y_ptr + rows * C
    block_frame = 0
    if FRAMES != SAMPLE_FRAMES:
        block_frame = first // SF
    if HAS_SHIFT:
        shift_ptr += sample * shift_stride + block_frame * shift_frame_stride
    if HAS_SCALE:
        scale_ptr += sample * scale_stride + block_frame * scale_frame_stride
    # Read only with ROW_FRAMES: each row's frame after the block's first (clamped rows stay in bounds).
    frame = (tl.minimum(local, N - 1) // SF - block_frame).to(tl.int64)
    shift_rows = frame * shift_frame_stride
    scale_rows = frame * scale_frame_stride

    head = tl.arange(0, HEAD)
    x = tl.load(x_rows[:, None] + head[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    total = tl.sum(x, axis=1)
    if TAIL > 0:
        tail = HEAD + tl.arange(0, TAIL)
        tail_ok = tail < C
        tail_mask = row_ok[:, None] & tail_ok[None, :]
        x_tail = tl.load(x_rows[:, None] + tail[None, :], mask=tail_mask, other=0.0).to(tl.float32)
        total += tl.sum(x_tail, axis=1)
    mean = total / C
    xc = x - mean[:, None]
    squares = tl.sum(xc * xc, axis=1)
    if TAIL > 0:
        xc_tail = tl.where(tail_mask, x_tail - mean[:, None], 0.0)
        squares += tl.sum(xc_tail * xc_tail, axis=1)
    rstd = tl.rsqrt(squares / C + eps)

    y = _normalize_piece(x, mean, rstd, head, C, scale_ptr, shift_ptr, weight_ptr, bias_ptr, scale_rows, shift_rows,
                         HAS_SHIFT, HAS_SCALE, HAS_WEIGHT, HAS_BIAS, MASKED=False, FRAMES=FRAMES)
    tl.store(y_rows[:, None] + head[None, :], y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None])
    if TAIL > 0:
        y = _normalize_piece(x_tail, mean, rstd, tail, C, scale_ptr, shift_ptr, weight_ptr, bias_ptr, scale_rows,
                             shift_rows, HAS_SHIFT, HAS_SCALE, HAS_WEIGHT, HAS_BIAS, MASKED=True, FRAMES=FRAMES)
        tl.store(y_rows[:, None] + tail[None, :], y.to(y_ptr.dtype.element_ty), mask=tail_mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _load_rows(dy_ptr, x_ptr, mean_ptr, rstd_ptr, sample, start, last, N, C, T, S,
               TEMPORAL: tl.constexpr, BLOCK_M: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr):
    """One block of rows for the backward: x and dy in their own dtype (fp32 only once used), mean, rstd."""
    local = start + tl.arange(0, BLOCK_M)
    row_ok = local < last
    rows = sample.to(tl.int64) * N + local
    x_rows = x_ptr + rows * C
    if TEMPORAL:
        dy_rows = dy_ptr + (sample.to(tl.int64) * N + temporal_rows(start, T, S, BLOCK_M)) * C
    else:
        dy_rows = dy_ptr + rows * C
    head = tl.arange(0, HEAD)
    x = tl.load(x_rows[:, None] + head[None, :], mask=row_ok[:, None], other=0.0)
    dy = tl.load(dy_rows[:, None] + head[None, :], mask=row_ok[:, None], other=0.0)
    if TAIL > 0:
        tail = HEAD + tl.arange(0, TAIL)
        tail_mask = row_ok[:, None] & (tail < C)[None, :]
        x_tail = tl.load(x_rows[:, None] + tail[None, :], mask=tail_mask, other=0.0)
        dy_tail = tl.load(dy_rows[:, None] + tail[None, :], mask=tail_mask, other=0.0)
    else:
        x_tail, dy_tail = x, dy  # unused
    mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    return x, dy, x_tail, dy_tail, mean, rstd


@triton.jit
def _piece_grads(x, dy, mean, rstd, one_plus_scale, weight, bias, acc_shift, acc_scale, acc_weight, acc_bias,
                 HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """For one piece of the channels: xhat, d(loss)/d(xhat), and the token sums of dshift, dscale, dweight, dbias."""
    xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
    dy = dy.to(tl.float32)
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
    return xhat, dxhat, acc_shift, acc_scale, acc_weight, acc_bias


@triton.jit
def _piece_channels(scale_ptr, weight_ptr, bias_ptr, cols, C, MASKED: tl.constexpr,
                    HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """1 + scale, weight and bias over one piece's channels; an absent one is zeros, which nothing reads."""
    zeros = tl.zeros(cols.shape, dtype=tl.float32)
    one_plus_scale = 1.0 + _channel_row(scale_ptr, cols, C, MASKED) if HAS_SCALE else zeros
    weight = _channel_row(weight_ptr, cols, C, MASKED) if HAS_WEIGHT else zeros
    bias = _channel_row(bias_ptr, cols, C, MASKED) if HAS_BIAS else zeros
    return one_plus_scale, weight, bias


@triton.jit
def _store_partials(dshift_ptr, dscale_ptr, dweight_ptr, dbias_ptr, acc_shift, acc_scale, acc_weight, acc_bias,
                    partial, cols, C, MASKED: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One program's partial token sums (channels `cols`) into its row `partial` of the (B * programs, C) partials."""
    offsets = partial * C + cols
    mask = cols < C if MASKED else None
    if HAS_SHIFT:
        tl.store(dshift_ptr + offsets, acc_shift, mask=mask)
    if HAS_SCALE:
        tl.store(dscale_ptr + offsets, acc_scale, mask=mask)
    if HAS_WEIGHT:
        tl.store(dweight_ptr + offsets, acc_weight, mask=mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + offsets, acc_bias, mask=mask)


@triton.jit(do_not_specialize=["rows_per_program"])  # one compile for every grid (see one_wave)
def _layernorm_modulate_bwd_kernel(
    dy_ptr, x_ptr, scale_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, dx_ptr,
    dshift_ptr, dscale_ptr, dweight_ptr, dbias_ptr,
    N, C, T, S, scale_stride, F, SF, scale_frame_stride, rows_per_program,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    TEMPORAL: tl.constexpr, BLOCK_M: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr,
):
    # Grid (B*F, P): program (b*F + f, p) owns rows [p * rows_per_program, ...) of frame f of sample b (F frames
    # of SF rows; F=1 per sample), so its partial sums (dshift, dscale) mix no samples and no frames.
    # Channels in two pieces as in the forward.
    segment = tl.program_id(0)
    sample = segment // F
    frame = segment - sample * F
    program = tl.program_id(1)
    first = frame * SF + program * rows_per_program
    last = tl.minimum(first + rows_per_program, (frame + 1) * SF)
    head = tl.arange(0, HEAD)
    if HAS_SCALE:
        scale_ptr += sample * scale_stride + frame * scale_frame_stride
    one_plus_scale, weight, bias = _piece_channels(scale_ptr, weight_ptr, bias_ptr, head, C, False,
                                                   HAS_SCALE, HAS_WEIGHT, HAS_BIAS)
    zeros = tl.zeros([HEAD], dtype=tl.float32)
    if TAIL > 0:
        tail = HEAD + tl.arange(0, TAIL)
        one_plus_scale_tail, weight_tail, bias_tail = _piece_channels(scale_ptr, weight_ptr, bias_ptr, tail, C, True,
                                                                      HAS_SCALE, HAS_WEIGHT, HAS_BIAS)
        zeros_tail = tl.zeros([TAIL], dtype=tl.float32)
    else:  # no tail piece: placeholders the loop carries unchanged
        tail = head
        one_plus_scale_tail, weight_tail, bias_tail = one_plus_scale, weight, bias
        zeros_tail = zeros
    acc_shift, acc_scale, acc_weight, acc_bias = zeros, zeros, zeros, zeros
    acc_shift_tail, acc_scale_tail, acc_weight_tail, acc_bias_tail = zeros_tail, zeros_tail, zeros_tail, zeros_tail

    # The next block's loads are issued before this block's reductions, so they are in flight meanwhile.
    x, dy, x_tail, dy_tail, mean, rstd = _load_rows(dy_ptr, x_ptr, mean_ptr, rstd_ptr, sample, first, last,
                                                     N, C, T, S, TEMPORAL, BLOCK_M, HEAD, TAIL)
    for start in range(first, last, BLOCK_M):
        next_x, next_dy, next_x_tail, next_dy_tail, next_mean, next_rstd = _load_rows(
            dy_ptr, x_ptr, mean_ptr, rstd_ptr, sample, start + BLOCK_M, last, N, C, T, S,
            TEMPORAL, BLOCK_M, HEAD, TAIL)
        xhat, dxhat, acc_shift, acc_scale, acc_weight, acc_bias = _piece_grads(
            x, dy, mean, rstd, one_plus_scale, weight, bias, acc_shift, acc_scale, acc_weight, acc_bias,
            HAS_SHIFT, HAS_SCALE, HAS_WEIGHT, HAS_BIAS)
        sum_dxhat = tl.sum(dxhat, axis=1)
        sum_dxhat_xhat = tl.sum(dxhat * xhat, axis=1)
        if TAIL > 0:
            xhat_tail, dxhat_tail, acc_shift_tail, acc_scale_tail, acc_weight_tail, acc_bias_tail = _piece_grads(
                x_tail, dy_tail, mean, rstd, one_plus_scale_tail, weight_tail, bias_tail,
                acc_shift_tail, acc_scale_tail, acc_weight_tail, acc_bias_tail,
                HAS_SHIFT, HAS_SCALE, HAS_WEIGHT, HAS_BIAS)
            xhat_tail = tl.where((tail < C)[None, :], xhat_tail, 0.0)  # masked lanes loaded x=0, not mean
            sum_dxhat += tl.sum(dxhat_tail, axis=1)
            sum_dxhat_xhat += tl.sum(dxhat_tail * xhat_tail, axis=1)
        mean_dxhat = sum_dxhat / C
        mean_dxhat_xhat = sum_dxhat_xhat / C

        local = start + tl.arange(0, BLOCK_M)
        row_ok = local < last
        dx_rows = dx_ptr + (sample.to(tl.int64) * N + local) * C
        dx = (dxhat - xhat * mean_dxhat_xhat[:, None] - mean_dxhat[:, None]) * rstd[:, None]
        tl.store(dx_rows[:, None] + head[None, :], dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None])
        if TAIL > 0:
            dx = (dxhat_tail - xhat_tail * mean_dxhat_xhat[:, None] - mean_dxhat[:, None]) * rstd[:, None]
            tail_mask = row_ok[:, None] & (tail < C)[None, :]
            tl.store(dx_rows[:, None] + tail[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tail_mask)
        x, dy, x_tail, dy_tail, mean, rstd = next_x, next_dy, next_x_tail, next_dy_tail, next_mean, next_rstd

    partial = segment * tl.num_programs(1) + program
    _store_partials(dshift_ptr, dscale_ptr, dweight_ptr, dbias_ptr,
                    acc_shift, acc_scale, acc_weight, acc_bias, partial, head, C, False,
                    HAS_SHIFT, HAS_SCALE, HAS_WEIGHT, HAS_BIAS)
    if TAIL > 0:
        _store_partials(dshift_ptr, dscale_ptr, dweight_ptr, dbias_ptr,
                        acc_shift_tail, acc_scale_tail, acc_weight_tail, acc_bias_tail, partial, tail, C, True,
                        HAS_SHIFT, HAS_SCALE, HAS_WEIGHT, HAS_BIAS)


def _launch_forward(x, shift, scale, weight, bias, eps, T):
    x = x.contiguous()
    B, N, C = x.shape
    y = new_buffer(layout_shape(x.shape, T), x.dtype, x.device)
    mean = new_buffer((B * N,), torch.float32, x.device)
    rstd = new_buffer((B * N,), torch.float32, x.device)
    F = modulation_frames(x, shift, scale)
    block_m, head, tail, num_warps = row_pieces(C, rows_within=N // T)
    _layernorm_modulate_fwd_kernel[(triton.cdiv(N, block_m), B)](
        x, y, shift, scale, weight, bias, mean, rstd,
        N, C, T, N // T, batch_stride(shift), batch_stride(scale), N // F, frame_stride(shift), frame_stride(scale),
        eps, HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        TEMPORAL=T > 1, FRAMES=frames_mode(F, N, block_m), BLOCK_M=block_m, HEAD=head, TAIL=tail,
        num_warps=num_warps,
    )
    return y, mean, rstd


def _launch_backward(dy, x, shift, scale, weight, bias, mean, rstd, T):
    dy = dy.contiguous()
    x = x.contiguous()
    B, N, C = x.shape
    dx = new_buffer(x.shape, x.dtype, x.device)
    F = modulation_frames(x, shift, scale)
    block_m, head, tail, num_warps = backward_pieces(C, rows_within=min(N // T, N // F))
    flags = dict(
        HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, TEMPORAL=T > 1, BLOCK_M=block_m, HEAD=head, TAIL=tail,
    )

    def arguments(partials, rows_per_program):
        return (dy, x, scale, weight, bias, mean, rstd, dx, *partials,
                N, C, T, N // T, batch_stride(scale), F, N // F, frame_stride(scale), rows_per_program)

    def partial_sums(rows):
        return [None if t is None else new_buffer((rows, C), torch.float32, x.device) for t in (shift, scale, weight, bias)]

    wave = one_wave(_layernorm_modulate_bwd_kernel, x, num_warps, *arguments(partial_sums(1), 1), **flags)
    programs, rows_per_program = reduction_split(N // F, B * F, block_m, wave)
    partials = partial_sums(B * F * programs)
    _layernorm_modulate_bwd_kernel[(B * F, programs)](*arguments(partials, rows_per_program), **flags,
                                                      num_warps=num_warps)
    # Second reduction stage; an absent argument gets an empty tensor (custom ops cannot return None).
    return dx, *(x.new_empty(0) if partial is None else reduce_partials(partial, B, like)
                 for partial, like in zip(partials, (shift, scale, weight, bias)))


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
    y = x.new_empty(layout_shape(x.shape, T))
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


def layernorm_modulate_reference(x, shift=None, scale=None, weight=None, bias=None, eps=1e-6, temporal=None,
                                 frames=None):
    """Eager PyTorch: the definition the kernel is tested against, and the fallback off-GPU."""
    B, N, C = x.shape
    acc = compute_dtype(x)
    shift = modulation_per_token("shift", shift, x, frames, acc)
    scale = modulation_per_token("scale", scale, x, frames, acc)
    y = torch.nn.functional.layer_norm(x.to(acc), (C,), None, None, eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    if scale is not None:
        y = y * (1 + scale)
    if shift is not None:
        y = y + shift
    y = y.to(x.dtype)
    if temporal is not None:
        y = to_temporal_reference(y, temporal)
    return y


def layernorm_modulate(x, shift=None, scale=None, weight=None, bias=None, eps=1e-6, temporal=None, frames=None):
    """LN(x) * (1 + scale) + shift over the channels of x (B, N, C).

    shift/scale: per sample (B, 1, C), (1, 1, C), (B, C), (1, C) or (C,), or per token (B, N, C) / (1, N, C);
    with frames=F per frame, (B, F, C) or (1, F, C): token n of x (F frames of N/F tokens, frame-major) reads
    frame n // (N/F). weight/bias: (C,) LayerNorm affine.
    temporal=T: return the result in temporal-attention layout (B*S, T, C) instead of (B, N, C).
    Dtypes may differ (fp32 shift/scale on bf16 x, as Wan's `(norm(x.float()) * (1 + scale) + shift).type_as(x)`):
    everything is computed in fp32 (statistics included) and rounded once to x.dtype, the output dtype.
    Differentiable in x, shift, scale, weight and bias; each gradient has its input's dtype and shape.
    """
    check_tokens("x", x)
    if x.shape[-1] > MAX_CHANNELS:
        raise ValueError(f"layernorm_modulate supports C <= {MAX_CHANNELS}, got x of shape {tuple(x.shape)}")
    T = frame_count(temporal, x)
    if frames is not None:
        check_frames(frames, x, "frames")
    shift_rows = modulation_rows("shift", shift, x, frames)
    scale_rows = modulation_rows("scale", scale, x, frames)
    F = modulation_frames(x, shift_rows, scale_rows)
    weight = per_channel("weight", weight, x)
    bias = per_channel("bias", bias, x)
    if not use_triton(x):
        return layernorm_modulate_reference(x, shift_rows, scale_rows, weight, bias, eps, temporal, F)
    y, _, _ = _layernorm_modulate_op(x, shift_rows, scale_rows, weight, bias, float(eps), T)
    return y.view(layout_shape(x.shape, temporal))  # the op writes the (B*S, T, C) layout, T=1 included
