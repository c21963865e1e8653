"""Model-level tables: STDiT-XL/2 and PixArt-XL/2 (Open-Sora's "DiT (T5, full attention)") on one GPU.

Rows of stdit_train / pixart_train: one training step = zero_grad + forward + MSE loss + backward, bf16 weights
and inputs, random weights; the AdamW step, T5 and the VAE are excluded (latents and captions are random
tensors). stdit_infer: one forward under torch.no_grad(). Providers: sora (enable_layernorm_kernel=True,
enable_flashattn=True), eager (kernels off, flash on: Open-Sora v1's setting), and both under torch.compile
(SORA_BENCH_COMPILE=blocks, the default, compiles each transformer block; =model compiles the whole model).

temporal_branch: STDiT's temporal branch, fwd+bwd: qkv Linear -> attention over frames -> proj Linear -> gated
residual, as the model runs it: sora (frame-major throughout: K.temporal_attention, K.gated_residual) vs eager
(rearrange + contiguous, attention, rearrange back, x + gate * y).
"""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import sora.kernels as K
from bench.bench_utils import (
    compile_mode,
    measured_once,
    on_cuda,
    randomize,
    record,
    record_largest_batch,
    skip,
    synchronize,
    time_ms,
    time_steps,
)
from sora.models import build_model
from sora.models.layers import Attention


