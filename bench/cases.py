"""What the bench measures, as data: one table of cases, read by `pytest bench/ --benchmark`, by bench/gpu_check.py
(by priority, None: the pytest suite only; bench/NOTES.md says what each priority holds and how to add an op or a
bench) and by bench/report.py. Needs neither torch nor a GPU."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shape:
    """x = (B, T*S, C): B samples of a `video` (frames x resolution) latent at STDiT-XL/2's patching; attention
    and the sequence-parallel exchanges split C in `heads` heads (B: samples per rank there)."""

    video: str
    B: int
    T: int
    S: int
    C: int
    heads: int = 16

    @property
    def N(self) -> int:
        return self.T * self.S


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


@dataclass(frozen=True)
class Bench:
    """A report table: its suite, title, note, target (read off the tables, never asserted) and columns, each
    "field:header:form" (header defaults to the field, form to "text": what the row is; field "-": computed by the
    report); bench/report.py's FORMS writes a form. With per_provider (the fields of a setting) a line is a setting,
    its column "provider" a cell per provider, the columns before it read its first row, those after sora's."""

    suite: str
    title: str
    note: str = ""
    target: str = ""
    columns: tuple = ()
    per_provider: tuple = ()

    def table_columns(self) -> list[tuple]:
        """(header, field or None, form) per column."""
        specs = [(spec.split(":") + ["", ""])[:3] for spec in self.columns]
        return [(header or field, None if field == "-" else field, form or "text") for field, header, form in specs]


@dataclass(frozen=True)
class Case:
    bench: str
    provider: str
    spec: object  # what bench/measure.py builds the case from: a Shape, a Video, (model, Video), a resolution
    fields: dict = field(default_factory=dict)  # the row's other fields
    batches: tuple = (None,)
    priority: int | None = None

    @property
    def suite(self) -> str:
        return BENCHES[self.bench].suite

    def row(self, batch=None) -> dict:
        batch_size = {} if batch is None else {"batch_size": batch}
        return {"suite": self.suite, "bench": self.bench, "provider": self.provider, **self.fields, **batch_size}

    def __str__(self):
        return row_id(self.row())


ID_FIELDS = ("model", "direction", "exchange", "video", "shape", "encoders", "dtype", "sp", "micro_batch_size")


def row_id(row: dict) -> str:
    """The name of a case and of its rows: its pytest id (bench, the ID_FIELDS it has, provider)."""
    values = ["x".join(map(str, v)) if isinstance(v, list) else str(v).split(" ")[0]
              for k, v in row.items() if k in ID_FIELDS]
    return "-".join((row["bench"], *values, row["provider"]))

# ---- sizes --------------------------------------------------------------------------------------------------
# STDiT-XL/2 (C=1152) at Open-Sora's three sizes, batches giving 1M rows (> 2 GB per bf16 tensor, 40x L2); the
# C=4096 case keeps 512K rows (its eager fwd+bwd holds ~9 tensors of 4.3 GB). bench/NOTES.md has the reasoning.
KERNEL_SHAPES = {True: [(Shape("16x256", 256, 16, 256, 1152), ("bf16", "fp32")),
                        (Shape("16x512", 64, 16, 1024, 1152), ("bf16", "fp32")),
                        (Shape("64x512", 16, 64, 1024, 1152), ("bf16", "fp32")),
                        (Shape("64x512", 8, 64, 1024, 4096), ("bf16",))],
                 False: [(Shape("tiny", 2, 4, 8, 64), ("fp32",))]}
# temporal_attention: batches keeping qkv (B, T*S, 3C) near 1.8 GB (36x an H100's L2).
ATTENTION_SHAPES = {True: [(Shape("16x256", 64, 16, 256, 1152), ("bf16",)),
                           (Shape("16x512", 16, 16, 1024, 1152), ("bf16",)),
                           (Shape("64x512", 4, 64, 1024, 1152), ("bf16",))],
                    False: [(Shape("tiny", 2, 4, 8, 64, heads=4), ("fp32",))]}
# qk_norm: STDiT2-XL/2's spatial attention at 16x240x426 (16 frames of 15x27 tokens), qkv (B*T, S, 3C) of 1.8 GB.
QK_NORM_SHAPES = {True: [(Shape("16x240x426", 40, 16, 405, 1152), ("bf16",))],
                  False: [(Shape("tiny", 1, 2, 8, 64, heads=2), ("fp32",))]}
