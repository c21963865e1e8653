"""Temporal attention: each (sample, spatial position, head) attends over its T frames, read and written in
the frame-major layout.

qkv is what the qkv Linear writes on frame-major tokens: (B, T*S, 3*C), each token's 3*C channels laid out
(3, H, D). The output is (B, T*S, C), frame-major, where the proj Linear reads it. STDiT and Latte attend
over T = 16-64 frames with head dim 72: about T/2 FLOP per byte, so what counts is reading q/k/v once and
writing the output once, with no rearrange copies around the op and no padding of D=72 in memory.

One program owns one head of BLOCK_S spatial positions of one sample and holds q, k and v of all their T
frames on chip, (BLOCK_S, BLOCK_T, BLOCK_D): the whole (T, T) score matrix of each position at once, so the
softmax needs no online rescaling. Every load and store is a run of D contiguous channels per (position,
frame) (128-bit accesses at D=72); D is padded to a power of two only in registers, under a mask. The
products are batched tl.dot over the positions (tensor cores for bf16/fp16, fp32 accumulation): an earlier
version with fp32 FMAs, one query frame at a time, compiled for sm_90 to ~1 warp-instruction per byte at
T=16, about 3x over what an H100 can issue at its copy bandwidth; the dots take that to 0.14 (forward) and
0.23 (backward) at T=16 and ~0.3 at T=64, with no spills at D=72 (bf16, bench/kernel_report.py's count).

Backward recomputes the softmax instead of saving the log-sum-exp: the whole row of T scores is on chip, so
its max and sum cost one reduction over T, and neither row statistics nor the forward output are written
and read back. It reads qkv and the output gradient once and writes d(qkv) once, in qkv's layout.
"""

import torch

from sora.kernels._common import check_tokens, compute_dtype, new_buffer, use_triton
from sora.kernels._triton import tl, triton

# All T frames stay in registers; 128 frames of head dim 128 is already one position per program.
MAX_FRAMES = 128
MAX_HEAD_DIM = 128
# Bytes of one on-chip (BLOCK_S, BLOCK_T, BLOCK_D) operand tile: the forward holds q, k, v, the output and
# the (BLOCK_S, BLOCK_T, BLOCK_T) scores, the backward also dO, dq, dk, dv. These budgets compile for sm_90
# without spills in bf16 at D=72 for T=16 (4 and 2 positions per program) and T=64 (1); fp32 at T=64 spills.
FORWARD_TILE = 16384
BACKWARD_TILE = 8192


