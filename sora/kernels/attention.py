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
T=16, about 3x over what an H100 can issue at its copy bandwidth; the bf16 dots take that to 0.094 (forward)
and 0.126 (backward) at T=16 and 0.136 / 0.127 at T=64, with no spills at D=72 (bench/kernel_report.py's
count; RoPE and qk-norm in the prologue: 0.192 / 0.295 at T=16, 0.299 / 0.397 at T=64, bench/NOTES.md).

Backward recomputes the softmax instead of saving the log-sum-exp: the whole row of T scores is on chip, so
its max and sum cost one reduction over T, and neither row statistics nor the forward output are written
and read back. It reads qkv and the output gradient once and writes d(qkv) once, in qkv's layout.

STDiT2 (Open-Sora v1.1) rotates q and k by frame (RoPE) and RMS-normalizes each head of q and k before the
softmax. Both run in the kernels' prologue, on the q and k tiles already in registers, so they cost no pass
over memory; the backward recomputes them from qkv. Their dtype behaviour follows Open-Sora v1.1 (their
d599fd7 blocks.py LlamaRMSNorm and rotary-embedding-torch 0.5.3's rotate_queries_or_keys):
- RoPE: channel pairs (2i, 2i+1) of q and k rotate by (frame_offset + t) * freqs[i], t the frame index. The
  angle (one fp32 product), its cos and sin and the rotation are fp32; theirs are in the model dtype, a bf16
  angle at frame 100 off by up to 0.25 rad, and each of their products is rounded. The rotated tile stays
  fp32 into the norm's statistics (a rounding fewer than theirs); rotated last, it is rounded to qkv's dtype
  for the products, where their rotation returns.
- RMSNorm per head: fp32 statistics, x * rsqrt(mean(x^2) + eps) rounded to qkv's dtype (their `.to(dtype)`),
  times the weight in qkv's dtype, one rounding: exactly their product when the weight has the model dtype
  (a float32 weight is rounded to qkv's dtype first, where theirs would promote q and k to float32).
- rope_first=True is the order the v1.1 checkpoints were trained with (RoPE, then the norm); False is the
  order their dev branch corrected it to (norm, then RoPE; 7fcf0c6).
- The softmax scale multiplies the fp32 scores, as without the prologue, not q in the model dtype: the
  same value, one rounding fewer.
The weight gradients are reduced over each program's tile, one partial row per program, and summed after
the kernel: no atomics, so they are the same from run to run.
"""

import torch

from sora.kernels._common import check_tokens, compute_dtype, new_buffer, use_triton
from sora.kernels._triton import tl, triton
from sora.kernels.qknorm import rms_norm_reference

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
def _angles(rotation_ptr, T, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """cos and sin of the RoPE angles, (BLOCK_T, BLOCK_D // 2) each, from the launcher's fp32 table (2, T,
    HEAD_DIM // 2). A table, not tl.cos: libdevice's cosf and sinf cost 943 more instructions per program
    (2373 -> 1430, forward, bf16, T=16, D=72 on sm_90) for angles the whole grid shares."""
    t = tl.arange(0, BLOCK_T)[:, None]
    pair = tl.arange(0, BLOCK_D // 2)[None, :]
    offsets = t * (HEAD_DIM // 2) + pair
    mask = (t < T) & (pair < HEAD_DIM // 2)
    cos = tl.load(rotation_ptr + offsets, mask=mask, other=0.0)
    sin = tl.load(rotation_ptr + T * (HEAD_DIM // 2) + offsets, mask=mask, other=0.0)
    return cos, sin


@triton.jit
def _rope(x, cos, sin, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate the channel pairs (2i, 2i+1) of an fp32 tile by the angles of _angles; -sin rotates back."""
    even, odd = tl.split(tl.reshape(x, (BLOCK_S, BLOCK_T, BLOCK_D // 2, 2)))
    cos, sin = cos[None, :, :], sin[None, :, :]
    return tl.reshape(tl.join(even * cos - odd * sin, odd * cos + even * sin), (BLOCK_S, BLOCK_T, BLOCK_D))


@triton.jit
def _prologue(x, weight, cos, sin, eps, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr, NORM: tl.constexpr,
              ROPE_FIRST: tl.constexpr, UPCAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """RoPE and RMSNorm of a q or k tile, rounded as the module notes say. Returns the tile in x's dtype and, for
    the backward, the normalized tile before the weight (in x's dtype) and its rstd."""
    dtype = x.dtype
    y = x.to(tl.float32)
    if ROPE and ROPE_FIRST:
        y = _rope(y, cos, sin, BLOCK_S, BLOCK_T, BLOCK_D)
    normalized, rstd = x, tl.full((BLOCK_S, BLOCK_T), 1.0, tl.float32)
    if NORM:
        # Padded channels are 0 and count nothing; the mean is over the HEAD_DIM real ones.
        rstd = tl.rsqrt(tl.sum(y * y, axis=2) / HEAD_DIM + eps)
        normalized = (y * rstd[:, :, None]).to(dtype)
        if UPCAST:  # the interpreter multiplies bf16 as raw integers (see _dot); the same product, rounded once
            y = (normalized.to(tl.float32) * weight.to(tl.float32)[None, None, :]).to(dtype).to(tl.float32)
        else:
            y = (normalized * weight[None, None, :]).to(tl.float32)
    if ROPE and not ROPE_FIRST:
        y = _rope(y, cos, sin, BLOCK_S, BLOCK_T, BLOCK_D)
    return y.to(dtype), normalized, rstd


@triton.jit
def _prologue_grad(dy, normalized, rstd, weight, cos, sin, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr,
                   NORM: tl.constexpr, ROPE_FIRST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """d(x) and this tile's d(weight) (BLOCK_D,) from the gradient dy (fp32) of _prologue's output. The
    roundings pass the gradient straight through."""
    dweight = tl.zeros((BLOCK_D,), tl.float32)
    if ROPE and not ROPE_FIRST:
        dy = _rope(dy, cos, -sin, BLOCK_S, BLOCK_T, BLOCK_D)
    if NORM:
        n = normalized.to(tl.float32)
        dweight = tl.sum(tl.sum(dy * n, axis=1), axis=0)
        dn = dy * weight[None, None, :]
        dy = (dn - n * (tl.sum(dn * n, axis=2) / HEAD_DIM)[:, :, None]) * rstd[:, :, None]
    if ROPE and ROPE_FIRST:
        dy = _rope(dy, cos, -sin, BLOCK_S, BLOCK_T, BLOCK_D)
    return dy, dweight


@triton.jit
def _prologue_inputs(q_weight_ptr, k_weight_ptr, rotation_ptr, T, dtype, HEAD_DIM: tl.constexpr,
                     ROPE: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """The q and k norm weights (in qkv's dtype, (BLOCK_D,), 0 past HEAD_DIM) and the RoPE cos and sin, where
    used."""
    d = tl.arange(0, BLOCK_D)
    q_weight, k_weight, cos, sin = 0.0, 0.0, 0.0, 0.0
    if NORM:
        q_weight = tl.load(q_weight_ptr + d, mask=d < HEAD_DIM, other=0.0).to(dtype)
        k_weight = tl.load(k_weight_ptr + d, mask=d < HEAD_DIM, other=0.0).to(dtype)
    if ROPE:
        cos, sin = _angles(rotation_ptr, T, HEAD_DIM, BLOCK_T, BLOCK_D)
    return q_weight, k_weight, cos, sin


@triton.jit
def _temporal_attention_fwd_kernel(
    qkv_ptr, out_ptr, q_weight_ptr, k_weight_ptr, rotation_ptr, T, S, C, stride_b, stride_n, scale_log2, eps,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROPE: tl.constexpr,
    NORM: tl.constexpr, ROPE_FIRST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offsets, tokens, head, mask = _tile(T, S, stride_b, stride_n, HEAD_DIM, BLOCK_T, BLOCK_S, BLOCK_D)
    q = tl.load(qkv_ptr + offsets, mask=mask, other=0.0)
    k = tl.load(qkv_ptr + offsets + C, mask=mask, other=0.0)
    v = tl.load(qkv_ptr + offsets + 2 * C, mask=mask, other=0.0)
    if ROPE or NORM:
        q_weight, k_weight, cos, sin = _prologue_inputs(q_weight_ptr, k_weight_ptr, rotation_ptr, T, q.dtype,
                                                        HEAD_DIM, ROPE, NORM, BLOCK_T, BLOCK_D)
        q, _, _ = _prologue(q, q_weight, cos, sin, eps, HEAD_DIM, ROPE, NORM, ROPE_FIRST, UPCAST, BLOCK_S, BLOCK_T,
                            BLOCK_D)
        k, _, _ = _prologue(k, k_weight, cos, sin, eps, HEAD_DIM, ROPE, NORM, ROPE_FIRST, UPCAST, BLOCK_S, BLOCK_T,
                            BLOCK_D)
    p = _softmax_rows(q, k, T, scale_log2, PRECISION, UPCAST, BLOCK_T)
    out = _dot(p.to(v.dtype), v, PRECISION, UPCAST)
    tl.store(out_ptr + tokens * C + head, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _temporal_attention_bwd_kernel(
    qkv_ptr, dout_ptr, dqkv_ptr, q_weight_ptr, k_weight_ptr, rotation_ptr, dq_weight_ptr, dk_weight_ptr,
    T, S, C, stride_b, stride_n, scale, scale_log2, eps,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROPE: tl.constexpr,
    NORM: tl.constexpr, ROPE_FIRST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # With P the softmax and dO the output gradient, per position: dV = P^T dO; dP = dO V^T;
    # dS = P * (dP - rowsum(P * dP)) * scale; dQ = dS K; dK = dS^T Q. Padded query frames have q = dO = 0
    # (the prologue keeps a zero vector zero), so they add nothing to dK and dV.
    offsets, tokens, head, mask = _tile(T, S, stride_b, stride_n, HEAD_DIM, BLOCK_T, BLOCK_S, BLOCK_D)
    q = tl.load(qkv_ptr + offsets, mask=mask, other=0.0)
    k = tl.load(qkv_ptr + offsets + C, mask=mask, other=0.0)
    v = tl.load(qkv_ptr + offsets + 2 * C, mask=mask, other=0.0)
    dout = tl.load(dout_ptr + tokens * C + head, mask=mask, other=0.0)
    if ROPE or NORM:
        q_weight, k_weight, cos, sin = _prologue_inputs(q_weight_ptr, k_weight_ptr, rotation_ptr, T, q.dtype,
                                                        HEAD_DIM, ROPE, NORM, BLOCK_T, BLOCK_D)
        q, q_normalized, q_rstd = _prologue(q, q_weight, cos, sin, eps, HEAD_DIM, ROPE, NORM, ROPE_FIRST,
                                            UPCAST, BLOCK_S, BLOCK_T, BLOCK_D)
        k, k_normalized, k_rstd = _prologue(k, k_weight, cos, sin, eps, HEAD_DIM, ROPE, NORM, ROPE_FIRST,
                                            UPCAST, BLOCK_S, BLOCK_T, BLOCK_D)
    p = _softmax_rows(q, k, T, scale_log2, PRECISION, UPCAST, BLOCK_T)
    grad_offsets = tokens * (3 * C) + head  # d(qkv) is a new contiguous (B, N, 3C) buffer
    dtype = dqkv_ptr.dtype.element_ty
    dv = _dot(tl.trans(p.to(v.dtype), 0, 2, 1), dout, PRECISION, UPCAST)
    tl.store(dqkv_ptr + grad_offsets + 2 * C, dv.to(dtype), mask=mask)  # at once: its fp32 tile is not held on
    dp = _dot(dout, tl.trans(v, 0, 2, 1), PRECISION, UPCAST)
    ds = (p * (dp - tl.sum(p * dp, axis=2)[:, :, None]) * scale).to(q.dtype)
    dq = _dot(ds, k, PRECISION, UPCAST)
    dk = _dot(tl.trans(ds, 0, 2, 1), q, PRECISION, UPCAST)
    if ROPE or NORM:
        if ROPE:  # read again (L1/L2), not held in registers through the five dots: at T=64 that spilled
            cos, sin = _angles(rotation_ptr, T, HEAD_DIM, BLOCK_T, BLOCK_D)
        dq, dq_weight = _prologue_grad(dq, q_normalized, q_rstd, q_weight, cos, sin, HEAD_DIM, ROPE, NORM,
                                       ROPE_FIRST, BLOCK_S, BLOCK_T, BLOCK_D)
        dk, dk_weight = _prologue_grad(dk, k_normalized, k_rstd, k_weight, cos, sin, HEAD_DIM, ROPE, NORM,
                                       ROPE_FIRST, BLOCK_S, BLOCK_T, BLOCK_D)
        if NORM:  # this program's partial sums: row (program, head) of a (programs, H, HEAD_DIM) buffer
            d = tl.arange(0, BLOCK_D)
            partial = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * HEAD_DIM + d
            tl.store(dq_weight_ptr + partial, dq_weight, mask=d < HEAD_DIM)
            tl.store(dk_weight_ptr + partial, dk_weight, mask=d < HEAD_DIM)
    tl.store(dqkv_ptr + grad_offsets, dq.to(dtype), mask=mask)
    tl.store(dqkv_ptr + grad_offsets + C, dk.to(dtype), mask=mask)


def _tile_sizes(T, D, budget, element_size, prologue):
    """(BLOCK_T, BLOCK_S, BLOCK_D, num_warps): as many spatial positions per program as fit the budget (bytes
    of one operand tile). tl.dot needs every tile side >= 16, so short videos and narrow heads are padded in
    registers. With the prologue, 16-bit tiles of up to 16 frames take half the warps: twice the elements per
    thread amortise the per-row work (bf16, T=16, D=72 on sm_90: forward 0.222 -> 0.192 warp-instructions per
    byte at 141 registers, backward 0.370 -> 0.292 at 254, no spills); at T=64 or in fp32 they would spill."""
    block_t, block_d = max(triton.next_power_of_2(T), 16), max(triton.next_power_of_2(D), 16)
    block_s = max(1, min(64, budget // (block_t * block_d * element_size)))
    tile_bytes = block_t * block_s * block_d * element_size
    num_warps = 16 if tile_bytes >= 32768 else 8 if tile_bytes >= 8192 else 4
    if prologue and element_size == 2 and block_t <= 16:
        num_warps = max(4, num_warps // 2)
    return block_t, block_s, block_d, num_warps


def _rotation(rope_freqs, T, frame_offset):
    """The (2, T, D/2) fp32 table of cos and sin of the angles (frame_offset + t) * rope_freqs[i], each angle
    one fp32 product (module notes)."""
    frames = torch.arange(T, dtype=torch.float32, device=rope_freqs.device) + frame_offset
    angle = frames[:, None] * rope_freqs.to(torch.float32)[None, :]
    return torch.stack((angle.cos(), angle.sin()))


def _launch(qkv, dout, T, num_heads, scale, q_weight, k_weight, rope_freqs, rope_first, eps, frame_offset):
    """Forward when dout is None, else the backward's (d(qkv), d(q_weight), d(k_weight)); a weight gradient
    is an empty tensor without the norm (custom ops cannot return None)."""
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    B, N, C3 = qkv.shape
    C, S = C3 // 3, N // T
    D = C // num_heads
    prologue = q_weight is not None or rope_freqs is not None
    block_t, block_s, block_d, num_warps = _tile_sizes(T, D, FORWARD_TILE if dout is None else BACKWARD_TILE,
                                                          qkv.element_size(), prologue)
    grid = (B * triton.cdiv(S, block_s), num_heads)
    # fp32 inputs keep fp32 products (TF32 would miss the fp32 tolerance); bf16/fp16 run on tensor cores.
    precision = "ieee" if qkv.dtype == torch.float32 else "tf32"
    # The interpreter: see _dot. Asked of Tensor.is_cuda, which bench/kernel_report.py patches: it compiles CPU
    # tensors' launches for sm_90 and must see the GPU's bf16 tensor-core dots, not the interpreter's upcast.
    upcast = qkv.dtype == torch.bfloat16 and not qkv.is_cuda
    norm = q_weight is not None
    sizes = dict(HEAD_DIM=D, PRECISION=precision, UPCAST=upcast, ROPE=rope_freqs is not None, NORM=norm,
                 ROPE_FIRST=rope_first, BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps)
    scale_log2 = scale * 1.4426950408889634  # log2(e)
    inputs = (q_weight, k_weight, None if rope_freqs is None else _rotation(rope_freqs, T, frame_offset))
    if dout is None:
        out = new_buffer((B, N, C), qkv.dtype, qkv.device)
        _temporal_attention_fwd_kernel[grid](qkv, out, *inputs, T, S, C, qkv.stride(0), qkv.stride(1), scale_log2,
                                             eps, **sizes)
        return out
    dqkv = new_buffer((B, N, C3), qkv.dtype, qkv.device)
    partials = [new_buffer((*grid, D), torch.float32, qkv.device) if norm else None for _ in range(2)]
    _temporal_attention_bwd_kernel[grid](qkv, dout.contiguous(), dqkv, *inputs, *partials, T, S, C,
                                         qkv.stride(0), qkv.stride(1), scale, scale_log2, eps, **sizes)
    if not norm:
        return dqkv, qkv.new_empty(0), qkv.new_empty(0)
    return dqkv, *(partial.sum((0, 1)).to(w.dtype) for partial, w in zip(partials, (q_weight, k_weight)))


@torch.library.custom_op("sora::temporal_attention", mutates_args=())
def _temporal_attention_op(qkv: torch.Tensor, T: int, num_heads: int, scale: float, q_weight: torch.Tensor | None,
                           k_weight: torch.Tensor | None, rope_freqs: torch.Tensor | None, rope_first: bool,
                           eps: float, frame_offset: int) -> torch.Tensor:
    return _launch(qkv, None, T, num_heads, scale, q_weight, k_weight, rope_freqs, rope_first, eps, frame_offset)


@_temporal_attention_op.register_fake
def _(qkv, T, num_heads, scale, q_weight, k_weight, rope_freqs, rope_first, eps, frame_offset):
    B, N, C3 = qkv.shape
    return qkv.new_empty((B, N, C3 // 3))


@torch.library.custom_op("sora::temporal_attention_backward", mutates_args=())
def _temporal_attention_backward_op(dout: torch.Tensor, qkv: torch.Tensor, T: int, num_heads: int, scale: float,
                                    q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                                    rope_freqs: torch.Tensor | None, rope_first: bool, eps: float,
                                    frame_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(qkv, dout, T, num_heads, scale, q_weight, k_weight, rope_freqs, rope_first, eps, frame_offset)


@_temporal_attention_backward_op.register_fake
def _(dout, qkv, T, num_heads, scale, q_weight, k_weight, rope_freqs, rope_first, eps, frame_offset):
    def like(w):
        return qkv.new_empty(0) if w is None else torch.empty_like(w, memory_format=torch.contiguous_format)

    return torch.empty_like(qkv, memory_format=torch.contiguous_format), like(q_weight), like(k_weight)


def _setup_context(ctx, inputs, output):
    qkv, T, num_heads, scale, q_weight, k_weight, rope_freqs, rope_first, eps, frame_offset = inputs
    ctx.save_for_backward(qkv, q_weight, k_weight, rope_freqs)
    ctx.arguments = T, num_heads, scale
    ctx.options = rope_first, eps, frame_offset


def _backward(ctx, dout):
    qkv, q_weight, k_weight, rope_freqs = ctx.saved_tensors
    dqkv, dq_weight, dk_weight = _temporal_attention_backward_op(dout, qkv, *ctx.arguments, q_weight, k_weight,
                                                                 rope_freqs, *ctx.options)
    norm = q_weight is not None
    return dqkv, None, None, None, dq_weight if norm else None, dk_weight if norm else None, None, None, None, None


_temporal_attention_op.register_autograd(_backward, setup_context=_setup_context)


def rope_reference(x, freqs, frame_offset=0):
    """Interleaved RoPE over the frame axis -2 of x (..., T, D): channel pairs (2i, 2i+1) rotate by
    (frame_offset + t) * freqs[i], in x's dtype (the references pass fp32 or float64)."""
    T = x.shape[-2]
    angle = (torch.arange(T, dtype=x.dtype, device=x.device) + frame_offset)[:, None] * freqs.to(x.dtype)[None, :]
    cos, sin = angle.cos(), angle.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


def temporal_attention_reference(qkv, T, num_heads, scale=None, q_norm=None, k_norm=None, rope_freqs=None,
                                 rope_first=True, eps=1e-6, frame_offset=0):
    """Eager PyTorch: the definition the kernel is tested against, and the fallback off-GPU. The prologue rounds
    where the kernel does (module notes); in float64 every rounding is exact, the test oracle."""
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    scale = D**-0.5 if scale is None else scale
    acc = compute_dtype(qkv)
    # (B, T*S, 3*H*D) -> 3 x (B, S, H, T, D)
    q, k, v = qkv.to(acc).view(B, T, N // T, 3, num_heads, D).permute(3, 0, 2, 4, 1, 5).unbind(0)
    if rope_freqs is not None and rope_first:
        q, k = rope_reference(q, rope_freqs, frame_offset), rope_reference(k, rope_freqs, frame_offset)
    if q_norm is not None:
        q, k = rms_norm_reference(q, q_norm, eps, qkv.dtype), rms_norm_reference(k, k_norm, eps, qkv.dtype)
    if rope_freqs is not None and not rope_first:
        q, k = rope_reference(q, rope_freqs, frame_offset), rope_reference(k, rope_freqs, frame_offset)
    q, k = q.to(qkv.dtype).to(acc), k.to(qkv.dtype).to(acc)  # the products' operands, in qkv's dtype
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    out = (p @ v).permute(0, 3, 1, 2, 4)  # (B, S, H, T, D) -> (B, T, S, H, D)
    return out.reshape(B, N, C3 // 3).to(qkv.dtype)


def _check_vector(name, t, length, what, qkv):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor of shape ({length},), got {t!r}")
    if tuple(t.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},) ({what}), got {tuple(t.shape)}")
    if t.device != qkv.device:
        raise ValueError(f"{name} is on {t.device} but qkv is on {qkv.device}")


def temporal_attention(qkv, T, num_heads, scale=None, q_norm=None, k_norm=None, rope_freqs=None, rope_first=True,
                       eps=1e-6, frame_offset=0):
    """Softmax attention over the T frames of each (sample, spatial position, head).

    qkv: (B, T*S, 3*C) frame-major tokens, each token's channels laid out (3, num_heads, D) as a fused qkv
    Linear writes them; returns (B, T*S, C), frame-major. scale defaults to D**-0.5; the softmax is fp32.
    T <= 128, D = C / num_heads <= 128. Differentiable in qkv (d(qkv) comes back in qkv's layout).

    STDiT2's prologue on q and k (module notes for the dtypes), both optional:
    - q_norm, k_norm: (D,) RMSNorm weights, given together (eps inside the rsqrt); differentiable.
    - rope_freqs: (D/2,) RoPE frequencies (rotary-embedding-torch's `freqs`, Open-Sora's `rope.freqs`);
      pair (2i, 2i+1) at frame t rotates by (frame_offset + t) * rope_freqs[i]. Not differentiable.
      frame_offset: the global index of this tensor's first frame, for a caller holding a window of a
      longer video. Under sora's sequence parallelism (Ulysses) every rank holds all T frames of its heads,
      so the default 0 is right there.
    - rope_first: RoPE, then the norm (True, the v1.1 checkpoints' order) or the norm, then RoPE.
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
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm must be given together (both RMSNorm weights) or both left None, "
                         f"got q_norm={'None' if q_norm is None else 'a tensor'}, "
                         f"k_norm={'None' if k_norm is None else 'a tensor'}")
    if q_norm is not None:
        _check_vector("q_norm", q_norm, D, "the head dim", qkv)
        _check_vector("k_norm", k_norm, D, "the head dim", qkv)
    if rope_freqs is not None:
        if D % 2:
            raise ValueError(f"RoPE rotates channel pairs: the head dim must be even, got D={D}")
        _check_vector("rope_freqs", rope_freqs, D // 2, "one frequency per channel pair of a head", qkv)
    if not isinstance(rope_first, bool):
        raise ValueError(f"rope_first must be True or False, got {rope_first!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if isinstance(frame_offset, bool) or not isinstance(frame_offset, int) or frame_offset < 0:
        raise ValueError(f"frame_offset must be an int >= 0 (the global index of the first frame), "
                         f"got {frame_offset!r}")
    scale = D**-0.5 if scale is None else float(scale)
    if not use_triton(qkv):
        return temporal_attention_reference(qkv, T, num_heads, scale, q_norm, k_norm, rope_freqs, rope_first, eps,
                                            frame_offset)
    if q_norm is not None:
        q_norm, k_norm = q_norm.contiguous(), k_norm.contiguous()
    if rope_freqs is not None:
        rope_freqs = rope_freqs.contiguous()
    return _temporal_attention_op(qkv, T, num_heads, scale, q_norm, k_norm, rope_freqs, rope_first, float(eps),
                                  frame_offset)