HEADS_SHAPES = {"temporal_attention": ATTENTION_SHAPES, "qk_norm": QK_NORM_SHAPES}  # ops that split C in heads
PLAIN_PROVIDERS = ("sora", "torch", "torch.compile")
LN_PROVIDERS = (*PLAIN_PROVIDERS, "apex", "liger")
KERNEL_PROVIDERS = {**dict.fromkeys(("layernorm_modulate", "layernorm_modulate_temporal"), LN_PROVIDERS),
                    **dict.fromkeys(("gated_residual", "gated_residual_temporal", "to_temporal"), PLAIN_PROVIDERS),
                    "temporal_attention": ("sora", "torch", "flash-attn", "torch.compile"), "qk_norm": PLAIN_PROVIDERS}

VIDEOS = {True: [Video("16x256x256", 16, 256, 256, (8, 4)), Video("16x512x512", 16, 512, 512, (2, 1)),
                 Video("64x512x512", 64, 512, 512, (1,), grad_checkpoint=True)],
          False: [Video("4x64x64", 4, 64, 64, (2,))]}
IMAGES = {True: Video("1x256x256", 1, 256, 256, (128, 64)), False: Video("1x64x64", 1, 64, 64, (4,))}
CPU_GC_VIDEO = Video("4x64x64-gc", 4, 64, 64, (2,), grad_checkpoint=True)  # the 64x512 rows' path, on a CPU
# STDiT2-XL/2 at Open-Sora v1.1's 240p: latent 16x30x53, padded to 15x27 tokens a frame (odd widths on a CPU too).
STDIT2_VIDEO = {True: Video("16x240x426", 16, 240, 426, (4, 2)), False: Video("2x16x40", 2, 16, 40, (2,))}

SP_SIZES = {True: (2, 4, 8), False: (2, 4)}
# Per rank the batch is sp x the single-GPU training batch (Shape.B): each rank holds T/sp frames. Volume rows are
# arithmetic: the real sizes everywhere, 360x512 (Open-Sora's sp=2 row) too.
SEQ_SHAPES = {True: [Shape("16x512", 2, 16, 1024, 1152), Shape("64x512", 1, 64, 1024, 1152)],
              False: [Shape("tiny", 1, 4, 8, 64, heads=4)]}
VOLUME_SHAPES = SEQ_SHAPES[True] + [Shape("360x512", 1, 360, 1024, 1152)]
DEPTH = 28  # STDiT-XL/2's blocks: one temporal attention each
LINK_GBPS_ASSUMED = 450.0  # H100 NVLink 4: 900 GB/s bidirectional per GPU, a datasheet lead (bench/NOTES.md)

# Open-Sora v1's inference settings: 2 prompts (classifier-free guidance doubles them), fp16, 100 IDDPM steps, VAE
# micro-batches of 128 frames; sampling_step times 5 IDDPM steps per call (2 on a CPU).
SAMPLE_PROMPTS, SAMPLING_STEPS, STEPS_PER_CALL, SAMPLE_VAE_MICRO_BATCH = 2, 100, 5, 128
CFG = dict(cfg_scale=7.0, cfg_channel=3)
OPTIMIZER_BYTES_PER_PARAM = 52  # sora.train.optimizer_step's docstring: clipping 12, AdamW 28, EMA 12 (fp32)
OPTIMIZER_TARGET = 0.7
# One block of a one-block diffusers model (its defaults and config): Wan2.1-1.3B at 81x480x832 (21x30x52 tokens),
# PixArt-sigma at 1024px (64x64 tokens; batch 8: past L2): (model, shape, latent (C, T, H, W), text, batch, config)
BLOCKS = {True: [("Wan2.1-1.3B", "81x480x832", (16, 21, 60, 104), 512, 1,
                  dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960)),
                 ("PixArt-sigma", "1024px", (4, 1, 128, 128), 300, 8, dict(sample_size=128))],
          False: [("Wan2.1 (tiny)", "2x32x32", (16, 2, 4, 4), 5, 2,
                   dict(num_attention_heads=2, attention_head_dim=24, ffn_dim=64)),
                  ("PixArt (tiny)", "64px", (4, 1, 8, 8), 5, 2,
                   dict(num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32))]}


