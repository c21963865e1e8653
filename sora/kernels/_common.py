"""What every kernel file shares: dispatch (Triton or eager), input checks at the edge, launch sizes,
and the one index map all layout-aware kernels use.

Token layouts follow Open-Sora: `x` is (B, T*S, C) frame-major, "B (T S) C". The temporal-attention
layout is "(B S) T C". A frame-major row r = b*N + t*S + s lives at temporal row (b*S + s)*T + t.
"""

import functools
import os

import torch

from sora.kernels._triton import AVAILABLE, tl, triton  # noqa: F401 - tl: Triton needs it in the globals of a module with @triton.jit functions


@triton.jit
def temporal_row(row, T, S):
    """Row index in "(B S) T C" of frame-major row `row` of "B (T S) C"."""
    n = T * S
    b = row // n
    t = (row % n) // S
    s = row % S
    return (b * S + s) * T + t


@triton.jit
def _probe():
    pass


# Triton decides at decoration time whether a kernel is compiled or interpreted (TRITON_INTERPRET), so the
# type of a decorated function is the ground truth for "can CPU tensors run our kernels".
INTERPRETED = AVAILABLE and type(_probe).__name__ == "InterpretedFunction"


def use_triton(x: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernels; CPU tensors run them under the interpreter, else the eager reference.

    float64 always takes the reference: the kernels compute in fp32, which would silently lose its precision.
    """
    if x.dtype == torch.float64 or not AVAILABLE:
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and INTERPRETED


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The references compute in fp32 like the kernels, and in float64 when given float64 (the test oracle)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# SORA_KERNEL_POISON=1 fills every buffer a kernel is about to write with NaN, so an element the kernel
# forgets to write shows up in the result instead of passing as whatever the allocator left there.
POISON = os.environ.get("SORA_KERNEL_POISON", "0") == "1"


def new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (NaN-filled when POISON is on)."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessor_count(x: torch.Tensor) -> int | None:
    """SMs of x's GPU; None under the interpreter (bench/kernel_report.py stands in an H100's 132 here)."""
    return _cuda_multiprocessors(x.device.index) if x.device.type == "cuda" else None


def target_programs(x: torch.Tensor) -> int:
    """How many programs keep the whole device busy in a reduction grid (4 per SM on CUDA)."""
    sms = multiprocessor_count(x)
    if sms is None:
        return 4  # interpreter: programs run one after another, fewer means less Python overhead
    return 4 * sms


def row_tile(C: int, elements: int = 4096) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for kernels that hold whole rows: one row of C in BLOCK_C lanes,
    and as many rows per program as keep about `elements` values in flight (small C gets many rows)."""
    block_c = triton.next_power_of_2(C)
    block_m = max(1, min(64, elements // block_c))
    num_warps = max(1, min(16, block_m * block_c // 512))
    return block_m, block_c, num_warps


def col_tile(C: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for elementwise kernels, which tile the channel axis too."""
    block_c = min(triton.next_power_of_2(C), 1024)
    block_m = max(1, 4096 // block_c)
    return block_m, block_c, 4


def reduction_split(rows: int, batches: int, block_m: int, x: torch.Tensor) -> tuple[int, int]:
    """Split each sample's `rows` into programs for a per-sample partial-sum reduction.

    Returns (programs per sample, rows per program); rows per program is a multiple of block_m.
    """
    per_sample = max(1, min(triton.cdiv(target_programs(x), batches), triton.cdiv(rows, block_m)))
    rows_per_program = triton.cdiv(triton.cdiv(rows, per_sample), block_m) * block_m
    return triton.cdiv(rows, rows_per_program), rows_per_program


def check_tokens(name: str, x: torch.Tensor) -> None:
    """A token tensor: floating point, rank 3."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be float32, float16 or bfloat16 (float64 runs the eager reference), got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have rank 3 (B, N, C), got shape {tuple(x.shape)}")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def per_sample_rows(name: str, t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """View a per-channel modulation vector (shift, scale, gate) as (1, C) or (B, C).

    Accepted shapes: (B, 1, C), (1, 1, C), (B, C), (1, C), (C,). The view keeps the caller's strides
    along B (e.g. a chunk of a (B, 6, C) table), so no copy is made; channels must be contiguous.
    """
    if t is None:
        return None
    check_same(name, t, "x", x)
    B, _, C = x.shape
    shape = tuple(t.shape)
    ok = (
        (t.dim() == 3 and shape[1] == 1 and shape[0] in (1, B) and shape[2] == C)
        or (t.dim() == 2 and shape[0] in (1, B) and shape[1] == C)
        or (t.dim() == 1 and shape[0] == C)
    )
    if not ok:
        raise ValueError(
            f"{name} of shape {shape} does not broadcast over x of shape {tuple(x.shape)}: "
            f"expected ({B}, 1, {C}), (1, 1, {C}), ({B}, {C}), (1, {C}) or ({C},)"
        )
    rows = t.reshape(-1, C)
    return rows if rows.stride(1) == 1 else rows.contiguous()


def per_channel(name: str, t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """An affine weight or bias: shape (C,)."""
    if t is None:
        return None
    check_same(name, t, "x", x)
    if tuple(t.shape) != (x.shape[-1],):
        raise ValueError(f"{name} must have shape ({x.shape[-1]},) to match x {tuple(x.shape)}, got {tuple(t.shape)}")
    return t.contiguous()


def check_frames(T, x: torch.Tensor, name: str = "temporal") -> int:
    """T, passed as `name`, is the frame count of x = (B, T*S, C): a positive int dividing N."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"{name} must be a positive int (the frame count T), got {T!r}")
    if x.shape[1] % T != 0:
        raise ValueError(f"{name}={T} does not divide the token count N={x.shape[1]} of x {tuple(x.shape)}")
    return T


def temporal_shape(B: int, N: int, C: int, T: int) -> tuple[int, int, int]:
    """Shape of (B, N, C) tokens in temporal-attention layout: (B*S, T, C) with S = N / T."""
    return (B * (N // T), T, C)


def batch_stride(rows: torch.Tensor | None) -> int:
    """Stride between samples of a (1 or B, C) modulation view; 0 broadcasts one row over the batch."""
    if rows is None or rows.shape[0] == 1:
        return 0
    return rows.stride(0)


def reduce_partials(partial: torch.Tensor, B: int, like: torch.Tensor) -> torch.Tensor:
    """Second stage of a per-sample reduction: (B*P, C) fp32 partial sums -> the shape of `like`: (B, C) per
    sample, or summed over samples for (1, C) and (C,)."""
    per_sample = partial.view(B, -1, partial.shape[-1]).sum(1)
    if like.dim() == 1 or like.shape[0] == 1:
        per_sample = per_sample.sum(0, keepdim=like.dim() == 2)
    return per_sample.to(like.dtype)
