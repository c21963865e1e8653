"""Pipeline and training tables on one GPU: what a user of `python -m sora.sample` and `python -m sora.train`
waits for, with Open-Sora's acceleration and image tables beside ours (bench/report.py).

Nothing is downloaded: the real architectures are built from their published configs with random weights.
T5-v1.1-XXL's encoder from T5_XXL_CONFIG, with the file-less ByT5 tokenizer (its ids are valid ids of T5's
32,128-entry vocabulary, and what the ids are does not change the speed); Stable Diffusion's VAE from
SD_VAE_CONFIG; STDiT-XL/2, PixArt-XL/2, DiT-XL/2 and Latte-XL/2 through build_model with weights N(0, 0.02)
(bench.test_models.randomize: the zero-initialised projections would multiply zeros).

Providers: `sora` (enable_layernorm_kernel=True) and `eager` (False); flash attention is on in both, as in
bench/test_models.py (Open-Sora v1's own setting); `eager+compile` is test_models' torch.compile (per block).

- sampling_step: one IDDPM step of STDiT-XL/2 with classifier-free guidance (2 prompts, the model sees the
  doubled batch of 4), fp16 as Open-Sora v1 samples, timed through IDDPM.sample itself (a few steps per call).
- t5_encode: T5Encoder.encode (tokenize + encoder) of 32 prompts to 120 tokens, bf16.
- vae_decode: VideoAutoencoderKL.decode of 64 frames at 256x256 and 512x512 per micro-batch size, fp16.
- sample_e2e: one 16x256 video as sora/sample.py makes it: T5 encode, 100 IDDPM steps with CFG, VAE decode,
  the video copied to the host (not written to a file); providers sora, sora+compile (`--compile true`), eager.
- train_step_full: sora.train.train_step, the step `python -m sora.train` runs, for STDiT-XL/2 and PixArt-XL/2
  ("DiT" in Open-Sora's table): with T5-XXL + VAE encoding raw videos and prompts on the fly, and on
  pre-encoded data (the posterior's mean and std, captions), as from `python -m sora.preprocess`. Open-Sora
  v1's training settings: IDDPM's hybrid loss, bf16 autocast with fp32 master weights (fp32 on a CPU), AdamW
  (fused on CUDA), clipping, an fp32 EMA; timesteps and noise from a host generator seeded per step.
- optimizer_step: sora.train.optimizer_step (clipping, AdamW, EMA) over STDiT-XL/2's parameters, with the
  bytes it must move per parameter and its share of the copy bandwidth.
- dit_image_train: the same step for class-conditioned DiT-XL/2 on 256x256 images (latent 1 x 32 x 32).
- latte_train: the same step for class-conditioned Latte-XL/2 at 16x256.

Timing: bench_utils.time_steps (CUDA events around each synchronized call, median). T5-XXL is built once per
run and kept on the GPU for the cases that use it; the others drop it first (RESIDENT). On a CPU the same code
runs on tiny sizes (TINY models, TINY_T5_CONFIG, TINY_VAE_CONFIG, 4x64x64 videos): the CPU smoke set.
"""

import copy
import importlib
import itertools
from dataclasses import dataclass

import pytest
import torch

from bench.bench_utils import (
    DTYPE_NAMES,
    compile_mode,
    free_memory,
    on_cuda,
    record,
    record_largest_batch,
    skip,
    time_steps,
)
from bench.test_models import CPU_VIDEOS, GPU_VIDEOS, TINY, Video, build_dit, captions, compiled, tokens_per_sample
from sora.schedulers import IDDPM

# DeepFloyd/t5-v1_1-xxl's config.json, the encoder's part: 24 layers of width 4096 (64 heads of 64), gated-GELU
# MLP of 10240; 4.76B parameters (9.5 GB in bf16).
T5_XXL_CONFIG = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    dropout_rate=0.1,
    tie_word_embeddings=False,
)
# stabilityai/sd-vae-ft-ema's config.json (AutoencoderKL): 8x spatial downsampling to 4 latent channels.
SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)
CAPTION_TOKENS = 120  # T5 model_max_length (TINY's model_max_length on a CPU)
SD_SCALING_FACTOR = SD_VAE_CONFIG["scaling_factor"]