# ---- minimum bytes (bench/NOTES.md has the formulas) ------------------------------------------------------------
def kernel_bytes(bench: str, direction: str, B: int, N: int, C: int, elem: int) -> int:
    """The fewest bytes an op must move: each input read once, each output written once (a layout costs none)."""
    tokens = B * N * C * elem  # one (B, N, C) tensor
    rows = B * C * elem  # one per-sample (B, 1, C) vector: shift, scale, gate or their gradients
    formulas = {  # bench: (forward, what backward adds)
        "layernorm_modulate": (2 * tokens + 2 * rows, 3 * tokens + 3 * rows),  # x, shift, scale -> y; dy, x, scale
        "gated_residual": (3 * tokens + rows, 3 * tokens + 2 * rows),  # x, y, gate -> out; dout, y, gate -> dy, dgate
        "to_temporal": (2 * tokens, 2 * tokens),  # x -> the permuted copy; dout -> dx
        "temporal_attention": (4 * tokens, 7 * tokens),  # qkv (3 tokens) -> out; qkv, dout -> d(qkv)
        "qk_norm": (4 * tokens, 8 * tokens),  # q, k -> q', k' (v: a view); q, k, dq', dk', dv -> d(qkv)
    }
    name = bench.removesuffix("_temporal") if bench != "to_temporal" else bench
    if name not in formulas:
        raise ValueError(f"no byte formula for bench {bench!r}")
    fwd, bwd = formulas[name]
    return fwd if direction == "fwd" else fwd + bwd


def all_to_all_volume(S: int, T: int, C: int, sp: int, elem: int, depth: int) -> dict:
    """Bytes one rank sends to the others in STDiT's sequence-parallel temporal attention, per sample: each
    rank holds n = S*T/sp tokens; per layer forward qkv (n, 3C) and the output (n, C) are exchanged, of which
    (sp-1)/sp leaves the rank; backward sends the same again, gradient checkpointing the forward's once more."""
    tokens, share = S * T // sp, (sp - 1) / sp
    qkv, out = round(3 * tokens * C * elem * share), round(tokens * C * elem * share)
    layer_fwd = qkv + out
    return {"tokens_per_rank": tokens, "qkv_send_bytes": qkv, "out_send_bytes": out, "layer_fwd_bytes": layer_fwd,
            "layer_bwd_bytes": layer_fwd, "step_bytes": depth * 2 * layer_fwd, "step_bytes_gc": depth * 3 * layer_fwd}


# ---- the benches: titles, notes, targets and columns of the report's tables -------------------------------------
PEAK, SPEEDUP = "peak_mem_gb:peak GB:fmt", "-:speedup:speedup"
TRAIN = ("model", "shape::gc", "encoders", "provider", "batch_size:batch", "ms:ms / step:f1",
         "samples_per_s:samples/s:fmt", "tokens_per_s:tokens/s:fmt", PEAK, SPEEDUP)
THEIRS = ("-:ours / theirs:vs_open_sora", "-:Open-Sora:open_sora")
SAMPLING = ("model", "shape", "provider", "batch_size:prompts", "model_batch:model batch", "dtype", "ms:ms / step:f1",
            "steps_per_call:steps per timed call:int", SPEEDUP)
OPEN_SORA_V11 = ("open-sora: Open-Sora v1.1's STDiT2 forward op for op (tests/stdit2_reference.py, flash attention "
                 "where theirs has it) on the same weights in the compute dtype, no autocast; eager: sora's STDiT2, "
                 "kernels off.")
STEP_NOTE = (
    "One step = `sora.train.train_step` (`python -m sora.train`'s): IDDPM loss under bf16 autocast with fp32 master "
    "weights (fp32 on a CPU), backward, clipping, **the AdamW step (lr 2e-5, weight decay 0) and the fp32 EMA update "
    "are all INCLUDED**. Random weights. `encoders` T5+VAE: raw videos and prompts encoded on the fly; none: "
    "pre-encoded (class ids for DiT and Latte). sora: enable_layernorm_kernel=True; eager: False; flash attention in "
    "both. Open-Sora's figures: per GPU of 8x H800. STDiT2: their size inputs and stage-1 mask_ratios (x_mask on "
    "every step). " + OPEN_SORA_V11)
