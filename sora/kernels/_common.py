"""What every kernel file shares: dispatch (Triton or eager), input checks at the edge, launch sizes,
and the one index map all layout-aware kernels use.

Token layouts follow Open-Sora: `x` is (B, T*S, C) frame-major, "B (T S) C". The temporal-attention
layout is "(B S) T C". A frame-major row r = b*N + t*S + s lives at temporal row (b*S + s)*T + t.
"""

import os

import torch

from sora.kernels._triton import AVAILABLE, tl, triton  # noqa: F401 - tl: Triton needs it in the globals of a module with @triton.jit functions


@triton.jit
def temporal_rows(first, T, S, BLOCK_M: tl.constexpr):
    """Rows in "(S T)" (a sample's temporal layout) of frame-major rows first .. first + BLOCK_M of "(T S)".

    One scalar division per block instead of a 64-bit div/mod per row: with BLOCK_M <= S (the launchers
    take block_rows_within), the frame index t steps at most once inside the block.
    """
    t = first // S
    s = first - t * S + tl.arange(0, BLOCK_M)
    wrapped = s >= S
    return tl.where(wrapped, s - S, s) * T + t + wrapped.to(tl.int32)


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
    """float32 at least: the references compute in fp32 like the kernels, and in float64 when given float64 (the
    test oracle); the schedulers' arithmetic, which loses too much in half precision, likewise."""
    return torch.promote_types(x.dtype, torch.float32)


# SORA_KERNEL_POISON=1 fills every buffer a kernel is about to write with NaN, so an element the kernel
# forgets to write shows up in the result instead of passing as whatever the allocator left there.
POISON = os.environ.get("SORA_KERNEL_POISON", "0") == "1"


def new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (NaN-filled when POISON is on)."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# Threads an SM holds: 2048 on sm_80 and sm_90 (A100, H100, H200), the GPUs this library is tuned for.
THREADS_PER_SM = 2048


def one_wave(kernel, x: torch.Tensor, num_warps: int, *args, **kwargs) -> int:
    """How many programs of `kernel` the whole GPU holds at once, for a reduction grid of one full wave.

    The occupancy count of Triton's fused-softmax tutorial: compile (or find in the cache) the kernel for
    these arguments and divide the SM's registers, shared memory and threads by what one program takes.
    An argument that depends on the grid must be in the kernel's do_not_specialize, so this compile is the
    one the launch uses. Under the interpreter programs run one after another: 4, to keep Python overhead low.
    """
    if not x.is_cuda:
        return 4
    compiled = kernel.warmup(*args, grid=(1,), num_warps=num_warps, **kwargs)
    compiled._init_handles()  # loads the binary, which sets n_regs (as the tutorial does)
    device = triton.runtime.driver.active.get_current_device()
    properties = triton.runtime.driver.active.utils.get_device_properties(device)
    registers_per_warp = triton.cdiv(compiled.n_regs * 32, 256) * 256  # allocated per warp, 256 at a time
    fits = min(
        properties["max_num_regs"] // (registers_per_warp * num_warps),
        properties["max_shared_mem"] // max(compiled.metadata.shared, 1),
        THREADS_PER_SM // (32 * num_warps),
    )
    return properties["multiprocessor_count"] * max(1, fits)


# Whole-row kernels: about 1024 channels of the row's head piece per warp (32 fp32 values per thread).
# Measured on sm_90 (bench/kernel_report.py), LN-modulate forward at C=1152 bf16: 1 row per warp issues
# 0.153 warp-instructions per byte at 96 registers (temporal 0.162, 80); 2 rows per warp 0.136 but 128
# registers, and fp32 then spills 8 B (shift and scale rows are per thread too); 1 row in 2 warps 0.181.
# 8 warps per 2 rows of 2048 lanes (before: 44% masked) issued 0.362.
ROW_ELEMENTS_PER_WARP = 1024
# Small C gets many rows per program (C=72: 16 rows of 64 + 8 channels per warp); past 64 rows the
# per-program work (sample index, shift/scale rows) is already amortised and registers only grow.
MAX_ROWS_PER_PROGRAM = 64
# Warps per program at most: a row of C=8192 (MAX_CHANNELS) in the backward takes 16; Triton allows 32.
MAX_WARPS = 16