# Open-Sora v1's settings: inference configs (batch_size 2, fp16, VAE micro_batch_size 128, IDDPM 100 steps,
# cfg_scale 7, cfg_channel 3) and training configs (lr 2e-5, grad_clip 1.0, EMA decay 0.9999).
SAMPLE_BATCH = 2
SAMPLE_VAE_MICRO_BATCH = 128
SAMPLING_STEPS = 100
CFG = dict(cfg_scale=7.0, cfg_channel=3)
LR, GRAD_CLIP, EMA_DECAY = 2e-5, 1.0, 0.9999
# Frames per VAE call when encoding on the fly. Open-Sora's training configs use 128 (16x256) and 64 (64x512);
# 32 keeps the encoder's activations well clear of T5, the optimizer state and the EMA on one GPU.
TRAIN_VAE_MICRO_BATCH = 32


def sample_dtype(device):
    return torch.float16 if device.type == "cuda" else torch.float32


def model_name(model_type: str, device) -> str:
    """The type a row names: the XL preset on a GPU, its tiny stand-in on a CPU."""
    return model_type if device.type == "cuda" else model_type.split("-")[0] + " (tiny)"


# ---- the pieces, built on the device ---------------------------------------------------------------------
def build_t5(device):
    """T5-v1.1-XXL's encoder (TINY_T5_CONFIG on a CPU) in bf16 with seeded random weights."""
    from sora.models.text_encoder import TINY_T5_CONFIG, T5Encoder

    cuda = device.type == "cuda"
    with device:  # 4.76B parameters initialised on the GPU, not the host
        return T5Encoder(config=T5_XXL_CONFIG if cuda else TINY_T5_CONFIG,
                         model_max_length=CAPTION_TOKENS if cuda else TINY["model_max_length"], device=device,
                         dtype=torch.bfloat16 if cuda else torch.float32)


def build_vae(device, dtype, micro_batch_size):
    """Stable Diffusion's VAE per frame (TINY_VAE_CONFIG on a CPU), seeded random weights."""
    from sora.models.vae import TINY_VAE_CONFIG, VideoAutoencoderKL

    with device:
        vae = VideoAutoencoderKL(config=SD_VAE_CONFIG if device.type == "cuda" else TINY_VAE_CONFIG,
                                 micro_batch_size=micro_batch_size)
    return vae.to(device, dtype).eval()


class Resident:
    """T5-XXL (9.5 GB of weights) built once per run and kept on the device for the cases that encode text;
    a case that does not calls drop() first, so the memory it sees (and the batch that fits) does not depend on
    which cases ran before it."""

    def __init__(self):
        self.t5 = None

    def text_encoder(self, device):
        if self.t5 is None:
            self.t5 = build_t5(device)
        return self.t5

    def drop(self):
        if self.t5 is not None:
            self.t5 = None
            free_memory()


RESIDENT = Resident()


def importable(results, benchmark, row, module: str, name: str):
    """module.name, or a skipped row naming the package missing here (bench/NOTES.md: carry its wheel)."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as error:
        skip(results, benchmark, row, f"{module} not importable here ({error}); carry the wheel, see bench/NOTES.md")


# ---- inputs ------------------------------------------------------------------------------------------------
WORDS = "a red panda walks slowly through falling snow in a quiet bamboo forest at dawn under soft golden light".split()


def prompts(n: int) -> list[str]:
    """n prompts of 10 to 73 words: ByT5 has one token per byte, so most fill the 120 tokens and some are cut."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(10 + 9 * (i % 8))) for i in range(n)]


# ---- sampling ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleCase:
    video: Video
    provider: str

    def __str__(self):
        return f"{self.video.label}-{self.provider}"


GPU_SAMPLE_VIDEOS = [Video("16x256x256", 16, 256, 256, batches=(SAMPLE_BATCH,)),
                     Video("16x512x512", 16, 512, 512, batches=(SAMPLE_BATCH,))]