KERNEL = dict(per_provider=("shape", "dtype"), columns=(
    "shape:shape (B, N, C):dims", "video", "T", "dtype", "provider", "-:sora vs torch:vs_torch",
    "-:sora vs torch.compile:vs_torch.compile", "rel_err:sora rel. error:e1"))
KERNEL_TARGETS = {
    "layernorm_modulate": "fwd, bf16, C=1152, >= 1M rows: >= 85% of copy bandwidth, >= 2.5x eager, >= torch.compile; "
                          "fwd+bwd: >= 2x eager and >= torch.compile; the temporal variant within 10% of the plain "
                          "one and >= 2x eager.",
    "temporal_attention": "bf16, 16 heads of 72: fwd >= 70% of the copy bandwidth; fwd+bwd >= 3x the torch path.",
    "qk_norm": "fwd, bf16, 16 heads of 72: >= 85% of the copy bandwidth."}
BENCHES = {
    **{name: Bench("kernels", name, target=KERNEL_TARGETS.get(name, ""), **KERNEL) for name in KERNEL_PROVIDERS},
    "temporal_branch": Bench(
        "models", "Temporal branch, fwd+bwd",
        "STDiT: qkv, attention, proj, gated residual; eager adds the rearranges. STDiT2 with x_mask: norm, modulate, "
        "qkv, RoPE, qk-norm, attention, proj, gated residual; sora: its kernels on the per-frame rows; open-sora: "
        "Open-Sora v1.1's branch (tests/stdit2_reference.py), eager and compiled. bench/NOTES.md has the details.",
        "STDiT: sora >= 1.3x eager. STDiT2: sora >= 3x open-sora and >= 1.5x open-sora+compile.",
        ("model", "shape", "provider", "batch_size:batch", "ms::f2", "tokens_per_s:tokens/s:fmt", SPEEDUP)),
    "all_to_all_pack": Bench(
        "comm", "The permutes around `all_to_all_single` in STDiT-XL/2's temporal attention",
        "The pack and unpack of each rank's qkv (B*S, T/sp, 3, H, D) and output (B*S, T, H/sp, D) on one GPU, as the "
        "swap (A, B, M) -> (B, A, M); batch = sp x the training batch. GB/s: the tensor read and written once. sora: "
        "the Triton kernel; torch: view + transpose + contiguous; exact: bit for bit equal.",
        "sora >= 80% of copy bandwidth.", ("video", "sp", "exchange", "direction", "shape:view (A, B, M):dims",
                                           "batch_size:batch", "bytes:tensor MB:half_M", "provider",
                                           "-:sora vs torch:vs_torch", "exact::yes"),
        ("video", "sp", "exchange", "direction")),
    "all_to_all_volume": Bench(
        "comm", "All-to-all volume per rank: computed, not timed",
        f"Bytes one rank sends for a sample of bf16 STDiT-XL/2 split over sp ranks by frames, per layer and per step "
        f"({DEPTH} layers); ms at an **assumed** {LINK_GBPS_ASSUMED:.0f} GB/s per direction (a datasheet figure, not "
        "a measurement). Formulas: bench/NOTES.md.",
        columns=("video", "sp", "tokens_per_rank:tokens per rank:fmt", "qkv_send_bytes:qkv MB:M",
                 "out_send_bytes:output MB:M", "layer_fwd_bytes:per layer fwd MB (= bwd):M",
                 "step_bytes:per step GB (fwd+bwd):G", "step_bytes_gc:per step GB with GC:G",
                 "step_comm_ms:ms per step at the assumed rate:fmt", "step_comm_ms_gc:with GC:fmt")),
    "sampling_step": Bench(
        "pipeline", "Sampling step (IDDPM, classifier-free guidance)",
        "IDDPM steps timed through `IDDPM.sample` (model call on the doubled batch, guidance, posterior step) divided "
        "by the steps per call. Random weights in the row's dtype. sora / eager: the kernels on / off; +compile: per "
        "block. STDiT2: 100 steps per call, their size inputs. " + OPEN_SORA_V11,
        "STDiT: sora >= 1.2x eager; sora+compile >= eager+compile.", SAMPLING),
    "sampling_cache": Bench(
        "pipeline", "100-step sampling with the residual cache (sora/schedulers/cache.py)",
        "STDiT-XL/2 as in sampling_step, 100 steps per call; sora+cache: `cache=dict(type='residual')`, its defaults. "
        "**Random weights: time and the number of full model calls only**, nothing about the videos' quality.",
        columns=SAMPLING[:5] + ("cache", "model_calls:model calls:int", "ms_call:ms / call:f1", SPEEDUP)),
    "t5_encode": Bench("pipeline", "T5-v1.1-XXL encoder (random weights from its config)",
                       "`T5Encoder.encode`: tokenize (ByT5, file-less) + encoder forward, padded to the token count.",
                       "", ("model", "shape:tokens", "batch_size:batch", "dtype", "ms::f1",
                            "prompts_per_s:prompts/s:fmt", "tokens_per_s:tokens/s:fmt", PEAK)),
    "vae_decode": Bench("pipeline", "SD VAE decode per frame (random weights from sd-vae-ft-ema's config)",
                        "`VideoAutoencoderKL.decode`, `micro_batch_size` frames per AutoencoderKL call.", "",
                        ("shape:resolution", "micro_batch_size:micro-batch (frames)", "batch_size:frames per call",
                         "dtype", "ms::f1", "frames_per_s:frames/s:fmt", PEAK)),
    "sample_e2e": Bench(
        "pipeline", "End-to-end sampling of one video: T5 encode + IDDPM steps + VAE decode",
        "sora.sample.sample_videos, one prompt, video copied to the host; sora+compile: `--compile true`.",
        "sora faster than eager; 100 IDDPM steps at 16x256 under Open-Sora's published 5 s per sample (H800).",
        ("shape", "provider", "steps", "dtype", "s_per_video:s / video:f2", PEAK, SPEEDUP)),
    "train_step_full": Bench("train", "Open-Sora's acceleration table on one GPU: full training step", STEP_NOTE,
                             "STDiT-XL/2 16x256 with T5+VAE on the fly, sora: >= 1.3x Open-Sora's 7.00 samples/s/GPU "
                             "and >= 1.2x eager in the same run; sora+compile >= eager+compile. STDiT2-XL/2 "
                             "16x240x426: sora >= 1.5x open-sora.", TRAIN + THEIRS),
    "dit_image_train": Bench("train", "Open-Sora's image table on one GPU: DiT-XL/2 (class-conditioned) on 256x256 "
                                      "images", columns=TRAIN[:2] + TRAIN[3:6] + ("samples_per_s:img/s:fmt",)
                             + TRAIN[7:] + THEIRS),
    "latte_train": Bench("train", "Latte-XL/2 (class-conditioned), training step", columns=TRAIN[:2] + TRAIN[3:]),
    "diffusers_block": Bench(
        "models", "One diffusers transformer block (Wan2.1's WanTransformerBlock, PixArt's BasicTransformerBlock)",
        "The block of a one-block model, random weights, bf16; sora: after `sora.kernels.patch`. GB/s: the minimum "
        "bytes of the passes sora fuses (2 layernorm_modulate + 2 gated_residual) over the whole block's time.",
        columns=("model", "shape", "direction", "provider", "batch_size:batch", "ms::f2", "gbps:elementwise GB/s:fmt",
                 "frac_copy_bw:share of copy:pct", SPEEDUP)),
    "optimizer_step": Bench(
        "optimizer", "Optimizer step",
        "`sora.train.optimizer_step`: clipping, AdamW (fused on CUDA), the fp32 EMA, over fp32 master weights. GB/s: "
        "the bytes it must move (its docstring's bytes / param) over the time.",
        f"at least {OPTIMIZER_TARGET:.0%} of the copy bandwidth.",
        ("model", "optimizer", "dtype", "params:params (M):M", "bytes_per_param:bytes / param", "ms::f2",
         "gbps:GB/s:fmt", "frac_copy_bw:share of copy:pct", "-:target:target_met")),
}