@triton.jit
def _tile(T, S, stride_b, stride_n, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
          BLOCK_D: tl.constexpr):
    """This program's (BLOCK_S, BLOCK_T, BLOCK_D) tile of positions, frames and head channels: the offsets of
    q in qkv, the tokens (b*N + t*S + s, for the contiguous output and gradients), the channels, the mask."""
    blocks = tl.cdiv(S, BLOCK_S)
    b = (tl.program_id(0) // blocks).to(tl.int64)  # int64: B*N*3C passes 2**31 at 64x512
    s = (tl.program_id(0) % blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    head = tl.program_id(1) * HEAD_DIM + d
    token = (t[None, :] * S + s[:, None]).to(tl.int64)  # (BLOCK_S, BLOCK_T): frame t of position s
    qkv_offsets = (b * stride_b + token * stride_n)[:, :, None] + head[None, None, :]
    mask = ((s < S)[:, None] & (t < T)[None, :])[:, :, None] & (d < HEAD_DIM)[None, None, :]
    return qkv_offsets, (b * T * S + token)[:, :, None], head[None, None, :], mask


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Batched a @ b with fp32 accumulation. UPCAST: operands go to fp32 first, exactly (the caller has already
    rounded them to the input dtype), because Triton's interpreter multiplies bf16 operands as raw integers."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _softmax_rows(q, k, T, scale_log2, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr):
    """softmax(q k^T * scale) over the T key frames, fp32: (BLOCK_S, BLOCK_T, BLOCK_T)."""
    scores = _dot(q, tl.trans(k, 0, 2, 1), PRECISION, UPCAST) * scale_log2  # log2 units: one exp2
    keys = tl.arange(0, BLOCK_T)
    scores = tl.where((keys < T)[None, None, :], scores, float("-inf"))
    p = tl.exp2(scores - tl.max(scores, axis=2)[:, :, None])
    return p / tl.sum(p, axis=2)[:, :, None]


@triton.jit
def _temporal_attention_fwd_kernel(
    qkv_ptr, out_ptr, T, S, C, stride_b, stride_n, scale_log2,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offsets, tokens, head, mask = _tile(T, S, stride_b, stride_n, HEAD_DIM, BLOCK_T, BLOCK_S, BLOCK_D)
    q = tl.load(qkv_ptr + offsets, mask=mask, other=0.0)
    k = tl.load(qkv_ptr + offsets + C, mask=mask, other=0.0)
    v = tl.load(qkv_ptr + offsets + 2 * C, mask=mask, other=0.0)
    p = _softmax_rows(q, k, T, scale_log2, PRECISION, UPCAST, BLOCK_T)
    out = _dot(p.to(v.dtype), v, PRECISION, UPCAST)
    tl.store(out_ptr + tokens * C + head, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _temporal_attention_bwd_kernel(
    qkv_ptr, dout_ptr, dqkv_ptr, T, S, C, stride_b, stride_n, scale, scale_log2,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # With P the softmax and dO the output gradient, per position: dV = P^T dO; dP = dO V^T;
    # dS = P * (dP - rowsum(P * dP)) * scale; dQ = dS K; dK = dS^T Q. Padded query frames have q = dO = 0,
    # so they add nothing to dK and dV.
    offsets, tokens, head, mask = _tile(T, S, stride_b, stride_n, HEAD_DIM, BLOCK_T, BLOCK_S, BLOCK_D)
    q = tl.load(qkv_ptr + offsets, mask=mask, other=0.0)
    k = tl.load(qkv_ptr + offsets + C, mask=mask, other=0.0)
    v = tl.load(qkv_ptr + offsets + 2 * C, mask=mask, other=0.0)
    dout = tl.load(dout_ptr + tokens * C + head, mask=mask, other=0.0)
    p = _softmax_rows(q, k, T, scale_log2, PRECISION, UPCAST, BLOCK_T)
    dv = _dot(tl.trans(p.to(v.dtype), 0, 2, 1), dout, PRECISION, UPCAST)
    dp = _dot(dout, tl.trans(v, 0, 2, 1), PRECISION, UPCAST)
    ds = (p * (dp - tl.sum(p * dp, axis=2)[:, :, None]) * scale).to(q.dtype)
    dq = _dot(ds, k, PRECISION, UPCAST)
    dk = _dot(tl.trans(ds, 0, 2, 1), q, PRECISION, UPCAST)
    grad_offsets = tokens * (3 * C) + head  # d(qkv) is a new contiguous (B, N, 3C) buffer
    dtype = dqkv_ptr.dtype.element_ty
    tl.store(dqkv_ptr + grad_offsets, dq.to(dtype), mask=mask)
    tl.store(dqkv_ptr + grad_offsets + C, dk.to(dtype), mask=mask)
    tl.store(dqkv_ptr + grad_offsets + 2 * C, dv.to(dtype), mask=mask)


def _tile_sizes(T, D, budget, element_size):
    """(BLOCK_T, BLOCK_S, BLOCK_D, num_warps): as many spatial positions per program as fit the budget (bytes
    of one operand tile). tl.dot needs every tile side >= 16, so short videos and narrow heads are padded in
    registers."""
    block_t, block_d = max(triton.next_power_of_2(T), 16), max(triton.next_power_of_2(D), 16)
    block_s = max(1, min(64, budget // (block_t * block_d * element_size)))
    tile_bytes = block_t * block_s * block_d * element_size
    num_warps = 16 if tile_bytes >= 32768 else 8 if tile_bytes >= 8192 else 4
    return block_t, block_s, block_d, num_warps


def _launch(qkv, dout, T, num_heads, scale):
    """Forward when dout is None, else the backward's d(qkv)."""
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    B, N, C3 = qkv.shape
    C, S = C3 // 3, N // T
    D = C // num_heads
    block_t, block_s, block_d, num_warps = _tile_sizes(T, D, FORWARD_TILE if dout is None else BACKWARD_TILE,
                                                          qkv.element_size())
    grid = (B * triton.cdiv(S, block_s), num_heads)
    # fp32 inputs keep fp32 products (TF32 would miss the fp32 tolerance); bf16/fp16 run on tensor cores.
    precision = "ieee" if qkv.dtype == torch.float32 else "tf32"
    upcast = qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu"  # the interpreter: see _dot
    sizes = dict(HEAD_DIM=D, PRECISION=precision, UPCAST=upcast, BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_d,
                 num_warps=num_warps)
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
