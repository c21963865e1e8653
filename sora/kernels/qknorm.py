"""qk-norm with the head split: q and k of the qkv Linear's output RMS-normalized per head, as SDPA reads them.

STDiT2 (Open-Sora v1.1) normalizes q and k of its spatial self-attention per head (their d599fd7 blocks.py
Attention with qk_norm=True): in eager PyTorch a reshape, a permute and, per tensor, an fp32 upcast, the
statistics, a cast and the weight, several passes over (B, N, C) each. Here one kernel launch per q and k
reads its C channels of each token of qkv (B, N, 3C) once and writes the normalized (B, N, H, D) tensor
once; returned as a (B, H, N, D) transpose, the layout SDPA's flash and memory-efficient kernels read
without a copy (D contiguous, heads then tokens). v needs no work: it is a (B, H, N, D) view of qkv.

Each forward program owns BLOCK_M tokens of one head of one sample. A head's D channels are two power-of-two
pieces (HEAD <= D, TAIL >= D - HEAD), 64 + 8 at D=72, so no lane is masked; the head piece moves in 128-bit
accesses (the 8-channel tail in 64-bit ones in bf16).
Rounding as Open-Sora's LlamaRMSNorm (their blocks.py:41-46): fp32 statistics, x * rsqrt(mean(x^2) + eps)
cast to qkv's dtype, times the weight in qkv's dtype, cast again: exactly their product when the weight has
the model dtype (a float32 weight is rounded to qkv's dtype first, where theirs would promote q and k to
float32).

Backward: each program walks a one-wave share of one head's rows of one sample (`reduction_split`), writes
their d(x) and one partial row of d(weight), summed after the kernel (no atomics, so the same from run to
run). d(qkv) is one (B, N, 3C) buffer; its v part is zeroed here, and autograd adds v's gradient through the
view (an add over d(qkv) that a v copy in the forward would avoid, at the price of a copy SDPA does not need).
"""

import torch

from sora.kernels._common import check_tokens, compute_dtype, new_buffer, one_wave, reduction_split, use_triton
from sora.kernels._triton import tl, triton

# A whole head's row lives in registers; DiT/STDiT heads are 72 wide.
MAX_HEAD_DIM = 256
# Elements of one program's (BLOCK_M, HEAD) piece: 4096 over 4 warps, 32 per thread in 128-bit accesses.
ELEMENTS_PER_PROGRAM = 4096
# The backward's loop holds x, dy and the d(weight) tile: 226 registers at bf16 D=72 over 4 warps, no spills.
BACKWARD_WARPS = 4


@triton.jit
def _rows(x_ptr, b, h, n, N, stride_b, stride_n, C_OUT, HEAD_DIM: tl.constexpr):
    """Rows n of head h of sample b: pointers to them in the input and their offsets in a (B, N, C_OUT) output."""
    b = b.to(tl.int64)
    src = x_ptr + b * stride_b + n.to(tl.int64) * stride_n + h * HEAD_DIM
    dst = (b * N + n) * C_OUT + h * HEAD_DIM
    return src[:, None], dst[:, None]