# ---- the table --------------------------------------------------------------------------------------------------
def model_name(model: str, cuda: bool) -> str:
    """The type a row names: the XL preset on a GPU, its tiny stand-in on a CPU."""
    return model if cuda else model.split("-")[0] + " (tiny)"


def kernel_priority(bench: str, first: bool, provider: str, dtype: str, C: int) -> int | None:
    """sora and torch at the first shape and dtype (the targets) first (qk_norm with STDiT2's targets, 3), then
    torch.compile there; then the other bf16 shapes of C=1152, then fp32 and C=4096; apex, Liger, flash-attn: None."""
    if provider in ("sora", "torch"):
        return (3 if bench == "qk_norm" else 1) if first else 5 if dtype == "bf16" and C == 1152 else 6
    return 3 if provider == "torch.compile" and first else None


def kernel_cases(cuda: bool) -> list[Case]:
    return [Case(bench, provider, shape, {"direction": direction, "shape": [shape.B, shape.N, shape.C],
                                          "video": shape.video, "T": shape.T, "dtype": dtype,
                                          **({"heads": shape.heads} if bench in HEADS_SHAPES else {})},
                 priority=kernel_priority(bench, index == 0 and dtype == dtypes[0], provider, dtype, shape.C))
            for bench, providers in KERNEL_PROVIDERS.items()
            for index, (shape, dtypes) in enumerate(HEADS_SHAPES.get(bench, KERNEL_SHAPES)[cuda])
            for dtype in dtypes for direction in ("fwd", "fwd+bwd") for provider in providers]