CPU_SAMPLE_VIDEOS = [Video("4x64x64", 4, 64, 64, batches=(SAMPLE_BATCH,))]
STEPS_PER_CALL = 5  # sampling_step: IDDPM steps per timed call (2 on a CPU)


@pytest.mark.parametrize(
    "case",
    [SampleCase(v, p) for v in (GPU_SAMPLE_VIDEOS if on_cuda() else CPU_SAMPLE_VIDEOS) for p in ("sora", "eager")],
    ids=str,
)
def test_sampling_step(case, benchmark, bench_env, results, device):
    RESIDENT.drop()
    dtype = sample_dtype(device)
    steps = STEPS_PER_CALL if device.type == "cuda" else 2
    batch = case.video.batches[0]
    benchmark.group = f"sampling_step {case.video.label}"
    row = {"suite": "pipeline", "bench": "sampling_step", "model": model_name("STDiT-XL/2", device),
           "provider": case.provider, "shape": case.video.label, "batch_size": batch, "model_batch": 2 * batch,
           "dtype": DTYPE_NAMES[dtype], "steps_per_call": steps, **CFG}

    def measure(row):
        latent = case.video.latent
        model = build_dit("STDiT-XL/2", latent, case.provider, device, dtype).eval()
        y, mask = captions(model, batch, device, dtype, torch.Generator(device=device).manual_seed(1))
        scheduler = IDDPM(num_sampling_steps=steps, **CFG)
        # As sora/sample.py: one host generator per prompt, for the initial noise and every step's.
        generators = [torch.Generator().manual_seed(i) for i in range(batch)]
        z = torch.stack([torch.randn(model.in_channels, *latent, generator=g) for g in generators]).to(device)

        def sample():
            scheduler.sample(model, z, y, model.y_embedder.null(batch), mask, progress=False, generator=generators)

        timing = time_steps(benchmark, sample, device, warmup=1)
        row.update(timing, ms=timing["ms"] / steps, ms_call=timing["ms"],
                   wall_ms=timing["wall_ms"] / steps if timing["wall_ms"] is not None else None)

    record(results, benchmark, row, measure)


@pytest.mark.parametrize("batch", [32] if on_cuda() else [4])
def test_t5_encode(batch, benchmark, bench_env, results, device):
    tokens = CAPTION_TOKENS if device.type == "cuda" else TINY["model_max_length"]
    benchmark.group = "t5_encode"
    row = {"suite": "pipeline", "bench": "t5_encode",
           "model": "T5-v1.1-XXL encoder" if device.type == "cuda" else "T5 (tiny)", "provider": "transformers",
           "shape": f"{tokens} tokens", "batch_size": batch,
           "dtype": "bf16" if device.type == "cuda" else "fp32"}

    def measure(row):
        encoder = RESIDENT.text_encoder(device)
        texts = prompts(batch)
        timing = time_steps(benchmark, lambda: encoder.encode(texts), device)
        prompts_per_s = batch / (timing["ms"] * 1e-3)
        row.update(timing, prompts_per_s=prompts_per_s, tokens_per_s=prompts_per_s * tokens,
                   params=sum(p.numel() for p in encoder.model.parameters()))

    record(results, benchmark, row, measure)


@dataclass(frozen=True)
class DecodeCase:
    resolution: int
    frames: int
    micro_batch_size: int

    def __str__(self):
        return f"{self.resolution}x{self.resolution}-{self.frames}frames-mb{self.micro_batch_size}"


# 64 frames per call; micro-batches from a few frames to all 64 (512x512 at 64 may run out of memory: recorded).
GPU_DECODES = [DecodeCase(resolution, 64, mb) for resolution in (256, 512) for mb in (4, 16, 64)]
CPU_DECODES = [DecodeCase(64, 8, mb) for mb in (2, 8)]