def row_pieces(C: int, rows_within: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, HEAD, TAIL, num_warps) for kernels that hold whole rows in registers.

    A row's C channels are two power-of-two pieces, HEAD <= C and TAIL >= C - HEAD (0 when C is a power of
    two), so no lane is masked at C=1152 (1024 + 128) where one next_power_of_2 block masks 44%.
    rows_within: a block's rows must stay inside this many (S for the temporal row map).
    """
    head = 1 << (C.bit_length() - 1)
    tail = triton.next_power_of_2(C - head) if C > head else 0
    block_m = max(1, min(MAX_ROWS_PER_PROGRAM, ROW_ELEMENTS_PER_WARP // head))
    num_warps = max(1, min(MAX_WARPS, block_m * head // ROW_ELEMENTS_PER_WARP))
    return block_rows_within(block_m, rows_within), head, tail, num_warps


# The whole-row backward also keeps four (C,) token sums per program, so it spreads a row over more
# threads: 1024 head channels of rows per program, a warp per 256 (8 values of a piece per thread).
# Measured at C=1152 bf16 (bench/kernel_report.py, sm_90): 1 row x 4 warps, 105 registers, loop 0.159
# warp-instr/B (temporal 0.184) on Triton 3.9, 0.184 (0.206) on 3.6; 2 rows x 4 warps issue 0.147 (0.163)
# at 168 registers but spill 8 B with fp16 on Triton 3.6 (the GPU image's); 2 x 8 warps 0.246; 4 x 4 0.127
# at 250 registers. Before tuning (one 2048-lane block, 2 rows x 8 warps): 0.217 (temporal 0.330).
BACKWARD_ELEMENTS = 1024
BACKWARD_ELEMENTS_PER_WARP = 256


def backward_pieces(C: int, rows_within: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, HEAD, TAIL, num_warps) for the whole-row backward (see row_pieces)."""
    _, head, tail, _ = row_pieces(C, rows_within)
    block_m = max(1, min(MAX_ROWS_PER_PROGRAM, BACKWARD_ELEMENTS // head))
    num_warps = max(1, min(MAX_WARPS, block_m * head // BACKWARD_ELEMENTS_PER_WARP))
    return block_rows_within(block_m, rows_within), head, tail, num_warps


def block_rows_within(block_m: int, rows: int) -> int:
    """BLOCK_M, lowered to a power of two <= rows: the temporal row map needs a block within one frame."""
    return min(block_m, 1 << (max(rows, 1).bit_length() - 1))


def col_tile(C: int, rows_within: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for elementwise kernels, which tile the channel axis too.

    BLOCK_C is the largest power of two dividing C, from 128 to 1024, so no lane is masked (1152 = 9 x 128:
    before, two blocks of 1024 left 896 of the second idle); a C without one takes next_power_of_2 (<= 1024).
    4096 values per program over 4 warps: 32 per thread in 128-bit accesses; on sm_90 the gated residual at
    C=1152 bf16 then issues 0.049 warp-instructions per byte at 64 registers (bench/kernel_report.py).
    rows_within: a block's rows must stay inside this many (S for the temporal row map).
    """
    divisor = C & -C
    block_c = min(divisor, 1024) if divisor >= 128 else min(triton.next_power_of_2(C), 1024)
    block_m = max(1, 4096 // block_c)
    return block_rows_within(block_m, rows_within), block_c, 4


def reduction_split(rows: int, batches: int, block_m: int, programs: int) -> tuple[int, int]:
    """Split each sample's `rows` into about `programs` programs in all (one_wave's count) for a per-sample
    partial-sum reduction. Returns (programs per sample, rows per program), a multiple of block_m."""
    per_sample = max(1, min(programs // batches, triton.cdiv(rows, block_m)))
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


def modulation_rows(name: str, t: torch.Tensor | None, x: torch.Tensor, frames: int | None) -> torch.Tensor | None:
    """View a modulation tensor (shift, scale, gate) as (1 or B, F, C): one (C,) row per sample and frame.

    frames=None: per sample, (B, 1, C), (1, 1, C), (B, C), (1, C) or (C,), read as F=1; or per token,
    (B, N, C) or (1, N, C), read as F=N (Wan 2.2 TI2V's per-token timesteps). frames=F: per frame,
    (B, F, C) or (1, F, C), F dividing N; row n of x reads frame n // (N / F). The view keeps the caller's
    strides along B and F (e.g. a chunk of a (B, 6, C) table), so no copy is made; channels must be contiguous.
    """
    if t is None:
        return None
    check_same(name, t, "x", x)
    B, N, C = x.shape
    shape = tuple(t.shape)
    if frames is None:
        ok = (
            (t.dim() == 3 and shape[0] in (1, B) and shape[1] in (1, N) and shape[2] == C)
            or (t.dim() == 2 and shape[0] in (1, B) and shape[1] == C)
            or (t.dim() == 1 and shape[0] == C)
        )
        expected = f"({B}, 1, {C}), (1, 1, {C}), ({B}, {C}), (1, {C}), ({C},) or per token ({B}, {N}, {C})"
    else:
        ok = t.dim() == 3 and shape[0] in (1, B) and shape[1] == frames and shape[2] == C
        expected = f"({B}, {frames}, {C}) or (1, {frames}, {C}) for frames={frames}"
    if not ok:
        raise ValueError(
            f"{name} of shape {shape} does not broadcast over x of shape {tuple(x.shape)}: expected {expected}"
        )
    rows = t if t.dim() == 3 else t.reshape(-1, 1, C)
    return rows if rows.stride(2) == 1 else rows.contiguous()


def modulation_frames(x: torch.Tensor, *rows: torch.Tensor | None) -> int:
    """F, the modulation rows per sample, shared by every modulation view of one call."""
    counts = {t.shape[1] for t in rows if t is not None}
    if len(counts) > 1:
        raise ValueError(f"the modulation tensors of one call must share one layout, got {sorted(counts)} rows "
                         f"per sample for x of shape {tuple(x.shape)}")
    return counts.pop() if counts else 1


def modulation_per_token(name: str, t: torch.Tensor | None, x: torch.Tensor, frames: int | None, acc: torch.dtype):
    """The references' reading of a modulation tensor: (1 or B, N, C) in dtype acc, one row per token of x."""
    rows = modulation_rows(name, t, x, frames)
    if rows is None:
        return None
    return rows.to(acc).repeat_interleave(x.shape[1] // rows.shape[1], dim=1)


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


def frame_count(temporal, x: torch.Tensor) -> int:
    """The one reading of the layout-aware ops' `temporal` argument: None (tokens stay frame-major) -> 1,
    T (the temporal-attention layout of T frames) -> T, checked. Kernels branch on T > 1 alone: with one
    frame the layout (B*S, 1, C) is the same memory as (B, N, C), so T=1 moves no row."""
    return 1 if temporal is None else check_frames(temporal, x)


def layout_shape(shape, temporal) -> tuple[int, int, int]:
    """Shape of (B, N, C) tokens in the layout `temporal` names: (B, N, C) for None, (B*S, T, C) for T."""
    return tuple(shape) if temporal is None else temporal_shape(*shape, temporal)


def batch_stride(rows: torch.Tensor | None) -> int:
    """Stride between samples of a (1 or B, F, C) modulation view; 0 broadcasts one sample's rows over the batch."""
    if rows is None or rows.shape[0] == 1:
        return 0
    return rows.stride(0)


def frame_stride(rows: torch.Tensor | None) -> int:
    """Stride between the frames of a (1 or B, F, C) modulation view (0 for F=1, which has one row)."""
    if rows is None or rows.shape[1] == 1:
        return 0
    return rows.stride(1)


def reduce_partials(partial: torch.Tensor, B: int, like: torch.Tensor) -> torch.Tensor:
    """Second stage of a per-sample, per-frame reduction: (B*F*P, C) fp32 partial sums, P per (sample, frame),
    -> the shape and dtype of `like`: a (B, F, C) modulation view, or summed over samples for (1, F, C), or
    over everything for a (C,) affine weight."""
    C = partial.shape[-1]
    if like.dim() == 1:
        return partial.sum(0).to(like.dtype)
    per_frame = partial.view(B, like.shape[1], -1, C).sum(2)
    if like.shape[0] == 1:
        per_frame = per_frame.sum(0, keepdim=True)
    return per_frame.to(like.dtype)
