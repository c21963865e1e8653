"""How each bench of bench/cases.py is measured (MEASURES), and run_case, the one function that measures a case for
`pytest bench/ --benchmark` and bench/gpu_check.py alike. Nothing is downloaded: random weights, T5-v1.1-XXL's
encoder and the SD VAE built from their published configs; on a CPU the same code runs tiny sizes (the smoke set)."""

import copy
import functools
import importlib
import itertools
import math
import os

import torch
import torch.nn.functional as F
from einops import rearrange

import sora.kernels as K
from bench.bench_utils import DTYPES, REPO, Rotation, Timer, free_memory, randomize
from bench.cases import CFG, KERNEL_PROVIDERS, OPTIMIZER_BYTES_PER_PARAM, all_to_all_volume, kernel_bytes
from sora.kernels.layout import swap_leading, swap_leading_reference
from sora.schedulers import IDDPM
from sora.schedulers.cache import check_cache

EPS = 1e-6
TINY = dict(hidden_size=48, depth=2, num_heads=4, caption_channels=32, model_max_length=8)  # STDiT2: C % 12 == 0
# DeepFloyd/t5-v1_1-xxl's config.json, the encoder's part: 4.76B parameters (9.5 GB in bf16).
T5_XXL_CONFIG = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.1,
                     tie_word_embeddings=False)
# stabilityai/sd-vae-ft-ema's config.json (AutoencoderKL): 8x spatial downsampling to 4 latent channels.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                     layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=256,
                     scaling_factor=0.18215)
SD_SCALING_FACTOR = SD_VAE_CONFIG["scaling_factor"]
LR, GRAD_CLIP, EMA_DECAY = 2e-5, 1.0, 0.9999  # Open-Sora v1's training configs
TRAIN_VAE_MICRO_BATCH = 32  # frames per VAE call on the fly (Open-Sora's: 128 or 64): room for T5 and the EMA
# Providers that run another package's op (module, name); with torch.compile's, measured on GPUs only.
EXTERNAL = {"apex": ("apex.normalization", "FusedLayerNorm"), "flash-attn": ("flash_attn", "flash_attn_func"),
            "liger": ("liger_kernel.transformers", "LigerLayerNorm")}
LABEL_MODELS = {"DiT-XL/2": dict(condition="label_1000"), "Latte-XL/2": dict(condition="label_101")}
STAGE1 = REPO / "configs" / "opensora-v1-1" / "train" / "stage1.py"  # Open-Sora v1.1's mask_ratios


class Unavailable(Exception):
    """A provider that cannot run here; the message is the row's skip reason."""


def importable(module: str, *names: str):
    """module's names (one: the object), or Unavailable naming the package missing here (pip install ".[bench]")."""
    try:
        found = importlib.import_module(module)
    except ImportError as error:
        raise Unavailable(f"{module} not importable here ({error})") from None
    return getattr(found, names[0]) if len(names) == 1 else tuple(getattr(found, name) for name in names)


def compile_mode(provider: str = "+compile", mode: str | None = None) -> str | None:
    """How a +compile provider applies torch.compile (else None), SORA_BENCH_COMPILE: "blocks" (default) or "model"."""
    mode = mode or os.environ.get("SORA_BENCH_COMPILE", "blocks")
    if mode not in ("blocks", "model"):
        raise ValueError(f"SORA_BENCH_COMPILE must be 'blocks' or 'model', got {mode!r}")
    return mode if provider.endswith("compile") else None


# ---- kernels ------------------------------------------------------------------------------------------------------
def temporal(T, x):
    return rearrange(x, "B (T S) C -> (B S) T C", T=T).contiguous()


