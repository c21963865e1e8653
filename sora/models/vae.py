"""The video VAE: Stable Diffusion's image `AutoencoderKL` applied to every frame (Open-Sora v1).

`VideoAutoencoderKL` maps videos (B, 3, T, H, W) in [-1, 1] to latents (B, 4, T, H/8, W/8) and
back, frame by frame, in micro-batches of `micro_batch_size` frames to bound activation memory.
Latents are scaled by the VAE's `scaling_factor` (0.18215 for SD VAEs, which Open-Sora v1
hard-codes), so the diffusion model sees roughly unit variance.

File-less VAE for tests and CPU smoke configs: `dict(type="VideoAutoencoderKL",
config=TINY_VAE_CONFIG)` builds an `AutoencoderKL` from those keyword arguments with seeded random
weights (the same weights in every process and run).
"""

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor
from einops import rearrange
from torch import nn

from sora.registry import build, load_pretrained

# SD's VAE shape at toy width: 4 blocks (3 downsamplings: 8x, as SD) and 4 latent channels.
TINY_VAE_CONFIG = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
)


def sample_posterior(mean, std, scaling_factor, generator=None):
    """The scaled latent `encode` returns, from the posterior's (mean, std): the mean without a generator (or
    for a deterministic encoder, std None), else a sample whose noise is drawn once for the whole batch, on
    the generator's device, exactly as diffusers' `DiagonalGaussianDistribution.sample` draws it."""
    if generator is not None and std is not None:
        mean = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean * scaling_factor


class VideoAutoencoderKL(nn.Module):
    """A frozen `AutoencoderKL` applied per frame (`type="VideoAutoencoderKL"`).

    from_pretrained: a diffusers folder (config.json + weights) or hub id, e.g. stabilityai/sd-vae-ft-ema.
    subfolder: where the VAE sits inside from_pretrained (`"vae"` in a full SD pipeline).
    config: `AutoencoderKL` keyword arguments for seeded random weights instead (TINY_VAE_CONFIG).
    micro_batch_size: frames per VAE call; None: all frames of the batch at once.
    """

    def __init__(self, from_pretrained=None, micro_batch_size=None, subfolder=None, config=None):
        super().__init__()
        if (from_pretrained is None) == (config is None):
            raise ValueError("VideoAutoencoderKL: set exactly one of from_pretrained (a folder or hub id) and config")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(
                f"VideoAutoencoderKL: micro_batch_size must be a positive integer or None, got {micro_batch_size}"
            )
        if config is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.module = AutoencoderKL(**config)
        else:
            self.module = load_pretrained(AutoencoderKL.from_pretrained, from_pretrained, "VAE", subfolder=subfolder)
        self.module.requires_grad_(False)
        self.micro_batch_size = micro_batch_size
        self.scaling_factor = self.module.config.scaling_factor
        self.out_channels = self.module.config.latent_channels
        downsample = 2 ** (len(self.module.config.block_out_channels) - 1)  # one per block but the last
        self.patch_size = (1, downsample, downsample)

    def _per_frame(self, fn, x, channels, name):
        """Apply `fn` to the frames of `x` (B, C, T, H, W), `micro_batch_size` frames at a time."""
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"{name} must be (B, {channels}, T, H, W), got shape {tuple(x.shape)}")
        frames = rearrange(x, "B C T H W -> (B T) C H W")
        step = self.micro_batch_size or frames.shape[0]
        out = torch.cat([fn(frames[i : i + step]) for i in range(0, frames.shape[0], step)])
        return rearrange(out, "(B T) C H W -> B C T H W", B=x.shape[0])

    def encode(self, x, generator=None):
        """Videos (B, 3, T, H, W) in [-1, 1] -> scaled latents (B, 4, T, H/8, W/8).

        Without a generator the latent is the posterior mean: deterministic, and so independent
        of micro_batch_size. With one it is a posterior sample, as Open-Sora v1's `.sample()`,
        reproducible from the generator's seed: the noise is drawn once for the whole batch after
        the micro-batches, so it does not depend on micro_batch_size either.
        """
        return sample_posterior(*self.latent_distribution(x), self.scaling_factor, generator)

    def latent_distribution(self, x):
        """Videos (B, 3, T, H, W) -> the posterior's (mean, std), each (B, 4, T, H/8, W/8), unscaled: what
        sora.preprocess stores, and `sample_posterior` turns into `encode`'s latent."""
        # Per frame: (mean, logvar) stacked on channels; the Gaussian is formed on the whole batch.
        moments = self._per_frame(lambda f: self.module.encode(f).latent_dist.parameters, x, 3, "x")
        posterior = DiagonalGaussianDistribution(moments)
        return posterior.mean, posterior.std

    def decode(self, z):
        """Scaled latents (B, 4, T, h, w) -> videos (B, 3, T, 8h, 8w), roughly in [-1, 1]."""
        return self._per_frame(lambda f: self.module.decode(f).sample, z / self.scaling_factor, self.out_channels, "z")

    def get_latent_size(self, input_size):
        """(T, H, W) of a video -> (T, H/8, W/8) of its latent."""
        if any(size % patch for size, patch in zip(input_size, self.patch_size)):
            raise ValueError(
                f"video size (T, H, W) = {tuple(input_size)}: H and W must be multiples of {self.patch_size[1]} "
                "(the VAE's downsampling)"
            )
        return tuple(size // patch for size, patch in zip(input_size, self.patch_size))


class PixelVAE(nn.Module):
    """A weight-free stand-in for the VAE (`type="PixelVAE"`), for CPU-sized configs: latents are the frames
    average-pooled by `factor` (3 channels), decoded by bilinear upsampling.

    A tiny AutoencoderKL with random weights would decode whatever a model learned into noise; here colour
    and motion survive, at 1/factor of the resolution. It also keeps the values per token low (3 x patch
    area), as real latents do: a tiny model cannot predict many more noise values per token than its width.
    """

    def __init__(self, factor=4, micro_batch_size=None):
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"PixelVAE: factor must be a positive int, got {factor!r}")
        self.factor = factor
        self.micro_batch_size = micro_batch_size  # accepted like VideoAutoencoderKL's; nothing to batch
        self.out_channels = 3
        self.patch_size = (1, factor, factor)

    def encode(self, x, generator=None):
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"x must be (B, 3, T, H, W), got shape {tuple(x.shape)}")
        self.get_latent_size(x.shape[2:])
        frames = rearrange(x, "B C T H W -> (B T) C H W")
        pooled = torch.nn.functional.avg_pool2d(frames, self.factor)
        return rearrange(pooled, "(B T) C h w -> B C T h w", B=x.shape[0])

    def decode(self, z):
        if z.ndim != 5 or z.shape[1] != 3:
            raise ValueError(f"z must be (B, 3, T, h, w), got shape {tuple(z.shape)}")
        frames = rearrange(z, "B C T h w -> (B T) C h w")
        upsampled = torch.nn.functional.interpolate(frames, scale_factor=self.factor, mode="bilinear",
                                                    align_corners=False)
        return rearrange(upsampled, "(B T) C H W -> B C T H W", B=z.shape[0])

    scaling_factor = 1.0

    def latent_distribution(self, x):
        """(the latent, None): a deterministic encoder has no spread to sample."""
        return self.encode(x), None

    get_latent_size = VideoAutoencoderKL.get_latent_size


VAES = {"VideoAutoencoderKL": VideoAutoencoderKL, "PixelVAE": PixelVAE}


def build_vae(cfg):
    """A VAE from a config dict: `type` (VideoAutoencoderKL) and that class's options."""
    return build(VAES, cfg, "vae")