def comm_cases(cuda: bool) -> list[Case]:
    dtype = "bf16" if cuda else "fp32"
    packs = [Case("all_to_all_pack", provider, shape,
                  {"direction": direction, "exchange": exchange, "video": shape.video, "sp": sp, "dtype": dtype},
                  batches=(shape.B * sp,))
             for shape in SEQ_SHAPES[cuda] for sp in SP_SIZES[cuda] for exchange in ("qkv", "out")
             for direction in ("pack", "unpack") for provider in ("sora", "torch")]
    volumes = [Case("all_to_all_volume", "computed", shape,
                    {"video": shape.video, "sp": sp, "shape": [shape.S, shape.T, shape.C], "dtype": "bf16",
                     "depth": DEPTH, "link_gbps_assumed": LINK_GBPS_ASSUMED}, batches=(1,))
               for shape in VOLUME_SHAPES for sp in SP_SIZES[True]]
    return packs + volumes


def train_case(bench, model, video, encoders, provider, cuda, priority=None, **extra) -> Case:
    fields = {"model": model_name(model, cuda), "shape": video.label, "encoders": "T5+VAE" if encoders else "none",
              "grad_checkpoint": video.grad_checkpoint, "optimizer_step": True,
              "dtype": "bf16 autocast, fp32 weights" if cuda else "fp32", **extra}
    return Case(bench, provider, (model, video), fields, video.batches, priority)


