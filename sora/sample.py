"""`python -m sora.sample CONFIG [--prompt "..."] [--prompt-path FILE] [--ckpt-path P] [--key value ...]`

Text in, videos out: prompts from `--prompt` (repeatable) or a file (one per line, blank lines skipped), in
batches of batch_size; the diffusion model samples latents with the configured scheduler and classifier-free
guidance, the VAE decodes them, and each prompt becomes `save_dir/sample_NNNN.mp4` (`.png` for one frame).

All the noise of prompt i (initial and, for IDDPM, per step) comes from a generator seeded with seed + i, so
the same seed and prompt give the same video whichever batch or process it lands in. Under torchrun, batches are shared out across data-parallel ranks, and
sp_size > 1 samples each batch with sequence parallelism inside a group of sp_size ranks.
"""

import os

import torch

from sora.launch import build_components, main, setup
from sora.parallel import init_sequence_parallel
from sora.schedulers import build_scheduler


def read_prompts(cfg):
    if cfg.prompt:
        return list(cfg.prompt)
    if not cfg.prompt_path:
        raise ValueError("no prompts: give --prompt \"...\" or --prompt-path FILE (one prompt per line)")
    if not os.path.isfile(cfg.prompt_path):
        raise FileNotFoundError(f"prompt file {cfg.prompt_path!r} does not exist")
    with open(cfg.prompt_path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {cfg.prompt_path!r} has no prompts (one per line expected)")
    return prompts


def sample_videos(model, vae, text_encoder, scheduler, prompts, latent_size, seed, device, dtype, progress=False):
    """Videos (B, 3, T, H, W), float32 on the CPU, for one batch of prompts: prompt i's noise (initial and per
    step) comes from its own generator seeded with seed + i."""
    with torch.no_grad():
        condition = text_encoder.encode(prompts)
        y = condition["y"].to(dtype) if condition["y"].is_floating_point() else condition["y"]
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        noise = torch.stack([torch.randn(vae.out_channels, *latent_size, generator=g) for g in generators])
        latents = scheduler.sample(model, noise.to(device), y, model.y_embedder.null(len(prompts)), condition["mask"],
                                   progress=progress, generator=generators)
        return vae.decode(latents.to(dtype)).float().cpu()


def run(cfg):
    # Imported here: writing videos needs PyAV, which sample_videos (used by the benchmarks) does not.
    from sora.data.video import save_sample


    if cfg.multi_resolution:
        raise ValueError("multi_resolution (PixArt-MS size conditioning) is not supported; set it to False")
    runtime = setup(cfg)
    prompts = read_prompts(cfg)
    sp_size = cfg.sp_size
    if sp_size > 1:
        init_sequence_parallel(sp_size)
    model, vae, text_encoder, latent_size = build_components(cfg, runtime, sequence_parallel=sp_size > 1)
    model.eval()
    scheduler = build_scheduler(cfg.scheduler)

    # Ranks k*sp .. k*sp + sp - 1 form one sequence-parallel group and sample the same batches.
    dp_rank, dp_size = runtime.rank // sp_size, runtime.world_size // sp_size
    writes = runtime.rank % sp_size == 0
    os.makedirs(cfg.save_dir, exist_ok=True)
    starts = range(0, len(prompts), cfg.batch_size)
    for batch, start in enumerate(starts):
        if batch % dp_size != dp_rank:
            continue
        batch_prompts = prompts[start:start + cfg.batch_size]
        # Seeded by the prompts' indices: a prompt's noise never depends on its batch.
        videos = sample_videos(model, vae, text_encoder, scheduler, batch_prompts, latent_size, cfg.seed + start,
                               runtime.device, runtime.dtype, progress=runtime.is_main)
        if writes:
            for i, video in enumerate(videos):
                path = save_sample(video, os.path.join(cfg.save_dir, f"sample_{start + i:04d}"), fps=cfg.fps)
                print(f"wrote {path}  ({batch_prompts[i]!r})", flush=True)


if __name__ == "__main__":
    main(run, "sample")
