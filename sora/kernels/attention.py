"""Temporal attention: each (sample, spatial position, head) attends over its T frames, read and written in
the frame-major layout.

qkv is what the qkv Linear writes on frame-major tokens: (B, T*S, 3*C), each token's 3*C channels laid out
(3, H, D). The output is (B, T*S, C), frame-major, where the proj Linear reads it. STDiT and Latte attend
over T = 16-64 frames with head dim 72: about T/2 FLOP per byte, memory-bound many times over, so what
counts is reading q/k/v once and writing the output once, with no rearrange copies around the op and no
padding of D=72 to a tensor-core tile.

One program owns one head of BLOCK_S spatial positions of one sample and holds k and v of all T frames of
them on chip, (BLOCK_T, BLOCK_S, BLOCK_D); it then walks the T query frames, loading one (BLOCK_S, D) row of
q per frame, and computes the whole softmax row over the T keys at once (no online softmax: the row is
complete on chip). Every load and store is a run of D contiguous channels per (frame, position); D is
padded to a power of two only in registers (a mask), never in memory. The dot products are fp32 FMAs, not
tensor cores: a (T, T) score tile per position is too small for an MMA, and at T/2 FLOP per byte the FMAs
keep up with memory up to T of about 40 on Hopper.

Backward recomputes the softmax instead of saving the log-sum-exp: the whole row of T scores is on chip, so
its max and sum cost one reduction over T, and neither the row statistics nor the forward output have to be
written and read back. It reads qkv and the output gradient once and writes d(qkv) once, in qkv's layout:
dq per query frame as it goes, dk and dv (accumulated in fp32 registers over the query frames) at the end.
"""

import torch

from sora.kernels._common import check_tokens, compute_dtype, new_buffer, use_triton
from sora.kernels._triton import tl, triton

# All T frames of k and v stay in registers; 128 frames of head dim 128 is already one position per program.
MAX_FRAMES = 128
MAX_HEAD_DIM = 128
# Values of one on-chip (BLOCK_T, BLOCK_S, BLOCK_D) tile: the forward keeps two (k, v), the backward four
# (k, v, dk, dv), so each gets the budget that keeps a program's registers at about 64 fp32 values per
# thread of 8 warps, whatever T and D are.
FORWARD_TILE = 8192
BACKWARD_TILE = 4096