def model_cases(cuda: bool) -> list[Case]:
    videos = VIDEOS[cuda]
    sample_dtype = "fp16" if cuda else "fp32"
    compile_providers = ("sora", "sora+compile", "eager", "eager+compile")
    stdit2, open_sora = STDIT2_VIDEO[cuda], ("sora", "open-sora", "eager")  # eager: sora, kernels off

    def heavy(provider, priority):  # gpu_check --tiny leaves these out: interpreted, they run for minutes
        return None if provider.startswith("sora") and not cuda else priority

    branches = [("STDiT-XL/2", video, dict.fromkeys(("sora", "eager"), None if i else 2))
                for i, video in enumerate(videos)]
    branches.append(("STDiT2-XL/2", stdit2, {p: heavy(p, 3) for p in ("sora", "open-sora", "open-sora+compile")}))
    cases = [Case("temporal_branch", provider, video, {"model": model_name(model, cuda), "direction": "fwd+bwd",
                                                       "shape": video.label}, video.batches[:1], priority)
             for model, video, providers in branches for provider, priority in providers.items()]
    cases += [train_case("train_step_full", "STDiT2-XL/2", stdit2, False, provider, cuda, heavy(provider, priority))
              for provider, priority in zip(open_sora, (3, 3, 4))]
    # The training step, once: with encoders on the fly (T5 built once and kept for the cases after it), then
    # pre-encoded, under torch.compile too. STDiT-XL/2's priorities by (encoders, video, provider):
    priority = {(False, 0, "sora"): 2, (False, 0, "eager"): 2, (True, 0, "sora"): 7, (False, 1, "sora"): 8,
                (False, 1, "eager"): 8}
    cases += [train_case("train_step_full", model, video, encoders, provider, cuda,
                         priority.get((encoders, i, provider)) if model == "STDiT-XL/2" else None)
              for encoders in (True, False) for i, video in enumerate(videos)
              for model in ("STDiT-XL/2", "PixArt-XL/2")
              for provider in (("sora", "eager") if encoders else compile_providers)]
    if not cuda:
        cases.append(train_case("train_step_full", "STDiT-XL/2", CPU_GC_VIDEO, False, "sora", cuda))
    cases += [train_case("dit_image_train", "DiT-XL/2", IMAGES[cuda], False, provider, cuda)
              for provider in ("sora", "eager", "eager+compile")]
    cases += [train_case("latte_train", "Latte-XL/2", videos[0], False, p, cuda) for p in ("sora", "eager")]

    def sampling(bench, model, video, provider, steps, priority):  # steps: (on a GPU, on a CPU)
        return Case(bench, provider, (model, video),
                    {"model": model_name(model, cuda), "shape": video.label, "model_batch": 2 * SAMPLE_PROMPTS,
                     "dtype": sample_dtype, "steps_per_call": steps[not cuda], **CFG},
                    (SAMPLE_PROMPTS,), priority)

    cases += [sampling("sampling_step", "STDiT-XL/2", video, provider, (STEPS_PER_CALL, 2),
                       2 if i == 0 and provider in ("sora", "eager") else None)
              for i, video in enumerate(videos) for provider in compile_providers]
    cases += [sampling("sampling_step", "STDiT2-XL/2", stdit2, p, (SAMPLING_STEPS, 2), heavy(p, priority))
              for p, priority in zip(open_sora, (4, 4, None))]
    cases += [sampling("sampling_cache", "STDiT-XL/2", videos[0], provider, (SAMPLING_STEPS, 4), heavy(provider, 4))
              for provider in ("sora", "sora+cache")]
    cases.append(Case("t5_encode", "transformers", None,
                      {"model": "T5-v1.1-XXL encoder" if cuda else "T5 (tiny)",
                       "shape": f"{120 if cuda else 8} tokens", "dtype": "bf16" if cuda else "fp32"},
                      (32,) if cuda else (4,)))
    frames, resolutions, micro = (64, (256, 512), (4, 16, 64)) if cuda else (8, (64,), (2, 8))
    cases += [Case("vae_decode", "diffusers", resolution,
                   {"model": "SD VAE (sd-vae-ft-ema config)" if cuda else "VAE (tiny)",
                    "shape": f"{resolution}x{resolution}", "micro_batch_size": mb, "dtype": sample_dtype}, (frames,))
              for resolution in resolutions for mb in micro]
    cases += [Case("sample_e2e", provider, videos[0],
                   {"model": model_name("STDiT-XL/2", cuda), "shape": videos[0].label, "dtype": sample_dtype,
                    "steps": SAMPLING_STEPS if cuda else 3, **CFG, "vae_micro_batch_size": SAMPLE_VAE_MICRO_BATCH},
                   (1,), 7 if provider == "sora" else None)
              for provider in ("sora", "sora+compile", "eager")]
    cases.append(Case("optimizer_step", "sora", videos[0],
                      {"model": model_name("STDiT-XL/2", cuda), "shape": "parameters", "dtype": "fp32",
                       "optimizer": "AdamW fused" if cuda else "AdamW foreach"}, priority=2))
    return cases + [Case("diffusers_block", provider, (model, latent, text, config), {"model": model, "shape": shape,
                         "direction": direction, "dtype": "bf16" if cuda else "fp32"}, (batch,), 9)
                    for model, shape, latent, text, batch, config in BLOCKS[cuda] for direction in ("fwd", "fwd+bwd")
                    for provider in ("sora", "eager", "torch.compile")]


def cases(cuda: bool) -> list[Case]:
    """Every case of the suite on a GPU (cuda) or of the CPU smoke set (tiny shapes, the same code paths)."""
    return kernel_cases(cuda) + comm_cases(cuda) + model_cases(cuda)


def by_priority(cuda: bool, first: int, last: int) -> list[Case]:
    """bench/gpu_check.py's cases with a priority in [first, last], in order of priority, then of the table."""
    chosen = [case for case in cases(cuda) if case.priority is not None and first <= case.priority <= last]
    return sorted(chosen, key=lambda case: case.priority)
