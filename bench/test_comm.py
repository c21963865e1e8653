"""Sequence-parallel communication on one GPU: the pack/unpack permutes around all_to_all_single in STDiT's
temporal attention (timed), and the all-to-all volume per layer per rank (computed, not timed).

Under sequence parallelism STDiT's temporal attention (sora.models.layers.Attention with an sp group) exchanges
twice per forward on each rank:
- "qkv": (B*S, T/sp, 3, H, D) scatters heads, gathers frames -> (B*S, T, 3, H/sp, D);
- "out": the attention output (B*S, T, H/sp, D) scatters frames, gathers heads -> (B*S, T/sp, H, D).
sora.kernels.comm._exchange packs before all_to_all_single and unpacks after it, each a swap of the two
leading axes of a 3-D view (A, B, M) -> (B, A, M); the backward runs the inverse exchanges, i.e. the same
permutes with A and B swapped. Providers: `sora` (the Triton `swap_leading`, exactly as `_exchange` calls it)
and `torch` (`x.view(A, B, M).transpose(0, 1).contiguous()`, the kernel's reference). Each case is timed once. Bytes: the permute reads
and writes the tensor once, 2 x its size.
"""

import math
from dataclasses import dataclass

import pytest
import torch

from bench.bench_utils import (
    DTYPE_NAMES,
    Rotation,
    all_to_all_volume,
    measured_once,
    on_cuda,
    record,
    record_computed,
    synchronize,
    time_ms,
)
from sora.kernels.layout import swap_leading, swap_leading_reference

SP_SIZES = (2, 4, 8)
DEPTH = 28  # STDiT-XL/2's blocks: one temporal attention each
LINK_GBPS_ASSUMED = 450.0  # H100 NVLink 4: 900 GB/s bidirectional per GPU, a datasheet lead (bench/NOTES.md)


@dataclass(frozen=True)
class SeqShape:
    """One sample's latent tokens at STDiT-XL/2's patching: T frames of S tokens, H heads of D channels."""

    video: str
    S: int
    T: int
    H: int = 16
    D: int = 72
    batch_per_rank: int = 1  # samples per GPU of a training step that fits without sp (test_models' batches)

    @property
    def C(self) -> int:
        return self.H * self.D


# Batch: each rank holds T/sp frames, so an sp group trains sp times the single-GPU batch in the same memory
# per rank: batch = batch_per_rank * sp, and the per-rank tensors keep one size across sp (16x512: 226 MB of
# qkv, 64x512: 453 MB in bf16, both far over the 50 MB L2).
GPU_SHAPES = [SeqShape("16x512", S=1024, T=16, batch_per_rank=2), SeqShape("64x512", S=1024, T=64, batch_per_rank=1)]
CPU_SHAPES = [SeqShape("tiny", S=8, T=4, H=4, D=16)]
CPU_SP_SIZES = (2, 4)
# Volume rows are arithmetic: the real sizes everywhere, 360x512 (Open-Sora's sp=2 row, 368,640 tokens) too.
VOLUME_SHAPES = GPU_SHAPES + [SeqShape("360x512", S=1024, T=360)]