@dataclass(frozen=True)
class Video:
    """A video size "frames x height x width" in pixels; the SD VAE makes latents 8x smaller in H and W."""

    label: str
    frames: int
    height: int
    width: int
    batches: tuple  # tried in order: a batch that runs out of memory is recorded, then the next is tried
    grad_checkpoint: bool = False

    @property
    def latent(self) -> tuple:
        return (self.frames, self.height // 8, self.width // 8)


# Activations of an STDiT-XL/2 training step (flash attention, no checkpointing) come to ~27 (B, N, C) bf16
# tensors per block, ~62 KB per token per block: 16x256 at batch 8 (32K tokens) needs ~57 GB for them,
# eager a few GB more; 16x512 at batch 2 is the same token count. 64x512 keeps only each block's input under
# gradient checkpointing (4 GB at batch 1). A batch that does not fit falls back to the next one listed.
GPU_VIDEOS = [
    Video("16x256x256", 16, 256, 256, batches=(8, 4)),
    Video("16x512x512", 16, 512, 512, batches=(2, 1)),
    Video("64x512x512", 64, 512, 512, batches=(1,), grad_checkpoint=True),
]
CPU_VIDEOS = [Video("4x64x64", 4, 64, 64, batches=(2,))]
TINY = dict(hidden_size=64, depth=2, num_heads=4, caption_channels=32, model_max_length=8)

MODEL_BENCHES = {  # bench -> (model type, training step?)
    "stdit_train": ("STDiT-XL/2", True),
    "pixart_train": ("PixArt-XL/2", True),
    "stdit_infer": ("STDiT-XL/2", False),
}
PROVIDERS = ("sora", "sora+compile", "eager", "eager+compile")


@dataclass(frozen=True)
class ModelCase:
    bench: str
    video: Video
    provider: str

    def __str__(self):
        return f"{self.bench}-{self.video.label}-{self.provider}"


def model_cases(cuda: bool) -> list[ModelCase]:
    return [
        ModelCase(bench, video, provider)
        for bench in MODEL_BENCHES
        for video in (GPU_VIDEOS if cuda else CPU_VIDEOS)
        for provider in PROVIDERS
    ]


def build_dit(model_type, latent, provider, device, dtype, grad_checkpoint=False, **kwargs):
    """A diffusion transformer for latents (T, H, W) with random weights in dtype (tiny on a CPU)."""
    cfg = dict(type=model_type, input_size=latent, enable_flashattn=True,
               enable_layernorm_kernel=provider.startswith("sora"), grad_checkpoint=grad_checkpoint, **kwargs)
    if device.type != "cuda":  # the CPU smoke set: a tiny STDiT/PixArt with the same code path
        cfg.update(type=model_type.split("-")[0], patch_size=(1, 2, 2), **TINY)
    with device:  # parameters are created (and initialised) on the device: much faster than on the host
        model = build_model(cfg)
    model.to(device=device, dtype=dtype)
    randomize(model)
    return model


def build(case: ModelCase, device, dtype):
    model_type, train = MODEL_BENCHES[case.bench]
    model = build_dit(model_type, case.video.latent, case.provider, device, dtype,
                      grad_checkpoint=case.video.grad_checkpoint and train)
    return model.train(train)


def compiled(model):
    if compile_mode() == "model":
        return torch.compile(model, dynamic=False)
    # Block 0 (with the temporal position embedding) and the others give two graphs; identical blocks reuse them.
    for block in model.blocks:
        block.compile(dynamic=False)
    return model


def captions(model, batch, device, dtype, generator):
    """What T5 hands the model for `batch` prompts: y (B, 1, L, C) and an int64 mask of 20-100 real tokens of
    120 (scaled for the tiny model)."""
    L, C = model.y_embedder.y_embedding.shape
    y = torch.randn(batch, 1, L, C, device=device, dtype=dtype, generator=generator)
    lengths = torch.randint(max(1, L // 6), max(2, (5 * L) // 6), (batch,), device=device, generator=generator)
    return y, (torch.arange(L, device=device)[None] < lengths[:, None]).long()


def model_inputs(model, case: ModelCase, batch: int, device, dtype, generator):
    T, H, W = case.video.latent
    x = torch.randn(batch, model.in_channels, T, H, W, device=device, dtype=dtype, generator=generator)
    timestep = torch.randint(0, 1000, (batch,), device=device, generator=generator)
    y, mask = captions(model, batch, device, dtype, generator)
    return x, timestep, y, mask.bool()


def tokens_per_sample(model, video: Video) -> int:
    return math.prod(model.token_grid(video.latent))


@pytest.mark.parametrize("case", model_cases(on_cuda()), ids=str)
def test_model(case, benchmark, bench_env, results, device):
    _, train = MODEL_BENCHES[case.bench]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    benchmark.group = f"{case.bench} {case.video.label}"
    if case.provider.endswith("+compile") and device.type != "cuda":
        row = model_row(case, case.video.batches[0])
        skip(results, benchmark, row, "CPU smoke set: torch.compile is measured on GPUs only")

    def measure(row, batch):
        generator = torch.Generator(device=device).manual_seed(1)
        model = build(case, device, dtype)
        x, timestep, y, mask = model_inputs(model, case, batch, device, dtype, generator)
        forward = compiled(model) if case.provider.endswith("+compile") else model
        if train:
            target = torch.randn((batch, model.out_channels) + case.video.latent, device=device, generator=generator)

            def step():
                model.zero_grad(set_to_none=True)
                F.mse_loss(forward(x, timestep, y, mask), target).backward()
        else:

            @torch.no_grad()
            def step():
                forward(x, timestep, y, mask)

        # Warm-up (2 steps): kernels' JIT, cuDNN/cuBLAS handles, and for +compile the forward and backward graphs.
        timing = time_steps(benchmark, step, device)
        samples_per_s = batch / (timing["ms"] * 1e-3)
        row.update(
            ms=timing["ms"],
            wall_ms=timing["wall_ms"],
            samples_per_s=samples_per_s,
            tokens_per_s=samples_per_s * tokens_per_sample(model, case.video),
            peak_mem_gb=timing["peak_mem_gb"],
            rounds=timing["rounds"],
        )

    record_largest_batch(results, benchmark, lambda batch: model_row(case, batch), measure, case.video.batches)


def model_row(case: ModelCase, batch: int) -> dict:
    _, train = MODEL_BENCHES[case.bench]
    row = {
        "suite": "models",
        "bench": case.bench,
        "provider": case.provider,
        "shape": case.video.label,
        "batch_size": batch,
        "grad_checkpoint": case.video.grad_checkpoint and train,
    }
    if case.provider.endswith("+compile"):
        row["compile_mode"] = compile_mode()
    return row


# ---- temporal branch -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BranchCase:
    video: Video
    provider: str  # "sora": K.temporal_attention on frame-major qkv; "eager": rearranges and x + gate * y

    def __str__(self):
        return f"temporal_branch-{self.video.label}-{self.provider}"


def temporal_branch(provider: str, attention: Attention, T: int):
    if provider == "sora":
        def branch(x, gate):
            return K.gated_residual(x, attention(x, temporal=T), gate)
    else:
        def branch(x, gate):
            x_t = rearrange(x, "B (T S) C -> (B S) T C", T=T).contiguous()
            return x + gate * rearrange(attention(x_t), "(B S) T C -> B (T S) C", B=x.shape[0])
    return branch


def measure_temporal_branch(video: Video, provider: str, device, time=time_ms) -> dict:
    """STDiT-XL/2's temporal branch fwd+bwd at the video's first batch size (C=1152, 16 heads; TINY's on a CPU),
    timed once by time(step, device); returns the row's numbers."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden, heads = (1152, 16) if device.type == "cuda" else (TINY["hidden_size"], TINY["num_heads"])
    T, H, W = video.latent
    S = (H // 2) * (W // 2)
    batch = video.batches[0]
    attention = Attention(hidden, heads, qkv_bias=True, enable_flashattn=True).to(device=device, dtype=dtype)
    randomize(attention)
    x = torch.randn(batch, T * S, hidden, device=device, dtype=dtype, requires_grad=True)
    gate = (0.1 * torch.randn(batch, 1, hidden, device=device, dtype=dtype)).requires_grad_()
    dout = torch.randn_like(x)
    branch = temporal_branch(provider, attention, T)
    wrt = [x, gate, *attention.parameters()]

    def step():
        return torch.autograd.grad(branch(x, gate), wrt, dout)

    step()
    step()
    synchronize(device)
    ms = time(step, device)
    return dict(ms=ms, samples_per_s=batch / (ms * 1e-3), tokens_per_s=batch * T * S / (ms * 1e-3))


def temporal_branch_row(video: Video, provider: str) -> dict:
    return {"suite": "models", "bench": "temporal_branch", "direction": "fwd+bwd", "provider": provider,
            "shape": video.label, "batch_size": video.batches[0]}


@pytest.mark.parametrize(
    "case", [BranchCase(video, provider) for video in (GPU_VIDEOS if on_cuda() else CPU_VIDEOS) for provider in ("sora", "eager")],
    ids=str,
)
def test_temporal_branch(case, benchmark, bench_env, results, device):
    """STDiT-XL/2's temporal branch at the model benches' first batch size: C=1152, 16 heads, T latent frames."""
    benchmark.group = f"temporal_branch {case.video.label}"
    row = temporal_branch_row(case.video, case.provider)

    def measure(row):
        row.update(measured_once(benchmark, lambda: measure_temporal_branch(case.video, case.provider, device)))

    record(results, benchmark, row, measure)