@pytest.mark.parametrize("case", GPU_DECODES if on_cuda() else CPU_DECODES, ids=str)
def test_vae_decode(case, benchmark, bench_env, results, device):
    RESIDENT.drop()
    dtype = sample_dtype(device)
    benchmark.group = f"vae_decode {case.resolution}x{case.resolution}"
    row = {"suite": "pipeline", "bench": "vae_decode",
           "model": "SD VAE (sd-vae-ft-ema config)" if device.type == "cuda" else "VAE (tiny)", "provider": "diffusers",
           "shape": f"{case.resolution}x{case.resolution}", "micro_batch_size": case.micro_batch_size,
           "batch_size": case.frames, "dtype": DTYPE_NAMES[dtype]}
    importable(results, benchmark, row, "sora.models.vae", "VideoAutoencoderKL")

    def measure(row):
        vae = build_vae(device, dtype, case.micro_batch_size)
        side = case.resolution // vae.patch_size[1]
        z = torch.randn(1, vae.out_channels, case.frames, side, side, device=device, dtype=dtype)

        @torch.no_grad()
        def decode():
            vae.decode(z)

        timing = time_steps(benchmark, decode, device)
        row.update(timing, frames_per_s=case.frames / (timing["ms"] * 1e-3))

    record(results, benchmark, row, measure)


def sample_e2e_row(provider: str, device) -> dict:
    video = GPU_SAMPLE_VIDEOS[0] if device.type == "cuda" else CPU_SAMPLE_VIDEOS[0]
    dtype = sample_dtype(device)
    row = {"suite": "pipeline", "bench": "sample_e2e", "model": model_name("STDiT-XL/2", device), "provider": provider,
           "shape": video.label, "batch_size": 1, "dtype": DTYPE_NAMES[dtype],
           "steps": SAMPLING_STEPS if device.type == "cuda" else 3, **CFG,
           "vae_micro_batch_size": SAMPLE_VAE_MICRO_BATCH}
    if provider.endswith("+compile"):
        row["compile_mode"] = "model"  # sora.sample compiles the whole model call
    return row


def measure_sample_e2e(benchmark, provider: str, device) -> dict:
    """One video from a prompt, as sora/sample.py makes it (sample_videos, one batch), random weights: time and
    s_per_video. bench/gpu_check.py runs it too (benchmark None)."""
    from sora.sample import sample_videos

    video = GPU_SAMPLE_VIDEOS[0] if device.type == "cuda" else CPU_SAMPLE_VIDEOS[0]
    dtype = sample_dtype(device)
    text_encoder = RESIDENT.text_encoder(device)
    vae = build_vae(device, dtype, SAMPLE_VAE_MICRO_BATCH)
    model = build_dit("STDiT-XL/2", video.latent, provider, device, dtype).eval()
    if provider.endswith("+compile"):
        model = torch.compile(model)  # as sora.sample.run does for --compile true
    scheduler = IDDPM(num_sampling_steps=SAMPLING_STEPS if device.type == "cuda" else 3, **CFG)
    texts = prompts(1)

    def sample():
        return sample_videos(model, vae, text_encoder, scheduler, texts, video.latent, 0, device, dtype)

    timing = time_steps(benchmark, sample, device, warmup=1)
    return dict(timing, s_per_video=timing["ms"] / 1e3)


@pytest.mark.parametrize("provider", ["sora", "sora+compile", "eager"])
def test_sample_e2e(provider, benchmark, bench_env, results, device):
    """sample_e2e per provider; sora+compile is `python -m sora.sample --compile true` (the model call under
    torch.compile)."""
    row = sample_e2e_row(provider, device)
    benchmark.group = f"sample_e2e {row['shape']}"
    importable(results, benchmark, row, "sora.models.vae", "VideoAutoencoderKL")
    importable(results, benchmark, row, "sora.sample", "sample_videos")
    if provider.endswith("+compile") and device.type != "cuda":
        skip(results, benchmark, row, "CPU smoke set: torch.compile is measured on GPUs only")
    record(results, benchmark, row, lambda row: row.update(measure_sample_e2e(benchmark, provider, device)))


# ---- training ----------------------------------------------------------------------------------------------
# Class-conditioned models: DiT on ImageNet's 1000 classes, Latte as released (UCF-101's 101).
LABEL_MODELS = {"DiT-XL/2": dict(condition="label_1000"), "Latte-XL/2": dict(condition="label_101")}