def kernel_op(bench: str, s):
    """A kernel bench at Shape s: (its random inputs (never zeros) from randn, sora's call, eager(norm, flash): the
    path Open-Sora v1 (v1.1 for qk_norm) runs with the kernels off (with apex's or Liger's LayerNorm `norm`,
    flash-attn's `flash`), the shapes of its outputs). A _temporal variant has its y in the "(B S) T C" layout."""
    layout = s.T if bench.endswith("_temporal") else None
    tokens, rows, frame_major = (s.B, s.N, s.C), (s.B, 1, s.C), (s.B * s.S, s.T, s.C)
    if bench.startswith("layernorm_modulate"):
        def eager(norm, flash):
            def forward(x, shift, scale):
                y = (norm(x) if norm is not None else F.layer_norm(x, (x.shape[-1],), eps=EPS)) * (1 + scale) + shift
                return temporal(s.T, y) if layout else y
            return forward

        return (lambda randn: dict(x=randn(*tokens), shift=randn(*rows, scale=0.1), scale=randn(*rows, scale=0.1)),
                lambda x, shift, scale: K.layernorm_modulate(x, shift, scale, eps=EPS, temporal=layout),
                eager, [frame_major if layout else tokens])
    if bench.startswith("gated_residual"):
        return (lambda randn: dict(x=randn(*tokens), gate=randn(*rows, scale=0.1),
                                   y=randn(*(frame_major if layout else tokens))),
                lambda x, y, gate: K.gated_residual(x, y, gate, temporal=layout),
                lambda norm, flash: lambda x, y, gate: x + gate * (
                    rearrange(y, "(B S) T C -> B (T S) C", B=s.B) if layout else y), [tokens])
    if bench == "to_temporal":
        return (lambda randn: dict(x=randn(*tokens)), lambda x: K.to_temporal(x, s.T),
                lambda norm, flash: lambda x: temporal(s.T, x), [frame_major])
    if bench == "temporal_attention":
        def eager(norm, flash):
            def forward(qkv):
                q, k, v = rearrange(qkv, "B (T S) (three H D) -> three (B S) T H D", T=s.T, three=3,
                                    H=s.heads).contiguous()
                out = flash(q, k, v) if flash else F.scaled_dot_product_attention(
                    *(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
                return rearrange(out, "(B S) T H D -> B (T S) (H D)", B=s.B).contiguous()
            return forward

        return (lambda randn: dict(qkv=randn(s.B, s.N, 3 * s.C)), lambda qkv: K.temporal_attention(qkv, s.T, s.heads),
                eager, [tokens])

    if bench != "qk_norm":
        raise ValueError(f"no kernel op for bench {bench!r}")

    def eager(norm, flash):
        """Open-Sora v1.1's spatial attention: q, k, v (B*T, H, S, D) views of qkv; q and k through LlamaRMSNorm."""
        rms_norm = importable("tests.stdit2_reference", "rms_norm")

        def forward(qkv, q_weight, k_weight):
            q, k, v = qkv.view(*qkv.shape[:2], 3, s.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            return rms_norm(q_weight, q, True), rms_norm(k_weight, k, True), v
        return forward

    return (lambda randn: dict(qkv=randn(s.B * s.T, s.S, 3 * s.C), q_weight=randn(s.C // s.heads),
                               k_weight=randn(s.C // s.heads)),
            lambda qkv, q_weight, k_weight: K.qk_norm(qkv, s.heads, q_weight, k_weight, EPS),
            eager, [(s.B * s.T, s.heads, s.S, s.C // s.heads)] * 3)


def bandwidth(nbytes: int, ms: float, timer: Timer) -> dict:
    gbps = nbytes / (ms * 1e-3) / 1e9
    return dict(ms=ms, gbps=gbps, frac_copy_bw=gbps / timer.copy_bandwidth_gbps, bytes=nbytes)


def flat(out) -> torch.Tensor:
    """An op's output, a tensor or a tuple of them (qk_norm's q, k, v), as one fp32 vector."""
    return torch.cat([t.float().flatten() for t in (out if isinstance(out, tuple) else [out])])


def measure_kernel(case, batch, timer: Timer) -> dict:
    """One op, one direction (Timer.kernel): ms, GB/s of the minimum bytes, their share of the copy bandwidth; sora's
    forward's rel_err against the fp32 eager op. fwd+bwd: fresh gradients by torch.autograd.grad (nothing adds up).
    The op is sora's call, or the eager path: plain, compiled, with apex's FusedLayerNorm, Liger's LayerNorm (weight 1,
    bias 0: Liger has no affine-free mode) or flash-attn."""
    s, device, dtype = case.spec, timer.device, DTYPES[case.fields["dtype"]]
    backward = case.fields["direction"] == "fwd+bwd"
    nbytes = kernel_bytes(case.bench, case.fields["direction"], s.B, s.N, s.C, dtype.itemsize)
    inputs_of, sora, eager, out_shapes = kernel_op(case.bench, s)
    found = importable(*EXTERNAL[case.provider]) if case.provider in EXTERNAL else None
    norm = (found(s.C, eps=EPS, elementwise_affine=False).to(device) if case.provider == "apex" else
            found(s.C, eps=EPS).to(device, dtype).requires_grad_(False) if case.provider == "liger" else None)
    forward = sora if case.provider == "sora" else eager(norm, found if case.provider == "flash-attn" else None)
    forward = torch.compile(forward, dynamic=False) if case.provider == "torch.compile" else forward

    def randn(*shape, scale=1.0):
        tensor = torch.randn(shape, device=device, dtype=dtype)
        return (tensor.mul_(scale) if scale != 1.0 else tensor).requires_grad_(backward)  # in place: no copy

    def make_inputs():
        douts = [torch.randn(shape, device=device, dtype=dtype) for shape in out_shapes] if backward else None
        return inputs_of(randn), douts

    def step(inputs_dout):
        inputs, douts = inputs_dout
        out = forward(**inputs)
        return torch.autograd.grad(out, list(inputs.values()), douts) if backward else out

    run, row = Rotation(make_inputs, step, nbytes, device), {}
    if case.provider == "sora":  # ||out - ref|| / ||ref|| of the forward (all its outputs) against the fp32 eager op
        with torch.no_grad():
            probe = {name: tensor.detach() for name, tensor in run.sets[0][0].items()}
            out, ref = flat(forward(**probe)), flat(eager(None, None)(**{k: t.float() for k, t in probe.items()}))
            row["rel_err"] = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            del out, ref
    return {**row, **bandwidth(nbytes, timer.kernel(run), timer)}


# ---- communication ----------------------------------------------------------------------------------------------
def swap_view(case, batch: int):
    """(the tensor one rank exchanges, (A, B) of the swap (A, B, M) -> (B, A, M) that sora.kernels.comm._exchange
    makes for its pack or unpack), as Attention.forward calls K.all_to_all: "qkv" (B*S, T/sp, 3, H, D) scatters
    heads and gathers frames, "out" (B*S, T, H/sp, D) goes back."""
    s, sp, D = case.spec, case.fields["sp"], case.spec.C // case.spec.heads
    if case.fields["exchange"] == "qkv":
        shape, scatter_dim, gather_dim = (batch * s.S, s.T // sp, 3, s.heads, D), 3, 1
    else:
        shape, scatter_dim, gather_dim = (batch * s.S, s.T, s.heads // sp, D), 1, 2
    if case.fields["direction"] == "pack":  # x viewed (P, W, M) -> send buffer (W, P, M)
        return shape, (math.prod(shape[:scatter_dim]), sp)
    chunk = list(shape)
    chunk[scatter_dim] //= sp
    return shape, (sp, math.prod(chunk[:gather_dim]))  # receive buffer (W, P', M') -> (P', W, M')


def measure_pack(case, batch, timer: Timer) -> dict:
    """The pack or unpack around all_to_all_single: sora (the Triton swap_leading, as _exchange calls it) or
    torch (its reference, view + transpose + contiguous); read and written once. `exact`: sora == torch bit for bit."""
    device, dtype = timer.device, DTYPES[case.fields["dtype"]]
    tensor_shape, (A, B) = swap_view(case, batch)
    numel = math.prod(tensor_shape)
    swap = swap_leading if case.provider == "sora" else swap_leading_reference
    run = Rotation(lambda: torch.randn(numel, device=device, dtype=dtype), lambda x: swap(x, A, B),
                   numel * dtype.itemsize, device)
    row = {"tensor": list(tensor_shape), "shape": [A, B, numel // (A * B)]}
    if case.provider == "sora":
        row["exact"] = torch.equal(swap(run.sets[0], A, B), swap_leading_reference(run.sets[0], A, B))
    return {**row, **bandwidth(2 * numel * dtype.itemsize, timer.kernel(run), timer)}  # read once, written once


def compute_volume(case, batch, timer: Timer) -> dict:
    """all_to_all_volume and the time at the assumed link bandwidth: arithmetic, not timed (computed, no ms)."""
    s, fields = case.spec, case.fields
    volume = timer.once(lambda: all_to_all_volume(s.S, s.T, s.C, fields["sp"], elem=2, depth=fields["depth"]))
    per_ms = fields["link_gbps_assumed"] * 1e6
    return dict(volume, step_comm_ms=volume["step_bytes"] / per_ms, step_comm_ms_gc=volume["step_bytes_gc"] / per_ms,
                computed=True, ms=None)


# ---- models -----------------------------------------------------------------------------------------------------
def build_dit(model_type, latent, provider, device, dtype, grad_checkpoint=False, **kwargs):
    """A diffusion transformer for latents (T, H, W) with random weights in dtype (tiny on a CPU)."""
    cfg = dict(type=model_type, input_size=latent, enable_flashattn=True,
               enable_layernorm_kernel=provider.startswith("sora"), grad_checkpoint=grad_checkpoint, **kwargs)
    if device.type != "cuda":
        cfg.update(type=model_type.split("-")[0], patch_size=(1, 2, 2), **TINY)
    with device:  # parameters created (and initialised) on the device: much faster than on the host
        model = importable("sora.models", "build_model")(cfg).to(device=device, dtype=dtype)
    randomize(model)
    return model


def model_forward(model, provider, dtype):
    """The model's forward for a provider: the model, compiled (per block by default: two graphs) or Open-Sora's."""
    if provider == "open-sora":
        return open_sora_v11(model, dtype)
    if provider.endswith("compile") and compile_mode() == "model":
        return torch.compile(model, dynamic=False)
    for block in model.blocks if provider.endswith("compile") else ():
        block.compile(dynamic=False)
    return model


def captions(model, batch, device, dtype, generator):
    """What T5 hands the model for `batch` prompts: y (B, 1, L, C) and an int64 mask of 20-100 real tokens of 120."""
    L, C = model.y_embedder.y_embedding.shape
    y = torch.randn(batch, 1, L, C, device=device, dtype=dtype, generator=generator)
    lengths = torch.randint(max(1, L // 6), max(2, (5 * L) // 6), (batch,), device=device, generator=generator)
    return y, (torch.arange(L, device=device)[None] < lengths[:, None]).long()


def stdit2_branch(provider, x, T, heads, randn):
    """STDiT2's temporal branch with x_mask (frame 0 of each sample a condition frame): sora's STDiT2Block with the
    kernels, or Open-Sora v1.1's (tests/stdit2_reference.py), eager or compiled."""
    from sora.models.stdit2 import RotaryEmbedding, STDiT2Block

    B, N, C = x.shape
    block = STDiT2Block(C, heads, qk_norm=True, enable_flashattn=True, enable_layernorm_kernel=True).to(x)
    randomize(block)
    freqs = RotaryEmbedding(C // heads).freqs.to(x)
    t_tmp, t0_tmp = randn(B, 3 * C), randn(B, 3 * C)
    x_mask = torch.arange(T, device=x.device).expand(B, T) > 0
    params = [t_tmp, t0_tmp, block.scale_shift_table_temporal, *block.attn_temp.parameters()]
    if provider == "sora":
        return lambda: block.temporal(x, T, t_tmp, t0_tmp, x_mask, rope_freqs=freqs), params
    temporal_branch = importable("tests.stdit2_reference", "temporal_branch")
    weights = {**{f"block.{name}": p for name, p in block.named_parameters()}, "rope.freqs": freqs}
    config = dict(num_heads=heads, qk_norm=True, qk_norm_legacy=True)
    branch = lambda: temporal_branch(weights, "block", x, t_tmp, x_mask, t0_tmp, T, N // T, config, True)  # noqa: E731
    return torch.compile(branch, dynamic=False) if provider.endswith("compile") else branch, params


def measure_temporal_branch(case, batch, timer: Timer) -> dict:
    """A temporal branch fwd+bwd at XL width (C=1152, 16 heads; TINY's on a CPU), timed once (bench/NOTES.md)."""
    device, (T, H, W) = timer.device, case.spec.latent
    dtype, hidden, heads = ((torch.bfloat16, 1152, 16) if device.type == "cuda"
                            else (torch.float32, TINY["hidden_size"], TINY["num_heads"]))
    S = -(-H // 2) * -(-W // 2)  # STDiT2 pads to the 2x2 patch
    randn = lambda *shape: (0.1 * torch.randn(shape, device=device, dtype=dtype)).requires_grad_()  # noqa: E731
    x = torch.randn(batch, T * S, hidden, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn_like(x)
    if case.fields["model"].startswith("STDiT2"):
        branch, params = stdit2_branch(case.provider, x, T, heads, randn)
    else:  # STDiT's: sora frame-major throughout, eager with rearrange + contiguous and back
        attention = importable("sora.models.layers", "Attention")(hidden, heads, qkv_bias=True, enable_flashattn=True)
        randomize(attention.to(x))
        gate = randn(batch, 1, hidden)
        params = [gate, *attention.parameters()]
        branch = ((lambda: K.gated_residual(x, attention(x, temporal=T), gate)) if case.provider == "sora" else
                  lambda: x + gate * rearrange(attention(temporal(T, x)), "(B S) T C -> B (T S) C", B=batch))
    ms = timer.kernel(lambda: torch.autograd.grad(branch(), [x, *params], dout))
    return dict(ms=ms, samples_per_s=batch / (ms * 1e-3), tokens_per_s=batch * T * S / (ms * 1e-3))


def open_sora_v11(model, dtype):
    """Open-Sora v1.1's STDiT2 forward (tests/stdit2_reference.py, flash attention where theirs has it) on the model's
    weights cast to dtype, without autocast: their bf16 training holds bf16 weights."""
    stdit2_forward = importable("tests.stdit2_reference", "stdit2_forward")
    config = dict(hidden_size=model.hidden_size, num_heads=model.num_heads, patch_size=model.patch_size,
                  input_sq_size=model.input_sq_size, qk_norm=True, qk_norm_legacy=True)

    def forward(x, timestep, y, mask=None, x_mask=None, **sizes):
        with torch.autocast(x.device.type, enabled=False):
            weights = {name: t.to(dtype) for name, t in itertools.chain(model.named_parameters(),
                                                                        model.named_buffers())}
            return stdit2_forward(weights, config, x, timestep, y, mask, x_mask, **sizes, fp32_casts=True, flash=True)
    return forward


def size_inputs(model, video, batch, device, ar) -> dict:
    """STDiT2's size inputs for `batch` videos (others take none): pixels, latent frames, fps 24 and ar."""
    if not importable("sora.train", "takes")(model, "height"):
        return {}
    values = dict(height=video.height, width=video.width, num_frames=video.latent[0], fps=24, ar=ar)
    return {name: torch.full((batch,), float(value), device=device) for name, value in values.items()}


@functools.cache  # T5-XXL (9.5 GB), built once, kept for the cases that encode text (run_case drops it for the others)
def text_encoder(device):
    T5Encoder, TINY_T5_CONFIG = importable("sora.models.text_encoder", "T5Encoder", "TINY_T5_CONFIG")
    cuda = device.type == "cuda"
    with device:  # 4.76B parameters initialised on the GPU, not the host
        return T5Encoder(config=T5_XXL_CONFIG if cuda else TINY_T5_CONFIG, device=device,
                         model_max_length=120 if cuda else TINY["model_max_length"],
                         dtype=torch.bfloat16 if cuda else torch.float32)


def build_vae(device, dtype, micro_batch_size):
    """Stable Diffusion's VAE per frame (TINY_VAE_CONFIG on a CPU), diffusers' initial weights (timed, not read)."""
    VideoAutoencoderKL, TINY_VAE_CONFIG = importable("sora.models.vae", "VideoAutoencoderKL", "TINY_VAE_CONFIG")
    with device:
        vae = VideoAutoencoderKL(config=SD_VAE_CONFIG if device.type == "cuda" else TINY_VAE_CONFIG,
                                 micro_batch_size=micro_batch_size)
    return vae.to(device, dtype).eval()


WORDS = "a red panda walks slowly through falling snow in a quiet bamboo forest at dawn under soft golden light"
WORDS = WORDS.split()


def prompts(n: int) -> list[str]:
    """n prompts of 10 to 73 words: ByT5 has one token per byte, so most fill the 120 tokens and some are cut."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(10 + 9 * (i % 8))) for i in range(n)]


def train_step_fn(case, batch, device):
    """(sora.train.train_step for the case at batch, ready to call; the model), on raw videos and prompts (encoders)
    or on what sora.preprocess stores (latents' mean and std, captions), STDiT2's sizes and masks too."""
    build_optimizer, train_step = importable("sora.train", "build_optimizer", "train_step")
    MaskGenerator, load_config = importable("sora.masks", "MaskGenerator"), importable("sora.config", "load_config")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model_type, video = case.spec
    encoders = {}
    if case.fields["encoders"] == "T5+VAE":
        encoders = dict(vae=build_vae(device, dtype, TRAIN_VAE_MICRO_BATCH), text_encoder=text_encoder(device))
    model = build_dit(model_type, video.latent, case.provider, device, torch.float32,
                      grad_checkpoint=video.grad_checkpoint, **LABEL_MODELS.get(model_type, {})).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    forward = model_forward(model, case.provider, dtype)  # the EMA is copied before: never compiled
    optimizer = build_optimizer(model, LR)
    generator = torch.Generator(device=device).manual_seed(1)
    if encoders:
        raw = torch.rand(batch, 3, video.frames, video.height, video.width, device=device, generator=generator)
        inputs = {"video": (raw * 2 - 1).to(dtype), "text": prompts(batch)}
    else:
        mean = torch.randn(batch, model.in_channels, *video.latent, device=device, generator=generator)
        inputs = {"mean": (mean / SD_SCALING_FACTOR).to(dtype), "std": torch.full_like(mean, 0.1, dtype=dtype)}
        if model_type in LABEL_MODELS:
            inputs["y"] = torch.randint(0, model.num_classes, (batch,), device=device, generator=generator)
        else:
            inputs["y"], inputs["mask"] = captions(model, batch, device, dtype, generator)
    inputs.update(size_inputs(model, video, batch, device, ar=video.width / video.height))  # as their dataset
    masks = MaskGenerator(load_config(STAGE1).mask_ratios) if "height" in inputs else None  # STDiT2: x_mask
    diffusion, seeds = IDDPM(), itertools.count()  # Open-Sora's training scheduler: 1000 steps, hybrid loss

    def step():
        train_step(model, ema, optimizer, diffusion, inputs, torch.Generator().manual_seed(next(seeds)),
                   latent_scale=SD_SCALING_FACTOR, dtype=dtype, autocast_dtype=torch.bfloat16 if cuda else None,
                   grad_clip=GRAD_CLIP, ema_decay=EMA_DECAY, forward=forward, mask_generator=masks, **encoders)

    return step, model


def measure_train(case, batch, timer: Timer) -> dict:
    """One training step (train_step_fn): time, samples/s, tokens/s, peak memory."""
    step, model = train_step_fn(case, batch, timer.device)
    timing = timer.steps(step)
    samples_per_s = batch / (timing["ms"] * 1e-3)
    tokens = math.prod(model.token_grid(case.spec[1].latent))
    return dict(timing, samples_per_s=samples_per_s, compile_mode=compile_mode(case.provider),
                tokens_per_s=samples_per_s * tokens)


def measure_sampling_step(case, batch, timer: Timer) -> dict:
    """IDDPM.sample with guidance (sora+cache: the residual cache): ms per step and per call, full model calls."""
    device, dtype, steps = timer.device, DTYPES[case.fields["dtype"]], case.fields["steps_per_call"]
    model_type, video = case.spec
    model = build_dit(model_type, video.latent, case.provider, device, dtype).eval()
    forward = model_forward(model, case.provider, dtype)
    y, mask = captions(model, batch, device, dtype, torch.Generator(device=device).manual_seed(1))
    sizes = size_inputs(model, video, batch, device, ar=video.height / video.width)  # as their sampling scripts
    scheduler = IDDPM(num_sampling_steps=steps, **CFG)
    cache = check_cache(dict(type="residual")) if case.provider.endswith("+cache") else None  # the defaults
    # As sora/sample.py: one host generator per prompt, for the initial noise and every step's.
    generators = [torch.Generator().manual_seed(i) for i in range(batch)]
    z = torch.stack([torch.randn(model.in_channels, *video.latent, generator=g) for g in generators]).to(device, dtype)
    timing = timer.steps(lambda: scheduler.sample(forward, z, y, model.y_embedder.null(batch), mask, progress=False,
                                                  generator=generators, model_kwargs=sizes, cache=cache), warmup=1)
    per_step = {key: timing[key] / steps if timing[key] is not None else None for key in ("ms", "wall_ms")}
    settings = ", ".join(f"{key} {value}" for key, value in (cache or {}).items()) or "none"
    return dict(timing, **per_step, ms_call=timing["ms"], compile_mode=compile_mode(case.provider),
                model_calls=scheduler.model_calls[0], cache=settings)


def measure_t5(case, batch, timer: Timer) -> dict:
    encoder = text_encoder(timer.device)
    texts = prompts(batch)
    timing = timer.steps(lambda: encoder.encode(texts))
    prompts_per_s = batch / (timing["ms"] * 1e-3)
    return dict(timing, prompts_per_s=prompts_per_s, tokens_per_s=prompts_per_s * int(case.fields["shape"].split()[0]),
                params=sum(p.numel() for p in encoder.model.parameters()))


def measure_vae_decode(case, frames, timer: Timer) -> dict:
    device, dtype = timer.device, DTYPES[case.fields["dtype"]]
    vae = build_vae(device, dtype, case.fields["micro_batch_size"])
    side = case.spec // vae.patch_size[1]
    z = torch.randn(1, vae.out_channels, frames, side, side, device=device, dtype=dtype)
    timing = timer.steps(torch.no_grad()(lambda: vae.decode(z)))
    return dict(timing, frames_per_s=frames / (timing["ms"] * 1e-3))


def measure_sample_e2e(case, batch, timer: Timer) -> dict:
    """One video from a prompt by sora.sample.sample_videos (T5, IDDPM steps with CFG, VAE, to host): s per video."""
    sample_videos = importable("sora.sample", "sample_videos")
    device, dtype, video = timer.device, DTYPES[case.fields["dtype"]], case.spec
    encoder, vae = text_encoder(device), build_vae(device, dtype, case.fields["vae_micro_batch_size"])
    model = build_dit("STDiT-XL/2", video.latent, case.provider, device, dtype).eval()
    model = torch.compile(model) if case.provider.endswith("compile") else model  # as sora.sample's --compile true
    scheduler = IDDPM(num_sampling_steps=case.fields["steps"], **CFG)
    texts = prompts(batch)
    timing = timer.steps(lambda: sample_videos(model, vae, encoder, scheduler, texts, video.latent, 0, device, dtype),
                         warmup=1)
    return dict(timing, s_per_video=timing["ms"] / 1e3, compile_mode=compile_mode(case.provider, "model"))


def measure_optimizer_step(case, batch, timer: Timer) -> dict:
    """sora.train.optimizer_step over STDiT-XL/2's fp32 parameters, gradients and EMA: ms, GB/s, share of copy."""
    build_optimizer, optimizer_step = importable("sora.train", "build_optimizer", "optimizer_step")
    device = timer.device
    model = build_dit("STDiT-XL/2", case.spec.latent, "sora", device, torch.float32).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = build_optimizer(model, LR)
    generator = torch.Generator(device=device).manual_seed(0)
    for parameter in model.parameters():
        parameter.grad = torch.randn(parameter.shape, device=device, generator=generator)
    timing = timer.steps(lambda: optimizer_step(model, ema, optimizer, GRAD_CLIP, EMA_DECAY))
    params = sum(p.numel() for p in model.parameters())
    numbers = bandwidth(OPTIMIZER_BYTES_PER_PARAM * params, timing["ms"], timer)
    return dict(timing, **numbers, params=params, bytes_per_param=OPTIMIZER_BYTES_PER_PARAM)


def measure_diffusers_block(case, batch, timer: Timer) -> dict:
    """One diffusers block (cases.BLOCKS) in one direction, timed once: ms, and the bytes of its elementwise passes
    (2 layernorm_modulate + 2 gated_residual) over that time, as GB/s and a share of the copy bandwidth."""
    model_name, latent, text_tokens, config = case.spec
    device, dtype, wan = timer.device, DTYPES[case.fields["dtype"]], model_name.startswith("Wan")
    diffusers_model = importable("diffusers", "WanTransformer3DModel" if wan else "PixArtTransformer2DModel")
    with device:
        model = diffusers_model(num_layers=1, **config).to(dtype)
    randomize(model)
    if case.provider == "sora" and K.patch(model) != 2:  # the block and the model's final norm + modulation
        raise RuntimeError(f"sora.kernels.patch left {model_name}'s block unpatched")
    block, direction = model.blocks[0] if wan else model.transformer_blocks[0], case.fields["direction"]
    C, N = model.config.num_attention_heads * model.config.attention_head_dim, math.prod(latent[1:]) // 4  # 2x2 patch
    randn = lambda *shape: torch.randn(shape, device=device, dtype=dtype)  # noqa: E731
    x, text = randn(batch, N, C).requires_grad_(direction == "fwd+bwd"), randn(batch, text_tokens, C)
    extra = (dict(temb=randn(batch, 6, C), rotary_emb=model.rope(randn(batch, *latent))) if wan
             else dict(timestep=randn(batch, 6 * C)))  # Wan: 6 modulation rows and RoPE; PixArt: adaLN-single's 6C
    forward = torch.compile(block, dynamic=False) if case.provider == "torch.compile" else block
    step = lambda: forward(hidden_states=x, encoder_hidden_states=text, **extra)  # noqa: E731
    wrt, dout = [x, *block.parameters()], randn(batch, N, C) if direction == "fwd+bwd" else None
    backward = lambda: torch.autograd.grad(step(), wrt, dout)  # noqa: E731
    ms = timer.kernel(backward if direction == "fwd+bwd" else torch.no_grad()(step))
    ops = ("layernorm_modulate", "gated_residual")
    return bandwidth(2 * sum(kernel_bytes(op, direction, batch, N, C, dtype.itemsize) for op in ops), ms, timer)


MEASURES = {
    **{bench: measure_kernel for bench in KERNEL_PROVIDERS},
    "all_to_all_pack": measure_pack,
    "all_to_all_volume": compute_volume,
    "temporal_branch": measure_temporal_branch,
    **{bench: measure_train for bench in ("train_step_full", "dit_image_train", "latte_train")},
    **dict.fromkeys(("sampling_step", "sampling_cache"), measure_sampling_step), "t5_encode": measure_t5,
    "vae_decode": measure_vae_decode, "sample_e2e": measure_sample_e2e, "optimizer_step": measure_optimizer_step,
    "diffusers_block": measure_diffusers_block,
}


def run_case(case, timer: Timer, add) -> dict:
    """Measure a case at the first of case.batches that fits, handing each row to add(row) as it is done; returns
    the last row. Out of memory is a skipped row ("OOM at batch 8") and the next batch is tried; a provider that
    cannot run here is a skipped row with the reason; any other error is a row "error: ...", and raised."""
    encodes = case.bench in ("t5_encode", "sample_e2e") or case.fields.get("encoders") == "T5+VAE"
    if not encodes and text_encoder.cache_info().currsize:  # the resident T5 goes before a case that encodes no text
        text_encoder.cache_clear()
        free_memory()
    for batch in case.batches:
        row, oom = case.row(batch), False
        try:
            if timer.device.type != "cuda" and ("compile" in case.provider or case.provider in EXTERNAL):
                raise Unavailable(f"CPU smoke set: {case.provider} is measured on GPUs only")
            row.update(MEASURES[case.bench](case, batch, timer))
        except Unavailable as reason:
            row.update(ms=None, skipped=str(reason))
        except Exception as error:
            if not (isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()):
                message = (str(error).strip().splitlines() or [""])[0]
                row.update(ms=None, skipped=f"error: {type(error).__name__}: {message}"[:300])
                add(row)
                raise
            oom = True
            row.update(ms=None, skipped="OOM" if batch is None else f"OOM at batch {batch}")
        # Outside the except blocks: the traceback (and the tensors its frames hold) is gone by now.
        free_memory()
        row.setdefault("skipped", None)
        add(row)
        if not oom:
            break
    return row
