"""Kernel speed suite: sora's Triton kernels beside torch eager, torch.compile, apex and Liger.

One test per (bench, direction, shape, dtype, provider), each timed once (measure_kernel: do_bench median,
run as the test's one pytest-benchmark call); bench/gpu_check.py times its kernel rows with the same
measure_kernel. Rows: ms, GB/s from the minimum bytes the op must move (bench_utils.kernel_bytes,
bench/NOTES.md) and that as a fraction of the measured copy bandwidth. The eager providers are what Open-Sora v1
runs with the kernels off: F.layer_norm then `* (1 + scale) + shift`, `x + gate * y`, and einops rearranges (made
contiguous where attention's input needs it); in fp32 they are also the reference of the sora row's rel_err.
"""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import sora.kernels as K
from bench.bench_utils import (
    DTYPE_NAMES,
    Rotation,
    kernel_bytes,
    measured_once,
    on_cuda,
    record,
    skip,
    synchronize,
    time_ms,
)

EPS = 1e-6


@dataclass(frozen=True)
class Shape:
    """x = (B, T*S, C): B samples of a `video` (frames x resolution) latent at STDiT-XL/2's patching."""

    video: str
    B: int
    T: int
    S: int
    C: int

    @property
    def N(self) -> int:
        return self.T * self.S


# STDiT-XL/2 (C=1152) at Open-Sora's three sizes, batches giving 1M rows (> 2 GB per bf16 tensor, 40x L2).
# The C=4096 case keeps 512K rows: its eager fwd+bwd holds ~9 tensors of 4.3 GB, 1M rows would not fit 78 GB.
GPU_SHAPES = [
    (Shape("16x256", B=256, T=16, S=256, C=1152), (torch.bfloat16, torch.float32)),
    (Shape("16x512", B=64, T=16, S=1024, C=1152), (torch.bfloat16, torch.float32)),
    (Shape("64x512", B=16, T=64, S=1024, C=1152), (torch.bfloat16, torch.float32)),
    (Shape("64x512", B=8, T=64, S=1024, C=4096), (torch.bfloat16,)),
]
CPU_SHAPES = [(Shape("tiny", B=2, T=4, S=8, C=64), (torch.float32,))]

LN_PROVIDERS = ("sora", "torch", "torch.compile", "apex", "liger")
PLAIN_PROVIDERS = ("sora", "torch", "torch.compile")
BENCHES = {
    "layernorm_modulate": LN_PROVIDERS,
    "layernorm_modulate_temporal": LN_PROVIDERS,
    "gated_residual": PLAIN_PROVIDERS,
    "gated_residual_temporal": PLAIN_PROVIDERS,
    "to_temporal": PLAIN_PROVIDERS,
}
DIRECTIONS = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    bench: str
    direction: str
    shape: Shape
    dtype: torch.dtype
    provider: str

    @property
    def temporal(self) -> int | None:
        """The frame count for the variants that change layout, else None."""
        return self.shape.T if self.bench.endswith("temporal") else None

    def __str__(self):
        s = self.shape
        return f"{self.bench}-{self.direction}-{s.video}-C{s.C}-{DTYPE_NAMES[self.dtype]}-{self.provider}"


def cases(cuda: bool) -> list[Case]:
    return [
        Case(bench, direction, shape, dtype, provider)
        for bench, providers in BENCHES.items()
        for shape, dtypes in (GPU_SHAPES if cuda else CPU_SHAPES)
        for dtype in dtypes
        for direction in DIRECTIONS
        for provider in providers
    ]


# ---- inputs: fresh random values (never zeros) -------------------------------------------------------
def make_inputs(case: Case, device, requires_grad: bool) -> dict:
    s, dtype = case.shape, case.dtype

    def randn(*shape, scale=1.0):
        tensor = torch.randn(shape, device=device, dtype=dtype)
        if scale != 1.0:
            tensor.mul_(scale)  # in place: no second copy of a multi-GB tensor
        return tensor.requires_grad_(requires_grad)

    if case.bench.startswith("layernorm_modulate"):
        inputs = dict(x=randn(s.B, s.N, s.C), shift=randn(s.B, 1, s.C, scale=0.1), scale=randn(s.B, 1, s.C, scale=0.1))
    elif case.bench.startswith("gated_residual"):
        y_shape = (s.B * s.S, s.T, s.C) if case.temporal else (s.B, s.N, s.C)
        inputs = dict(x=randn(s.B, s.N, s.C), y=randn(*y_shape), gate=randn(s.B, 1, s.C, scale=0.1))
    else:
        inputs = dict(x=randn(s.B, s.N, s.C))
    return inputs


def output_shape(case: Case) -> tuple:
    s = case.shape
    if case.bench in ("layernorm_modulate_temporal", "to_temporal"):
        return (s.B * s.S, s.T, s.C)
    return (s.B, s.N, s.C)


# ---- providers: forward functions of the inputs ------------------------------------------------------
class Unavailable(Exception):
    """A provider that cannot run here; the message is the row's skip reason."""


def eager_layernorm_modulate(T, norm=None):
    def forward(x, shift, scale):
        normed = norm(x) if norm is not None else F.layer_norm(x, (x.shape[-1],), eps=EPS)
        y = normed * (1 + scale) + shift
        return y if T is None else rearrange(y, "B (T S) C -> (B S) T C", T=T).contiguous()

    return forward