def exchange_layout(exchange: str, shape: SeqShape, batch: int, sp: int):
    """(the tensor one rank exchanges, scatter_dim, gather_dim), as Attention.forward calls K.all_to_all."""
    s = shape
    if exchange == "qkv":
        return (batch * s.S, s.T // sp, 3, s.H, s.D), 3, 1
    return (batch * s.S, s.T, s.H // sp, s.D), 1, 2


def swap_view(direction: str, tensor_shape, sp: int, scatter_dim: int, gather_dim: int):
    """(A, B) of the swap (A, B, M) -> (B, A, M) that _exchange makes for the pack or the unpack."""
    if direction == "pack":  # x viewed (P, W, M) -> send buffer (W, P, M)
        return math.prod(tensor_shape[:scatter_dim]), sp
    chunk = list(tensor_shape)
    chunk[scatter_dim] //= sp
    return sp, math.prod(chunk[:gather_dim])  # receive buffer (W, P', M') -> (P', W, M')


@dataclass(frozen=True)
class PackCase:
    shape: SeqShape
    sp: int
    exchange: str  # "qkv" or "out"
    direction: str  # "pack" or "unpack"
    provider: str  # "sora" or "torch"

    @property
    def batch(self) -> int:
        return self.shape.batch_per_rank * self.sp

    def __str__(self):
        return f"all_to_all_pack-{self.shape.video}-sp{self.sp}-{self.exchange}-{self.direction}-{self.provider}"


def pack_cases(cuda: bool) -> list[PackCase]:
    return [
        PackCase(shape, sp, exchange, direction, provider)
        for shape in (GPU_SHAPES if cuda else CPU_SHAPES)
        for sp in (SP_SIZES if cuda else CPU_SP_SIZES)
        for exchange in ("qkv", "out")
        for direction in ("pack", "unpack")
        for provider in ("sora", "torch")
    ]


SWAPS = {"sora": swap_leading, "torch": swap_leading_reference}


@pytest.mark.parametrize("case", pack_cases(on_cuda()), ids=str)
def test_all_to_all_pack(case, benchmark, bench_env, results, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tensor_shape, scatter_dim, gather_dim = exchange_layout(case.exchange, case.shape, case.batch, case.sp)
    A, B = swap_view(case.direction, tensor_shape, case.sp, scatter_dim, gather_dim)
    numel = math.prod(tensor_shape)
    nbytes = 2 * numel * torch.empty((), dtype=dtype).element_size()  # read once, write once
    benchmark.group = f"all_to_all_pack {case.shape.video} sp={case.sp} {case.exchange} {case.direction}"
    row = {
        "suite": "comm",
        "bench": "all_to_all_pack",
        "direction": case.direction,
        "exchange": case.exchange,
        "video": case.shape.video,
        "sp": case.sp,
        "tensor": list(tensor_shape),
        "shape": [A, B, numel // (A * B)],
        "batch_size": case.batch,
        "dtype": DTYPE_NAMES[dtype],
        "provider": case.provider,
    }
    swap = SWAPS[case.provider]

    def measure(row):
        run = Rotation(lambda: torch.randn(numel, device=device, dtype=dtype), lambda x: swap(x, A, B), nbytes // 2,
                       device)
        if case.provider == "sora":  # a permutation: the kernel must match torch bit for bit
            row["exact"] = torch.equal(swap(run.sets[0], A, B), swap_leading_reference(run.sets[0], A, B))
        for _ in range(2):  # Triton JIT
            run()
        synchronize(device)
        ms = measured_once(benchmark, lambda: time_ms(run, device))
        gbps = nbytes / (ms * 1e-3) / 1e9
        row.update(ms=ms, gbps=gbps, frac_copy_bw=gbps / bench_env["copy_bandwidth_gbps"], bytes=nbytes)

    record(results, benchmark, row, measure)


@pytest.mark.parametrize(
    "shape,sp", [(shape, sp) for shape in VOLUME_SHAPES for sp in SP_SIZES], ids=lambda v: getattr(v, "video", f"sp{v}")
)
def test_all_to_all_volume(shape, sp, benchmark, bench_env, results):
    """Bytes each rank sends per layer in the two exchanges of one temporal attention (forward, and the same
    again in backward), for one sample of bf16 STDiT-XL/2; the per-step total over 28 layers; and the time that
    would take at an assumed link bandwidth. Computed, not timed."""
    benchmark.group = "all_to_all_volume (computed)"
    row = {"suite": "comm", "bench": "all_to_all_volume", "provider": "computed", "video": shape.video, "sp": sp,
           "shape": [shape.S, shape.T, shape.C], "batch_size": 1, "dtype": "bf16", "depth": DEPTH,
           "link_gbps_assumed": LINK_GBPS_ASSUMED}

    def compute(row):
        volume = all_to_all_volume(shape.S, shape.T, shape.C, sp, elem=2, depth=DEPTH)
        row.update(volume)
        for key in ("step_bytes", "step_bytes_gc"):
            row[key.replace("bytes", "comm_ms")] = volume[key] / (LINK_GBPS_ASSUMED * 1e9) * 1e3

    record_computed(results, benchmark, row, compute)
