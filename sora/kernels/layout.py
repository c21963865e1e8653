"""Layout changes between frame-major tokens and temporal attention.

to_temporal:   "B (T S) C -> (B S) T C"
from_temporal: "(B S) T C -> B (T S) C"
(The spatial layout "(B T) S C" is a free reshape of "B (T S) C" and needs no kernel.)
swap_leading:  "(A B) M -> (B A) M", the same row permutation for one sample of A frames of B rows of M
               values: all_to_all's pack and unpack.

One kernel serves both directions: each program walks frame-major rows and reads or writes the matching
temporal rows, so stores (to_temporal) or loads (from_temporal) are row-gathers of whole C-wide rows,
which stay coalesced along C. Each is the other's backward.
"""

import torch

from sora.kernels._common import check_frames, check_tokens, col_tile, new_buffer, temporal_rows, temporal_shape, use_triton
from sora.kernels._triton import tl, triton


@triton.jit
def _temporal_copy_kernel(
    src_ptr, dst_ptr, N, C, T, S,
    TO_TEMPORAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Grid (row blocks of a sample, samples, channel blocks); a sample is N = T*S rows.
    sample = tl.program_id(1)
    first = tl.program_id(0) * BLOCK_M
    local = first + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (local < N)[:, None] & (cols < C)[None, :]
    frame_major = (sample.to(tl.int64) * N + local)[:, None] * C + cols[None, :]
    temporal = (sample.to(tl.int64) * N + temporal_rows(first, T, S, BLOCK_M))[:, None] * C + cols[None, :]
    if TO_TEMPORAL:
        tl.store(dst_ptr + temporal, tl.load(src_ptr + frame_major, mask=mask), mask=mask)
    else:
        tl.store(dst_ptr + frame_major, tl.load(src_ptr + temporal, mask=mask), mask=mask)


def _launch(x, out_shape, T, S, to_temporal):
    """Samples of T*S rows of C, frame-major <-> temporal; x is contiguous, viewed (samples * T * S, C)."""
    x = x.contiguous()
    out = new_buffer(out_shape, x.dtype, x.device)
    C = x.shape[-1]
    N = T * S
    samples = x.numel() // (N * C)
    block_m, block_c, num_warps = col_tile(C, rows_within=S)
    _temporal_copy_kernel[(triton.cdiv(N, block_m), samples, triton.cdiv(C, block_c))](
        x, out, N, C, T, S,
        TO_TEMPORAL=to_temporal, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


def _temporal_shape(x, T):
    return temporal_shape(*x.shape, T)


def _frame_major_shape(x, B):
    BS, T, C = x.shape
    return (B, T * (BS // B), C)


@torch.library.custom_op("sora::to_temporal", mutates_args=())
def _to_temporal_op(x: torch.Tensor, T: int) -> torch.Tensor:
    return _launch(x, _temporal_shape(x, T), T, x.shape[1] // T, to_temporal=True)


@_to_temporal_op.register_fake
def _(x, T):
    return x.new_empty(_temporal_shape(x, T))


@torch.library.custom_op("sora::from_temporal", mutates_args=())
def _from_temporal_op(x: torch.Tensor, B: int) -> torch.Tensor:
    return _launch(x, _frame_major_shape(x, B), x.shape[1], x.shape[0] // B, to_temporal=False)


@_from_temporal_op.register_fake
def _(x, B):
    return x.new_empty(_frame_major_shape(x, B))


def _save_batch(ctx, inputs, output):
    ctx.B = inputs[0].shape[0]


def _save_frames(ctx, inputs, output):
    ctx.T = inputs[0].shape[1]


_to_temporal_op.register_autograd(lambda ctx, dout: (_from_temporal_op(dout, ctx.B), None), setup_context=_save_batch)
_from_temporal_op.register_autograd(lambda ctx, dout: (_to_temporal_op(dout, ctx.T), None), setup_context=_save_frames)


def to_temporal_reference(x, T):
    B, N, C = x.shape
    return x.reshape(B, T, N // T, C).transpose(1, 2).reshape(B * (N // T), T, C)


def from_temporal_reference(x, B):
    BS, T, C = x.shape
    return x.reshape(B, BS // B, T, C).transpose(1, 2).reshape(B, T * (BS // B), C)


def swap_leading_reference(x, A, B):
    return x.view(A, B, -1).transpose(0, 1).contiguous()


def swap_leading(x, A, B):
    """"(A B) M -> (B A) M": contiguous x viewed as (A, B, M) to a new contiguous (B, A, M)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    for name, n in (("A", A), ("B", B)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if x.numel() % (A * B) != 0:
        raise ValueError(f"A*B={A * B} does not divide the {x.numel()} elements of x {tuple(x.shape)}")
    if not use_triton(x):
        return swap_leading_reference(x, A, B)
    M = x.numel() // (A * B)
    return _launch(x.reshape(A * B, M), (B, A, M), A, B, to_temporal=True)  # one sample: T=A frames, S=B


def to_temporal(x, T):
    """"B (T S) C -> (B S) T C": (B, T*S, C) frame-major tokens to the temporal-attention layout."""
    check_tokens("x", x)
    check_frames(T, x, "T")
    if not use_triton(x):
        return to_temporal_reference(x, T)
    return _to_temporal_op(x, T)


def from_temporal(x, B):
    """"(B S) T C -> B (T S) C": back from the temporal-attention layout; B is the batch size."""
    check_tokens("x", x)
    if isinstance(B, bool) or not isinstance(B, int) or B < 1 or x.shape[0] % B != 0:
        raise ValueError(f"B must be a positive int dividing the first dim of x {tuple(x.shape)}, got {B!r}")
    if not use_triton(x):
        return from_temporal_reference(x, B)
    return _from_temporal_op(x, B)