@triton.jit
def _temporal_attention_fwd_kernel(
    qkv_ptr, out_ptr, T, S, C, stride_b, stride_n, scale_log2,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    blocks = tl.cdiv(S, BLOCK_S)
    b = tl.program_id(0) // blocks
    s = (tl.program_id(0) % blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    h = tl.program_id(1)
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < S
    d_ok = d < HEAD_DIM
    head = h * HEAD_DIM + d  # channel of (q, h, d); k and v are C and 2C further
    # int64 offsets: B*N*3C passes 2**31 at 64x512.
    sample = b.to(tl.int64) * stride_b

    # k, v of all frames: (BLOCK_T, BLOCK_S, BLOCK_D), rows t*S + s of the sample.
    rows = sample + (t[:, None] * S + s[None, :]).to(tl.int64) * stride_n
    tile_ok = ((t < T)[:, None] & s_ok[None, :])[:, :, None] & d_ok[None, None, :]
    k = tl.load(qkv_ptr + rows[:, :, None] + (C + head)[None, None, :], mask=tile_ok, other=0.0).to(tl.float32)
    v = tl.load(qkv_ptr + rows[:, :, None] + (2 * C + head)[None, None, :], mask=tile_ok, other=0.0).to(tl.float32)

    row_ok = s_ok[:, None] & d_ok[None, :]
    for i in range(T):
        frame = (i * S + s).to(tl.int64)  # (BLOCK_S,) token index of query frame i
        q = tl.load(qkv_ptr + sample + frame[:, None] * stride_n + head[None, :], mask=row_ok, other=0.0)
        # Scores in log2 units (scale * log2(e) folded in), so the softmax is one exp2.
        scores = tl.sum(q.to(tl.float32)[None, :, :] * k, axis=2) * scale_log2  # (BLOCK_T, BLOCK_S)
        scores = tl.where((t < T)[:, None], scores, float("-inf"))
        p = tl.exp2(scores - tl.max(scores, axis=0)[None, :])
        p = p / tl.sum(p, axis=0)[None, :]
        out = tl.sum(p[:, :, None] * v, axis=0)  # (BLOCK_S, BLOCK_D)
        out_offsets = (b.to(tl.int64) * T * S + frame)[:, None] * C + (h * HEAD_DIM + d)[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _temporal_attention_bwd_kernel(
    qkv_ptr, dout_ptr, dqkv_ptr, T, S, C, stride_b, stride_n, scale, scale_log2,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    # Same program map as the forward. Per query frame i, with P the softmax row and dO the output gradient:
    # dV += P^T dO; dP = dO V^T; dS = P * (dP - sum(P * dP)); dQ = scale * dS K; dK += scale * dS^T Q.
    blocks = tl.cdiv(S, BLOCK_S)
    b = tl.program_id(0) // blocks
    s = (tl.program_id(0) % blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    h = tl.program_id(1)
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < S
    d_ok = d < HEAD_DIM
    head = h * HEAD_DIM + d
    sample = b.to(tl.int64) * stride_b
    grad_sample = b.to(tl.int64) * T * S * 3 * C  # d(qkv) is a new contiguous (B, N, 3C) buffer
    out_sample = b.to(tl.int64) * T * S * C  # so is the output gradient (made contiguous by the launcher)

    token = (t[:, None] * S + s[None, :]).to(tl.int64)
    rows = sample + token * stride_n
    tile_ok = ((t < T)[:, None] & s_ok[None, :])[:, :, None] & d_ok[None, None, :]
    k = tl.load(qkv_ptr + rows[:, :, None] + (C + head)[None, None, :], mask=tile_ok, other=0.0).to(tl.float32)
    v = tl.load(qkv_ptr + rows[:, :, None] + (2 * C + head)[None, None, :], mask=tile_ok, other=0.0).to(tl.float32)
    dk = tl.zeros([BLOCK_T, BLOCK_S, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_T, BLOCK_S, BLOCK_D], dtype=tl.float32)

    row_ok = s_ok[:, None] & d_ok[None, :]
    for i in range(T):
        frame = (i * S + s).to(tl.int64)
        q = tl.load(qkv_ptr + sample + frame[:, None] * stride_n + head[None, :], mask=row_ok, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + out_sample + frame[:, None] * C + head[None, :], mask=row_ok, other=0.0).to(tl.float32)
        scores = tl.sum(q[None, :, :] * k, axis=2) * scale_log2
        scores = tl.where((t < T)[:, None], scores, float("-inf"))
        p = tl.exp2(scores - tl.max(scores, axis=0)[None, :])
        p = p / tl.sum(p, axis=0)[None, :]  # (BLOCK_T, BLOCK_S)
        dv += p[:, :, None] * dout[None, :, :]
        dp = tl.sum(dout[None, :, :] * v, axis=2)
        ds = p * (dp - tl.sum(p * dp, axis=0)[None, :]) * scale
        dq = tl.sum(ds[:, :, None] * k, axis=0)
        tl.store(dqkv_ptr + grad_sample + frame[:, None] * (3 * C) + head[None, :],
                 dq.to(dqkv_ptr.dtype.element_ty), mask=row_ok)
        dk += ds[:, :, None] * q[None, :, :]

    grad_rows = grad_sample + token * (3 * C)
    tl.store(dqkv_ptr + grad_rows[:, :, None] + (C + head)[None, None, :], dk.to(dqkv_ptr.dtype.element_ty),
             mask=tile_ok)
    tl.store(dqkv_ptr + grad_rows[:, :, None] + (2 * C + head)[None, None, :], dv.to(dqkv_ptr.dtype.element_ty),
             mask=tile_ok)


def _tile(T, D, budget):
    """(BLOCK_T, BLOCK_S, BLOCK_D, num_warps): as many spatial positions per program as fit the budget."""
    block_t, block_d = triton.next_power_of_2(T), max(triton.next_power_of_2(D), 8)
    block_s = max(1, min(64, budget // (block_t * block_d)))
    num_warps = 8 if block_t * block_s * block_d >= 4096 else 4
    return block_t, block_s, block_d, num_warps


def _launch(qkv, dout, T, num_heads, scale):
    """Forward when dout is None, else the backward's d(qkv)."""
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    B, N, C3 = qkv.shape
    C, S = C3 // 3, N // T
    D = C // num_heads
    block_t, block_s, block_d, num_warps = _tile(T, D, FORWARD_TILE if dout is None else BACKWARD_TILE)
    grid = (B * triton.cdiv(S, block_s), num_heads)
    sizes = dict(BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_d, HEAD_DIM=D, num_warps=num_warps)
    scale_log2 = scale * 1.4426950408889634  # log2(e)
    if dout is None:
        out = new_buffer((B, N, C), qkv.dtype, qkv.device)
        _temporal_attention_fwd_kernel[grid](qkv, out, T, S, C, qkv.stride(0), qkv.stride(1), scale_log2,
                                             **sizes)
        return out
    dqkv = new_buffer((B, N, C3), qkv.dtype, qkv.device)
    _temporal_attention_bwd_kernel[grid](qkv, dout.contiguous(), dqkv, T, S, C, qkv.stride(0),
                                         qkv.stride(1), scale, scale_log2, **sizes)
    return dqkv


@torch.library.custom_op("sora::temporal_attention", mutates_args=())
def _temporal_attention_op(qkv: torch.Tensor, T: int, num_heads: int, scale: float) -> torch.Tensor:
    return _launch(qkv, None, T, num_heads, scale)


@_temporal_attention_op.register_fake
def _(qkv, T, num_heads, scale):
    B, N, C3 = qkv.shape
    return qkv.new_empty((B, N, C3 // 3))


@torch.library.custom_op("sora::temporal_attention_backward", mutates_args=())
def _temporal_attention_backward_op(dout: torch.Tensor, qkv: torch.Tensor, T: int, num_heads: int,
                                    scale: float) -> torch.Tensor:
    return _launch(qkv, dout, T, num_heads, scale)


@_temporal_attention_backward_op.register_fake
def _(dout, qkv, T, num_heads, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    qkv, T, num_heads, scale = inputs
    ctx.save_for_backward(qkv)
    ctx.T, ctx.num_heads, ctx.scale = T, num_heads, scale


def _backward(ctx, dout):
    (qkv,) = ctx.saved_tensors
    return _temporal_attention_backward_op(dout, qkv, ctx.T, ctx.num_heads, ctx.scale), None, None, None


_temporal_attention_op.register_autograd(_backward, setup_context=_setup_context)


def temporal_attention_reference(qkv, T, num_heads, scale=None):
    """Eager PyTorch: the definition the kernel is tested against, and the fallback off-GPU."""
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    scale = D**-0.5 if scale is None else scale
    # (B, T*S, 3*H*D) -> 3 x (B, S, H, T, D)
    q, k, v = qkv.to(compute_dtype(qkv)).view(B, T, N // T, 3, num_heads, D).permute(3, 0, 2, 4, 1, 5).unbind(0)
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    out = (p @ v).permute(0, 3, 1, 2, 4)  # (B, S, H, T, D) -> (B, T, S, H, D)
    return out.reshape(B, N, C3 // 3).to(qkv.dtype)


def temporal_attention(qkv, T, num_heads, scale=None):
    """Softmax attention over the T frames of each (sample, spatial position, head).

    qkv: (B, T*S, 3*C) frame-major tokens, each token's channels laid out (3, num_heads, D) as a fused qkv
    Linear writes them; returns (B, T*S, C), frame-major. scale defaults to D**-0.5; the softmax is fp32.
    T <= 128, D = C / num_heads <= 128. Differentiable in qkv (d(qkv) comes back in qkv's layout).
    """
    check_tokens("qkv", qkv)
    B, N, C3 = qkv.shape
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int (the frame count), got {T!r}")
    if T > MAX_FRAMES:
        raise ValueError(f"temporal_attention supports T <= {MAX_FRAMES} frames, got T={T} for qkv of shape {tuple(qkv.shape)}")
    if N % T != 0:
        raise ValueError(f"T={T} does not divide the token count N={N} of qkv {tuple(qkv.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if C3 % (3 * num_heads) != 0:
        raise ValueError(
            f"qkv of shape {tuple(qkv.shape)}: its last dim {C3} must be 3 * num_heads * D, "
            f"divisible by 3 * num_heads = {3 * num_heads}"
        )
    D = C3 // (3 * num_heads)
    if D > MAX_HEAD_DIM:
        raise ValueError(f"temporal_attention supports head dim D <= {MAX_HEAD_DIM}, got D={D} for qkv of shape "
                         f"{tuple(qkv.shape)} and num_heads={num_heads}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale must be a number or None, got {scale!r}")
    scale = D**-0.5 if scale is None else float(scale)
    if not use_triton(qkv):
        return temporal_attention_reference(qkv, T, num_heads, scale)
    return _temporal_attention_op(qkv, T, num_heads, scale)