def eager_gated_residual(T):
    def forward(x, y, gate):
        if T is not None:
            y = rearrange(y, "(B S) T C -> B (T S) C", B=x.shape[0])
        return x + gate * y

    return forward


def eager_to_temporal(T):
    def forward(x):
        return rearrange(x, "B (T S) C -> (B S) T C", T=T).contiguous()

    return forward


def external_norm(provider: str, C: int, device, dtype):
    """apex FusedLayerNorm or Liger's LayerNorm (weight 1, bias 0: Liger has no affine-free mode)."""
    if device.type != "cuda":
        raise Unavailable(f"{provider} needs CUDA")
    if provider == "apex":
        try:
            from apex.normalization import FusedLayerNorm
        except ImportError:
            raise Unavailable("apex not importable") from None
        return FusedLayerNorm(C, eps=EPS, elementwise_affine=False).to(device)
    try:
        from liger_kernel.transformers import LigerLayerNorm
    except ImportError:
        raise Unavailable("liger_kernel not importable") from None
    norm = LigerLayerNorm(C, eps=EPS).to(device=device, dtype=dtype)
    norm.requires_grad_(False)
    return norm


def eager_forward(case: Case, norm=None):
    """The op as Open-Sora v1 runs it with the kernels off (LayerNorm `norm`, else F.layer_norm)."""
    T = case.temporal
    if case.bench.startswith("layernorm_modulate"):
        return eager_layernorm_modulate(T, norm)
    if case.bench.startswith("gated_residual"):
        return eager_gated_residual(T)
    return eager_to_temporal(case.shape.T)


def forward_fn(case: Case, device):
    T = case.temporal
    if case.provider == "torch.compile" and device.type != "cuda":
        raise Unavailable("CPU smoke set: torch.compile is measured on GPUs only")
    if case.provider == "sora":
        if case.bench.startswith("layernorm_modulate"):
            return lambda x, shift, scale: K.layernorm_modulate(x, shift, scale, eps=EPS, temporal=T)
        if case.bench.startswith("gated_residual"):
            return lambda x, y, gate: K.gated_residual(x, y, gate, temporal=T)
        return lambda x: K.to_temporal(x, case.shape.T)
    external = case.provider in ("apex", "liger")
    eager = eager_forward(case, external_norm(case.provider, case.shape.C, device, case.dtype) if external else None)
    if case.provider == "torch.compile":
        return torch.compile(eager, dynamic=False)
    return eager


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---- the measurement --------------------------------------------------------------------------------
def base_row(case: Case) -> dict:
    s = case.shape
    return {
        "suite": "kernels",
        "bench": case.bench,
        "direction": case.direction,
        "shape": [s.B, s.N, s.C],
        "video": s.video,
        "T": s.T,
        "dtype": DTYPE_NAMES[case.dtype],
        "provider": case.provider,
    }


def measure_kernel(case: Case, device, copy_bandwidth_gbps: float) -> dict:
    """Time one case once (after a warm-up of Triton JIT, torch.compile's graphs and handles): the row's ms,
    GB/s, share of the copy bandwidth, bytes, and for sora its forward's rel_err against the fp32 eager op.
    Raises Unavailable for a provider that cannot run here."""
    s = case.shape
    nbytes = kernel_bytes(case.bench, case.direction, s.B, s.N, s.C, torch.empty((), dtype=case.dtype).element_size())
    forward = forward_fn(case, device)
    backward = case.direction == "fwd+bwd"

    def inputs_with_grad():
        inputs = make_inputs(case, device, requires_grad=backward)
        if backward:
            inputs["dout"] = torch.randn(output_shape(case), device=device, dtype=case.dtype)
        return inputs

    def step(inputs):
        args = {name: tensor for name, tensor in inputs.items() if name != "dout"}
        out = forward(**args)
        if not backward:
            return out
        # autograd.grad returns fresh gradients each call: nothing accumulates into .grad between runs.
        return torch.autograd.grad(out, list(args.values()), inputs["dout"])

    run = Rotation(inputs_with_grad, step, nbytes, device)
    row = {}
    if case.provider == "sora":
        with torch.no_grad():
            probe = {name: tensor.detach() for name, tensor in run.sets[0].items() if name != "dout"}
            reference = eager_forward(case)(**{name: tensor.float() for name, tensor in probe.items()})
            row["rel_err"] = relative_error(forward(**probe), reference)
            del reference
    for _ in range(2):
        run()
    synchronize(device)
    ms = time_ms(run, device)
    gbps = nbytes / (ms * 1e-3) / 1e9
    row.update(ms=ms, gbps=gbps, frac_copy_bw=gbps / copy_bandwidth_gbps, bytes=nbytes)
    return row


def record_once(results, benchmark, row, forward, measure):
    """A row skipped with the reason when its provider cannot run here (forward() raises Unavailable), else
    measured once: measure() returns the row's numbers. test_attention's rows are recorded the same way."""
    try:
        forward()
    except Unavailable as reason:
        skip(results, benchmark, row, str(reason))
    record(results, benchmark, row, lambda row: row.update(measured_once(benchmark, measure)))


@pytest.mark.parametrize("case", cases(on_cuda()), ids=str)
def test_kernel(case, benchmark, bench_env, results, device):
    s = case.shape
    row = base_row(case)
    benchmark.group = f"{case.bench} {case.direction} {s.video} C={s.C} {row['dtype']}"
    record_once(results, benchmark, row, lambda: forward_fn(case, device),
                lambda: measure_kernel(case, device, bench_env["copy_bandwidth_gbps"]))
