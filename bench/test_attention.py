"""temporal_attention: STDiT-XL/2's attention over frames, sora's kernel beside what the eager block runs.

Rows `temporal_attention` fwd and fwd+bwd, bf16, at STDiT-XL/2's three sizes (C=1152, 16 heads, D=72), with
the qkv Linear's output (B, T*S, 3C) as input and the proj Linear's input (B, T*S, C) as output. Providers:
- sora: K.temporal_attention, reading and writing those tensors in place;
- torch: what Open-Sora's block does: rearrange to "(B S) T" + contiguous, SDPA, rearrange back + contiguous;
- flash-attn (when importable): flash_attn_func on the same rearranged copies;
- torch.compile: the torch path under default inductor (GPU only).
Minimum bytes: forward reads qkv and writes out (4 tokens of C); backward reads qkv and the output gradient
and writes d(qkv) (7 more). GB/s and the share of the copy bandwidth measured in the same run.
"""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import sora.kernels as K
from bench.bench_utils import DTYPE_NAMES, Rotation, on_cuda, synchronize, time_ms
from bench.test_kernels import Unavailable, record_once, relative_error
from sora.kernels.attention import temporal_attention_reference


@dataclass(frozen=True)
class Shape:
    """qkv = (B, T*S, 3C) of an STDiT-XL/2 temporal branch at `video` (frames x resolution)."""

    video: str
    B: int
    T: int
    S: int
    C: int = 1152
    heads: int = 16

    @property
    def N(self) -> int:
        return self.T * self.S


# Batches keeping qkv near 1.8 GB (36x an H100's L2): 16x256 -> 16x32x32 latents, 256 tokens per frame.
GPU_SHAPES = [Shape("16x256", B=64, T=16, S=256), Shape("16x512", B=16, T=16, S=1024), Shape("64x512", B=4, T=64, S=1024)]
CPU_SHAPES = [Shape("tiny", B=2, T=4, S=8, C=64, heads=4)]
PROVIDERS = ("sora", "torch", "flash-attn", "torch.compile")
DIRECTIONS = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    direction: str
    shape: Shape
    dtype: torch.dtype
    provider: str

    def __str__(self):
        return f"temporal_attention-{self.direction}-{self.shape.video}-{DTYPE_NAMES[self.dtype]}-{self.provider}"


def cases(cuda: bool) -> list[Case]:
    dtype = torch.bfloat16 if cuda else torch.float32
    return [Case(direction, shape, dtype, provider) for shape in (GPU_SHAPES if cuda else CPU_SHAPES)
            for direction in DIRECTIONS for provider in PROVIDERS]


def attention_bytes(direction: str, s: Shape, elem: int) -> int:
    """Fewest bytes moved: forward reads qkv (3 tokens) and writes out (1); backward reads qkv and dout and
    writes d(qkv) (7). One token tensor is B*N*C elements."""
    tokens = s.B * s.N * s.C * elem
    return 4 * tokens if direction == "fwd" else 11 * tokens


def eager_temporal_attention(T: int, heads: int, flash=None):
    """Open-Sora's eager temporal attention on the qkv Linear's output, layout copies included."""

    def forward(qkv):
        B = qkv.shape[0]
        qkv = rearrange(qkv, "B (T S) (three H D) -> three (B S) T H D", T=T, three=3, H=heads).contiguous()
        q, k, v = qkv.unbind(0)
        if flash is not None:
            out = flash(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return rearrange(out, "(B S) T H D -> B (T S) (H D)", B=B).contiguous()

    return forward


def forward_fn(case: Case, device):
    s = case.shape
    if case.provider == "sora":
        return lambda qkv: K.temporal_attention(qkv, s.T, s.heads)
    if case.provider == "torch.compile" and device.type != "cuda":
        raise Unavailable("CPU smoke set: torch.compile is measured on GPUs only")
    flash = None
    if case.provider == "flash-attn":
        if device.type != "cuda":
            raise Unavailable("flash-attn needs CUDA")
        try:
            from flash_attn import flash_attn_func as flash
        except ImportError:
            raise Unavailable("flash_attn not importable") from None
    eager = eager_temporal_attention(s.T, s.heads, flash)
    return torch.compile(eager, dynamic=False) if case.provider == "torch.compile" else eager


def base_row(case: Case) -> dict:
    s = case.shape
    return {"suite": "kernels", "bench": "temporal_attention", "direction": case.direction, "shape": [s.B, s.N, s.C],
            "video": s.video, "T": s.T, "heads": s.heads, "dtype": DTYPE_NAMES[case.dtype], "provider": case.provider}


def measure_attention(case: Case, device, copy_bandwidth_gbps: float) -> dict:
    """Time one case once (after a warm-up of Triton JIT and torch.compile's graphs): the row's ms, GB/s, share
    of the copy bandwidth, bytes, and for sora its forward's rel_err against the fp32 reference. Raises
    Unavailable for a provider that cannot run here. bench/gpu_check.py times its row with this too."""
    s = case.shape
    nbytes = attention_bytes(case.direction, s, torch.empty((), dtype=case.dtype).element_size())
    forward = forward_fn(case, device)
    backward = case.direction == "fwd+bwd"

    def make_inputs():
        qkv = torch.randn(s.B, s.N, 3 * s.C, device=device, dtype=case.dtype).requires_grad_(backward)
        dout = torch.randn(s.B, s.N, s.C, device=device, dtype=case.dtype) if backward else None
        return qkv, dout

    def step(inputs):
        qkv, dout = inputs
        out = forward(qkv)
        return torch.autograd.grad(out, qkv, dout) if backward else out

    run = Rotation(make_inputs, step, nbytes, device)
    row = {}
    if case.provider == "sora":
        with torch.no_grad():
            probe = run.sets[0][0].detach()
            reference = temporal_attention_reference(probe.float(), s.T, s.heads)
            row["rel_err"] = relative_error(forward(probe), reference)
            del reference
    for _ in range(2):  # warm-up: Triton JIT, torch.compile's forward and backward graphs
        run()
    synchronize(device)
    ms = time_ms(run, device)
    gbps = nbytes / (ms * 1e-3) / 1e9
    row.update(ms=ms, gbps=gbps, frac_copy_bw=gbps / copy_bandwidth_gbps, bytes=nbytes)
    return row


@pytest.mark.parametrize("case", cases(on_cuda()), ids=str)
def test_temporal_attention(case, benchmark, bench_env, results, device):
    row = base_row(case)
    benchmark.group = f"temporal_attention {case.direction} {case.shape.video} {row['dtype']}"
    record_once(results, benchmark, row, lambda: forward_fn(case, device),
                lambda: measure_attention(case, device, bench_env["copy_bandwidth_gbps"]))
