"""`python -m sora.sample CONFIG [--prompt "..."] [--prompt-path FILE] [--ckpt-path P] [--key value ...]`

Text in, videos out: prompts from `--prompt` (repeatable) or a file (one per line, blank lines skipped), in
batches of batch_size; the diffusion model samples latents with the configured scheduler and classifier-free
guidance, the VAE decodes them, and each prompt becomes `save_dir/sample_NNNN.mp4` (`.png` for one frame).

All the noise of prompt i (initial and, for IDDPM, per step) comes from a generator seeded with seed + i, so
the same seed and prompt give the same video whichever batch or process it lands in. Under torchrun, batches are
shared out across data-parallel ranks, and sp_size > 1 samples each batch with sequence parallelism inside a
group of sp_size ranks.

Before any model is built it says in one line which weights sample (random ones without --ckpt-path: the
videos are then noise; of a training checkpoint folder, its EMA, how many updates it has seen and how much of
it is still the weights training started from, or with `--weights model` the trained weights themselves), and
it checks that save_dir can be written. `--compile true` compiles the model call with torch.compile.

Open-Sora v1.1 (STDiT2): `multi_resolution="STDiT2"` conditions the model on the size, aspect ratio, frame count
and fps (videos are saved at fps // frame_interval); `--reference-path`, `--mask-strategy`, `--loop` and
`--condition-frame-length` condition it on images and videos and chain clips (sora.reference, checked and read
before any model is built).

`--cache.type residual` (sora.schedulers.cache) skips the block stack on steps whose input has hardly changed;
every batch prints `model calls: K of N`.
"""

import inspect
import os

import torch

from sora.checkpointing import describe_weights
from sora.launch import build_components, check_writable, main, setup
from sora.parallel import init_sequence_parallel
from sora.schedulers import build_scheduler
from sora.schedulers.cache import check_cache