@dataclass(frozen=True)
class TrainCase:
    bench: str
    model: str
    video: Video
    encoders: bool  # T5 + VAE on the fly (train_step_full), else pre-encoded latents and captions or labels
    provider: str

    def __str__(self):
        inputs = "t5vae" if self.encoders else "latents"
        return f"{self.bench}-{self.model.split('-')[0]}-{self.video.label}-{inputs}-{self.provider}"


IMAGE_GPU = Video("1x256x256", 1, 256, 256, batches=(128, 64))  # Open-Sora's image table: batch 128
IMAGE_CPU = Video("1x64x64", 1, 64, 64, batches=(4,))
CPU_GC_VIDEO = Video("4x64x64-gc", 4, 64, 64, batches=(2,), grad_checkpoint=True)  # the 64x512 rows' path


def train_cases(cuda: bool) -> list[TrainCase]:
    videos = GPU_VIDEOS if cuda else CPU_VIDEOS
    # With encoders first: the cases that share the resident T5 run together.
    full = [TrainCase("train_step_full", model, video, encoders, provider)
            for encoders in (True, False) for video in videos for model in ("STDiT-XL/2", "PixArt-XL/2")
            for provider in ("sora", "eager")]
    image = [TrainCase("dit_image_train", "DiT-XL/2", IMAGE_GPU if cuda else IMAGE_CPU, False, provider)
             for provider in ("sora", "eager", "eager+compile")]
    latte = [TrainCase("latte_train", "Latte-XL/2", videos[0], False, provider) for provider in ("sora", "eager")]
    checkpointed = [] if cuda else [TrainCase("train_step_full", "STDiT-XL/2", CPU_GC_VIDEO, False, "sora")]
    return full + checkpointed + image + latte


def train_row(case: TrainCase, batch: int, device) -> dict:
    row = {"suite": "train", "bench": case.bench, "model": model_name(case.model, device), "provider": case.provider,
           "shape": case.video.label, "batch_size": batch, "encoders": "T5+VAE" if case.encoders else "none",
           "grad_checkpoint": case.video.grad_checkpoint,
           "dtype": "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32", "optimizer_step": True}
    if case.provider.endswith("+compile"):
        row["compile_mode"] = compile_mode()
    return row


def train_inputs(case: TrainCase, model, batch: int, device, generator) -> dict:
    """Raw videos in [-1, 1] (B, 3, T, H, W) already on the device and prompts; or what sora.preprocess stores:
    the posterior's mean and std in the compute dtype, bf16 captions (class ids for the class-conditioned
    models)."""
    T, H, W = case.video.latent
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if case.encoders:
        video = torch.rand(batch, 3, case.video.frames, case.video.height, case.video.width, device=device,
                           generator=generator)
        return {"video": (video * 2 - 1).to(dtype), "text": prompts(batch)}
    mean = torch.randn(batch, model.in_channels, T, H, W, device=device, generator=generator) / SD_SCALING_FACTOR
    encoded = {"mean": mean.to(dtype), "std": torch.full_like(mean, 0.1, dtype=dtype)}
    if case.model in LABEL_MODELS:
        return {**encoded, "y": torch.randint(0, model.num_classes, (batch,), device=device, generator=generator)}
    y, mask = captions(model, batch, device, dtype, generator)
    return {**encoded, "y": y, "mask": mask}