@triton.jit
def _piece(ptr, cols, row_ok, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """(BLOCK_M, piece) values at these column offsets, fp32; only the tail piece can pass HEAD_DIM."""
    if MASKED:
        return tl.load(ptr + cols[None, :], mask=row_ok[:, None] & (cols < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
    return tl.load(ptr + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _weight(weight_ptr, cols, dtype, HEAD_DIM: tl.constexpr):
    """A piece of the weight, rounded to qkv's dtype (module notes), in fp32."""
    return tl.load(weight_ptr + cols, mask=cols < HEAD_DIM, other=0.0).to(dtype).to(tl.float32)


@triton.jit
def _qk_norm_fwd_kernel(
    x_ptr, out_ptr, weight_ptr, N, C, stride_b, stride_n, eps,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr,
):
    # Grid (row blocks, B, H). x is q's or k's C channels of qkv, out a contiguous (B, N, H, D) buffer.
    n = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = n < N
    src, dst = _rows(x_ptr, tl.program_id(1), tl.program_id(2), n, N, stride_b, stride_n, C, HEAD_DIM)
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, HEAD)
    x = _piece(src, cols, row_ok, HEAD_DIM, False)
    sum_sq = tl.sum(x * x, axis=1)
    if TAIL > 0:
        tail = HEAD + tl.arange(0, TAIL)
        x_tail = _piece(src, tail, row_ok, HEAD_DIM, True)
        sum_sq += tl.sum(x_tail * x_tail, axis=1)
    rstd = tl.rsqrt(sum_sq / HEAD_DIM + eps)[:, None]
    y = (x * rstd).to(dtype).to(tl.float32) * _weight(weight_ptr, cols, dtype, HEAD_DIM)[None, :]
    tl.store(out_ptr + dst + cols[None, :], y.to(dtype), mask=row_ok[:, None])
    if TAIL > 0:
        y = (x_tail * rstd).to(dtype).to(tl.float32) * _weight(weight_ptr, tail, dtype, HEAD_DIM)[None, :]
        tl.store(out_ptr + dst + tail[None, :], y.to(dtype), mask=row_ok[:, None] & (tail < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["rows_per_program"])  # one compile for every grid (see one_wave)
def _qk_norm_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, weight_ptr, dweight_ptr, N, C, stride_b, stride_n, eps, rows_per_program,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr,
):
    # With n = x * rstd (rounded as in the forward; the gradient passes the roundings straight through) and
    # dn = dy * weight: dx = rstd * (dn - n * mean(dn * n)); d(weight) = sum over rows of dy * n.
    # dy is a contiguous (B, N, H, D) gradient, dx q's or k's C channels of a contiguous (B, N, 3C) buffer.
    # Grid (B, P, H): program (b, p, h) walks rows [p * rows_per_program, ...) of head h of sample b, adding
    # dy * n into a register tile and reducing it over rows once at the end (that reduction, once per block of
    # rows, was 45% of the instructions: bf16 C=1152 on sm_90).
    b, h = tl.program_id(0), tl.program_id(2)
    first = tl.program_id(1) * rows_per_program
    last = tl.minimum(first + rows_per_program, N)
    dtype = dx_ptr.dtype.element_ty
    cols = tl.arange(0, HEAD)
    weight = _weight(weight_ptr, cols, dtype, HEAD_DIM)
    acc = tl.zeros((BLOCK_M, HEAD), tl.float32)
    if TAIL > 0:
        tail = HEAD + tl.arange(0, TAIL)
        tail_ok = tail < HEAD_DIM
        weight_tail = _weight(weight_ptr, tail, dtype, HEAD_DIM)
        acc_tail = tl.zeros((BLOCK_M, TAIL), tl.float32)
    for start in range(first, last, BLOCK_M):
        n = start + tl.arange(0, BLOCK_M)
        row_ok = n < last
        src, dst = _rows(x_ptr, b, h, n, N, stride_b, stride_n, C, HEAD_DIM)
        _, dx_dst = _rows(x_ptr, b, h, n, N, stride_b, stride_n, 3 * C, HEAD_DIM)
        x = _piece(src, cols, row_ok, HEAD_DIM, False)
        dy = _piece(dy_ptr + dst, cols, row_ok, HEAD_DIM, False)
        sum_sq = tl.sum(x * x, axis=1)
        if TAIL > 0:
            x_tail = _piece(src, tail, row_ok, HEAD_DIM, True)
            dy_tail = _piece(dy_ptr + dst, tail, row_ok, HEAD_DIM, True)
            sum_sq += tl.sum(x_tail * x_tail, axis=1)
        rstd = tl.rsqrt(sum_sq / HEAD_DIM + eps)[:, None]
        normalized = (x * rstd).to(dtype).to(tl.float32)
        dn = dy * weight[None, :]
        dot = tl.sum(dn * normalized, axis=1)
        acc += dy * normalized  # rows past `last` loaded dy = 0
        if TAIL > 0:
            normalized_tail = (x_tail * rstd).to(dtype).to(tl.float32)
            dn_tail = dy_tail * weight_tail[None, :]
            dot += tl.sum(dn_tail * normalized_tail, axis=1)
            acc_tail += dy_tail * normalized_tail
        mean = (dot / HEAD_DIM)[:, None]
        tl.store(dx_ptr + dx_dst + cols[None, :], ((dn - normalized * mean) * rstd).to(dtype), mask=row_ok[:, None])
        if TAIL > 0:
            tl.store(dx_ptr + dx_dst + tail[None, :], ((dn_tail - normalized_tail * mean) * rstd).to(dtype),
                     mask=row_ok[:, None] & tail_ok[None, :])
    # This program's d(weight) partial sum: row (b, p, h) of a (B, P, H, HEAD_DIM) buffer.
    partial = dweight_ptr + ((b * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + h) * HEAD_DIM
    tl.store(partial + cols, tl.sum(acc, axis=0))
    if TAIL > 0:
        tl.store(partial + tail, tl.sum(acc_tail, axis=0), mask=tail_ok)


def _pieces(D):
    """(BLOCK_M, HEAD, TAIL): a head's D channels as HEAD + TAIL (TAIL 0 when D is a power of two)."""
    head = 1 << (D.bit_length() - 1)
    tail = triton.next_power_of_2(D - head) if D > head else 0
    return max(1, ELEMENTS_PER_PROGRAM // head), head, tail


def _launch_forward(qkv, num_heads, q_weight, k_weight, eps):
    B, N, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    block_m, head, tail = _pieces(D)
    grid = (triton.cdiv(N, block_m), B, num_heads)
    outputs = []
    for part, weight in enumerate((q_weight, k_weight)):
        out = new_buffer((B, N, num_heads, D), qkv.dtype, qkv.device)
        _qk_norm_fwd_kernel[grid](qkv[:, :, part * C:(part + 1) * C], out, weight, N, C, qkv.stride(0), qkv.stride(1),
                                  eps,
                                  HEAD_DIM=D, BLOCK_M=block_m, HEAD=head, TAIL=tail, num_warps=4)
        outputs.append(out)
    return tuple(outputs)


def _launch_backward(dq, dk, qkv, num_heads, q_weight, k_weight, eps):
    B, N, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    block_m, head, tail = _pieces(D)
    sizes = dict(HEAD_DIM=D, BLOCK_M=block_m, HEAD=head, TAIL=tail)
    dqkv = new_buffer((B, N, C3), qkv.dtype, qkv.device)
    dqkv[:, :, 2 * C:].zero_()  # v's gradient is added through the view
    dweights = []
    for part, (dy, weight) in enumerate(((dq, q_weight), (dk, k_weight))):
        channels = slice(part * C, (part + 1) * C)

        def arguments(partial, rows_per_program):
            return (qkv[:, :, channels], dy, dqkv[:, :, channels], weight, partial, N, C, qkv.stride(0),
                    qkv.stride(1), eps, rows_per_program)

        dy = dy.contiguous()
        partial = new_buffer((1, D), torch.float32, qkv.device)
        wave = one_wave(_qk_norm_bwd_kernel, qkv, BACKWARD_WARPS, *arguments(partial, 1), **sizes)
        programs, rows_per_program = reduction_split(N, B * num_heads, block_m, wave)
        partial = new_buffer((B, programs, num_heads, D), torch.float32, qkv.device)
        _qk_norm_bwd_kernel[(B, programs, num_heads)](*arguments(partial, rows_per_program), **sizes,
                                                      num_warps=BACKWARD_WARPS)
        dweights.append(partial.sum((0, 1, 2)).to(weight.dtype))
    return dqkv, *dweights


@torch.library.custom_op("sora::qk_norm", mutates_args=())
def _qk_norm_op(qkv: torch.Tensor, num_heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(qkv, num_heads, q_weight, k_weight, eps)


@_qk_norm_op.register_fake
def _(qkv, num_heads, q_weight, k_weight, eps):
    B, N, C3 = qkv.shape
    shape = (B, N, num_heads, C3 // (3 * num_heads))
    return qkv.new_empty(shape), qkv.new_empty(shape)


@torch.library.custom_op("sora::qk_norm_backward", mutates_args=())
def _qk_norm_backward_op(dq: torch.Tensor, dk: torch.Tensor, qkv: torch.Tensor, num_heads: int,
                         q_weight: torch.Tensor, k_weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(dq, dk, qkv, num_heads, q_weight, k_weight, eps)


@_qk_norm_backward_op.register_fake
def _(dq, dk, qkv, num_heads, q_weight, k_weight, eps):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return like(qkv), like(q_weight), like(k_weight)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, q_weight, k_weight, eps = inputs
    ctx.save_for_backward(qkv, q_weight, k_weight)
    ctx.num_heads, ctx.eps = num_heads, eps


def _backward(ctx, dq, dk):
    qkv, q_weight, k_weight = ctx.saved_tensors
    dqkv, dq_weight, dk_weight = _qk_norm_backward_op(dq, dk, qkv, ctx.num_heads, q_weight, k_weight, ctx.eps)
    return dqkv, None, dq_weight, dk_weight, None


_qk_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm_reference(x, weight, eps, dtype):
    """Open-Sora v1.1's LlamaRMSNorm over the last axis of x (fp32 or float64): normalize, round to dtype, times
    the weight in dtype, round again (the model dtype's product)."""
    normalized = (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)).to(dtype).to(x.dtype)
    return (normalized * weight.to(dtype).to(x.dtype)).to(dtype).to(x.dtype)


def _heads(t, num_heads):
    """(B, N, C) -> (B, H, N, D), a view."""
    return t.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def qk_norm_reference(qkv, num_heads, q_weight, k_weight, eps=1e-6):
    """Eager PyTorch: the definition the kernel is tested against, and the fallback off-GPU."""
    q, k, v = _heads(qkv, 3 * num_heads).chunk(3, dim=1)
    acc = compute_dtype(qkv)
    q, k = (rms_norm_reference(x.to(acc), w, eps, qkv.dtype).to(qkv.dtype) for x, w in ((q, q_weight), (k, k_weight)))
    return q, k, v


def qk_norm(qkv, num_heads, q_weight, k_weight, eps=1e-6):
    """q, k, v of the qkv Linear's output qkv (B, N, 3C) (channels (3, num_heads, D)), each (B, num_heads, N, D),
    with q and k RMS-normalized per head (weights q_weight, k_weight of shape (D,), fp32 statistics).

    q and k are new tensors laid out (B, N, H, D) in memory, as SDPA reads them; v is a view of qkv.
    Differentiable in qkv, q_weight and k_weight; outputs in qkv's dtype (module notes for the roundings).
    """
    check_tokens("qkv", qkv)
    B, N, C3 = qkv.shape
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if C3 % (3 * num_heads) != 0:
        raise ValueError(f"qkv of shape {tuple(qkv.shape)}: its last dim {C3} must be 3 * num_heads * D, "
                         f"divisible by 3 * num_heads = {3 * num_heads}")
    D = C3 // (3 * num_heads)
    if D > MAX_HEAD_DIM:
        raise ValueError(f"qk_norm supports head dim D <= {MAX_HEAD_DIM}, got D={D} for qkv of shape "
                         f"{tuple(qkv.shape)} and num_heads={num_heads}")
    for name, weight in (("q_weight", q_weight), ("k_weight", k_weight)):
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise ValueError(f"{name} must be a floating-point torch.Tensor of shape ({D},), got {weight!r}")
        if tuple(weight.shape) != (D,):
            raise ValueError(f"{name} must have shape ({D},) (the head dim), got {tuple(weight.shape)}")
        if weight.device != qkv.device:
            raise ValueError(f"{name} is on {weight.device} but qkv is on {qkv.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if not use_triton(qkv):
        return qk_norm_reference(qkv, num_heads, q_weight, k_weight, eps)
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    q, k = _qk_norm_op(qkv, num_heads, q_weight.contiguous(), k_weight.contiguous(), float(eps))
    v = _heads(qkv[:, :, 2 * (C3 // 3):], num_heads)
    return q.transpose(1, 2), k.transpose(1, 2), v