def read_prompts(cfg):
    if cfg.prompt:
        return list(cfg.prompt)
    if not cfg.prompt_path:
        raise ValueError("no prompts: give --prompt \"...\" or --prompt-path FILE (one prompt per line)")
    if os.path.isdir(cfg.prompt_path):
        raise ValueError(f"prompt file {cfg.prompt_path!r} is a folder; expected a text file, one prompt per line")
    if not os.path.isfile(cfg.prompt_path):
        raise FileNotFoundError(f"prompt file {cfg.prompt_path!r} does not exist")
    with open(cfg.prompt_path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {cfg.prompt_path!r} has no prompts (one per line expected)")
    return prompts


def save_video(video, path_without_ext, fps):
    """`save_sample` whose failure to write (disk full, read-only) is one ValueError naming the file and the OS
    error, with the partial file removed."""
    from sora.data.video import save_sample  # needs PyAV, which sample_videos (used by the benchmarks) does not

    try:
        return save_sample(video, path_without_ext, fps=fps)
    except OSError as error:
        path = error.filename or path_without_ext
        if os.path.isfile(path):
            os.remove(path)
        raise ValueError(f"could not write {path}: {error.strerror or error}") from None


def sample_videos(model, vae, text_encoder, scheduler, prompts, latent_size, seed, device, dtype, progress=False,
                  sp_group=None, model_kwargs=None, conditioning=None, cache=None):
    """Videos (B, 3, T, H, W), float32 on the CPU, for one batch of prompts: prompt i's noise (initial and per
    step) comes from its own generator seeded with seed + i. sp_group: the sequence-parallel group a model
    built with enable_sequence_parallelism=True splits frames over (the scheduler's model calls get it).
    model_kwargs: more model inputs (STDiT2's size conditioning). conditioning: the batch's references, mask
    strategies and loops (sora.reference.Conditioning; None: text only, one clip). cache: the scheduler's
    residual cache config (sora.schedulers.cache), None for none. With `progress`, it prints
    `model calls: K of N`, the full model calls of the batch's sampling loops out of their steps."""
    from sora.reference import Conditioning

    conditioning = conditioning or Conditioning(prompts)
    if sp_group is not None:
        model_kwargs = {**(model_kwargs or {}), "sp_group": sp_group}
    calls = [0, 0]
    with torch.no_grad():
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        conditioning.encode_references(vae, device, dtype, generators)
        clips = []
        for loop in range(conditioning.loop):
            if loop:
                conditioning.continue_from(clips[-1], loop, vae, device, dtype, generators)
            condition = text_encoder.encode(conditioning.prompts(loop))
            y = condition["y"].to(dtype) if condition["y"].is_floating_point() else condition["y"]
            noise = torch.stack([torch.randn(vae.out_channels, *latent_size, generator=g) for g in generators])
            frame_mask = conditioning.frame_mask(noise, loop)
            latents = scheduler.sample(model, noise.to(device), y, model.y_embedder.null(len(prompts)),
                                       condition["mask"], progress=progress, generator=generators,
                                       frame_mask=frame_mask, model_kwargs=model_kwargs, cache=cache)
            calls = [total + count for total, count in zip(calls, scheduler.model_calls)]
            clips.append(vae.decode(latents.to(dtype)).float().cpu())
        if progress:
            print(f"model calls: {calls[0]} of {calls[1]}", flush=True)
        return conditioning.join(clips, vae.patch_size[0])


def size_conditioning(cfg, batch, device, dtype):
    """Open-Sora v1.1's STDiT2 inputs for sampling: height, width, num_frames, ar = H / W (their inference
    scripts' ratio; their training data passes W / H) and fps (120 for one frame, as their images), (batch,)."""
    from sora.data.datasets import IMAGE_FPS

    (height, width), frames = cfg.image_size, cfg.num_frames
    values = dict(height=height, width=width, num_frames=frames, ar=height / width,
                  fps=IMAGE_FPS if frames == 1 else cfg.fps)
    return {name: torch.full((batch,), float(value), device=device, dtype=dtype) for name, value in values.items()}


def check_conditioning(cfg, prompts):
    """The config's references, mask strategies and loops for all prompts (sora.reference.Conditioning),
    checked, with their files read, before any model is built."""
    from sora.reference import Conditioning

    for key in ("reference_path", "mask_strategy"):
        if cfg[key] is not None and len(cfg[key]) != len(prompts):
            raise ValueError(f"{key} has {len(cfg[key])} entries for {len(prompts)} prompts: give one per prompt "
                             "(none for a prompt without)")
    if cfg.reference_path is not None and cfg.mask_strategy is None:
        raise ValueError("reference_path needs mask_strategy: one per prompt saying where the references go "
                         "(e.g. '0' for image-to-video)")
    conditioning = Conditioning(prompts, cfg.reference_path, cfg.mask_strategy, cfg.image_size, cfg.loop,
                                cfg.condition_frame_length)
    conditioned = cfg.loop > 1 or any(conditioning.groups)
    if conditioned and cfg.scheduler["type"] != "iddpm":
        raise ValueError(f"references, mask_strategy and loop need scheduler type 'iddpm', got "
                         f"{cfg.scheduler['type']!r}")
    return conditioning, conditioned


def run(cfg):
    if cfg.multi_resolution is True:
        raise ValueError("multi_resolution=True (PixArt-MS size conditioning) is not supported; set it to False, "
                         "or 'STDiT2' for an STDiT2 model")
    runtime = setup(cfg)
    prompts = read_prompts(cfg)
    conditioning, conditioned = check_conditioning(cfg, prompts)
    cache = check_cache(cfg.cache)
    if cache is not None and cfg.compile:
        raise ValueError("cache and compile=True cannot be combined: the cache runs the model's parts eagerly; "
                         "leave one of them out")
    weights = describe_weights(cfg.model.get("from_pretrained"), cfg.weights)
    check_writable(cfg.save_dir, "save_dir")
    if runtime.is_main:
        print(weights, flush=True)
    sp_size = cfg.sp_size
    sp_group = init_sequence_parallel(sp_size) if sp_size > 1 else None
    model, vae, text_encoder, latent_size = build_components(cfg, runtime, sequence_parallel=sp_size > 1,
                                                             weights=cfg.weights)
    model.eval()
    inputs = inspect.signature(model.forward).parameters
    if conditioned and "x_mask" not in inputs:
        raise ValueError(f"references, mask_strategy and loop need a model that takes x_mask (STDiT2); "
                         f"{cfg.model['type']} does not")
    if cfg.multi_resolution == "STDiT2" and "height" not in inputs:
        raise ValueError(f"multi_resolution='STDiT2' needs a model that takes the size conditioning (STDiT2); "
                         f"{cfg.model['type']} does not: set multi_resolution to False")
    if cfg.compile:
        model = torch.compile(model)
    scheduler = build_scheduler(cfg.scheduler)

    # Ranks k*sp .. k*sp + sp - 1 form one sequence-parallel group and sample the same batches.
    dp_rank, dp_size = runtime.rank // sp_size, runtime.world_size // sp_size
    writes = runtime.rank % sp_size == 0
    starts = range(0, len(prompts), cfg.batch_size)
    for batch, start in enumerate(starts):
        if batch % dp_size != dp_rank:
            continue
        batch_prompts = prompts[start:start + cfg.batch_size]
        # Seeded by the prompts' indices: a prompt's noise never depends on its batch.
        model_kwargs = (size_conditioning(cfg, len(batch_prompts), runtime.device, runtime.dtype)
                        if cfg.multi_resolution == "STDiT2" else None)
        videos = sample_videos(model, vae, text_encoder, scheduler, batch_prompts, latent_size, cfg.seed + start,
                               runtime.device, runtime.dtype, progress=runtime.is_main, sp_group=sp_group,
                               model_kwargs=model_kwargs,
                               conditioning=conditioning.select(start, start + len(batch_prompts)), cache=cache)
        if writes:
            for i, video in enumerate(videos):
                path = save_video(video, os.path.join(cfg.save_dir, f"sample_{start + i:04d}"),
                                  max(cfg.fps // cfg.frame_interval, 1))
                print(f"wrote {path}  ({batch_prompts[i]!r})", flush=True)


if __name__ == "__main__":
    main(run, "sample")