def measure_train(benchmark, case: TrainCase, batch: int, device) -> dict:
    """sora.train.train_step for case at batch: time, samples/s and tokens/s. bench/gpu_check.py runs it too
    (benchmark None)."""
    from sora.train import build_optimizer, train_step

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    encoders = {}
    if case.encoders:
        encoders = dict(vae=build_vae(device, dtype, TRAIN_VAE_MICRO_BATCH),
                        text_encoder=RESIDENT.text_encoder(device))
    model = build_dit(case.model, case.video.latent, case.provider, device, torch.float32,
                      grad_checkpoint=case.video.grad_checkpoint, **LABEL_MODELS.get(case.model, {})).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    forward = compiled(model) if case.provider.endswith("+compile") else model  # the EMA is never compiled
    optimizer = build_optimizer(model, LR)
    diffusion = IDDPM()  # Open-Sora's training scheduler: 1000 steps, learned sigma, hybrid loss
    batch_inputs = train_inputs(case, model, batch, device, torch.Generator(device=device).manual_seed(1))
    seeds = itertools.count()

    def step():
        train_step(model, ema, optimizer, diffusion, batch_inputs, torch.Generator().manual_seed(next(seeds)),
                   latent_scale=SD_SCALING_FACTOR, dtype=dtype, autocast_dtype=torch.bfloat16 if cuda else None,
                   grad_clip=GRAD_CLIP, ema_decay=EMA_DECAY, forward=forward, **encoders)

    timing = time_steps(benchmark, step, device)
    samples_per_s = batch / (timing["ms"] * 1e-3)
    return dict(timing, samples_per_s=samples_per_s,
                tokens_per_s=samples_per_s * tokens_per_sample(model, case.video))


@pytest.mark.parametrize("case", train_cases(on_cuda()), ids=str)
def test_train(case, benchmark, bench_env, results, device):
    benchmark.group = f"{case.bench} {case.model} {case.video.label}"
    first = train_row(case, case.video.batches[0], device)
    if case.provider.endswith("+compile") and device.type != "cuda":
        skip(results, benchmark, first, "CPU smoke set: torch.compile is measured on GPUs only")
    importable(results, benchmark, first, "sora.train", "train_step")
    if case.encoders:
        importable(results, benchmark, first, "sora.models.vae", "VideoAutoencoderKL")
    else:
        RESIDENT.drop()
    record_largest_batch(results, benchmark, lambda batch: train_row(case, batch, device),
                         lambda row, batch: row.update(measure_train(benchmark, case, batch, device)),
                         case.video.batches)


OPTIMIZER_BYTES_PER_PARAM = 52  # sora.train.optimizer_step's docstring: clipping 12, AdamW 28, EMA 12 (fp32)


def optimizer_row(device) -> dict:
    return {"suite": "optimizer", "bench": "optimizer_step", "model": model_name("STDiT-XL/2", device),
            "provider": "sora", "shape": "parameters", "dtype": "fp32",
            "optimizer": "AdamW fused" if device.type == "cuda" else "AdamW foreach"}


def measure_optimizer_step(benchmark, device, copy_bandwidth_gbps: float) -> dict:
    """Clipping + AdamW + EMA over STDiT-XL/2's parameters (tiny STDiT on a CPU), fp32 master weights,
    gradients and EMA, as after a step's backward: time, parameters, bytes per parameter, GB/s and its share
    of the copy bandwidth. bench/gpu_check.py runs it too (benchmark None)."""
    from sora.train import build_optimizer, optimizer_step

    video = GPU_VIDEOS[0] if device.type == "cuda" else CPU_VIDEOS[0]
    model = build_dit("STDiT-XL/2", video.latent, "sora", device, torch.float32).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = build_optimizer(model, LR)
    generator = torch.Generator(device=device).manual_seed(0)
    for parameter in model.parameters():
        parameter.grad = torch.randn(parameter.shape, device=device, generator=generator)
    timing = time_steps(benchmark, lambda: optimizer_step(model, ema, optimizer, GRAD_CLIP, EMA_DECAY), device)
    params = sum(p.numel() for p in model.parameters())
    gbps = OPTIMIZER_BYTES_PER_PARAM * params / (timing["ms"] * 1e-3) / 1e9
    return dict(timing, params=params, bytes_per_param=OPTIMIZER_BYTES_PER_PARAM, gbps=gbps,
                frac_copy_bw=gbps / copy_bandwidth_gbps)


def test_optimizer_step(benchmark, bench_env, results, device):
    RESIDENT.drop()
    benchmark.group = "optimizer_step"
    row = optimizer_row(device)
    importable(results, benchmark, row, "sora.train", "optimizer_step")
    record(results, benchmark, row,
           lambda row: row.update(measure_optimizer_step(benchmark, device, bench_env["copy_bandwidth_gbps"])))
