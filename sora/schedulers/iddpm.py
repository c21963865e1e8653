"""Improved DDPM (Nichol & Dhariwal, 2021), the way Open-Sora v1 trains and samples with it.

A 1000-step linear-beta Gaussian diffusion whose model predicts eps (C channels) and, with
`learn_sigma`, C more channels that interpolate the log-variance between the posterior variance
and beta ("learned range"). Training uses the hybrid loss: MSE on eps plus the variational bound
for the variance with the mean detached. Sampling is ancestral, optionally on a respaced subset
of the 1000 steps, with classifier-free guidance in Open-Sora's convention.

Schedule constants are computed and kept in float64 on the CPU; each step gathers the ones it
needs on the tensors' device and casts them to the compute dtype (float32, or float64 for float64
inputs), as improved-diffusion does.
"""

import math
import numbers
import re

import torch
from tqdm import tqdm

from sora.kernels._common import compute_dtype
from sora.registry import is_int

from .cache import CountedModel

NOISE_SCHEDULES = ("linear", "squaredcos_cap_v2")


def named_betas(name, num_steps):
    """Betas of a named schedule, float64 of shape (num_steps,)."""
    if name == "linear":
        # Ho et al.'s 1e-4..0.02 over 1000 steps, rescaled so any step count diffuses equally far.
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    # Cosine alpha-bar; beta capped below 1 so the last step is not a singularity.
    alpha_bar = [math.cos((i / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(num_steps + 1)]
    betas = [min(1 - alpha_bar[i + 1] / alpha_bar[i], 0.999) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def space_timesteps(num_steps, respacing):
    """The original timesteps kept by a respacing, ascending.

    `respacing` is a step count ("N"), counts per equal section of the process ("10,15,20"),
    or "ddimN" (DDIM's fixed integer stride).
    """
    if respacing.startswith("ddim"):
        count = int(respacing[len("ddim") :])
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == count:
                return list(range(0, num_steps, stride))
        raise ValueError(f"timestep_respacing={respacing!r}: no integer stride gives {count} of {num_steps} steps.")
    counts = [int(c) for c in respacing.split(",")]
    size_per_section, extra = divmod(num_steps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per_section + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"timestep_respacing={respacing!r}: cannot take {count} steps from a section of {size}.")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        # Accumulate the float stride (not j * stride): rounding then picks exactly the steps
        # improved-diffusion and Open-Sora pick, so respaced samples match theirs.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return kept


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """Log-probability (nats) of the 8-bit bin of x in [-1, 1] under N(mean, exp(log_scale)^2).

    The edge bins extend to +-infinity. Uses the tanh approximation of the normal CDF, as
    improved-diffusion does, so the loss equals the one the released checkpoints were trained on.
    """

    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    inv_std = torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (x - mean + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (x - mean - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_bin))


def mean_flat(x, frame_mask=None):
    """Mean over every dimension but the batch: (B, ...) -> (B,). With `frame_mask` (B, T) bool, x being
    (B, C, T, H, W): the mean over the frames where the mask is True only (Open-Sora v1.1's masked mean)."""
    if frame_mask is None:
        return x.mean(dim=tuple(range(1, x.ndim)))
    frames = frame_mask[:, None, :, None, None].to(x.dtype)
    return (x * frames).sum(dim=(1, 2, 3, 4)) / (frame_mask.sum(1).to(x.dtype) * (x[0, :, 0].numel()))


def check_guidance(cfg_scale, cfg_channel):
    """Validate the classifier-free guidance settings shared by the schedulers."""
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, numbers.Real) or not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}.")
    if cfg_channel is not None and not (is_int(cfg_channel) and cfg_channel >= 1):
        raise ValueError(f"cfg_channel must be None or a positive int, got {cfg_channel!r}.")


def check_sampling_steps(num_sampling_steps, max_steps):
    if not (is_int(num_sampling_steps) and 1 <= num_sampling_steps <= max_steps):
        raise ValueError(f"num_sampling_steps must be an int in [1, {max_steps}], got {num_sampling_steps!r}.")


def check_sample_inputs(z, y, y_null, mask):
    """Validate `sample`'s tensors: one batch size B across z, y, y_null and mask."""
    if not isinstance(z, torch.Tensor) or z.ndim < 2 or not z.is_floating_point():
        raise ValueError(f"z must be a floating-point tensor (B, C, ...), got {getattr(z, 'shape', type(z))}.")
    conditions = {"y": y, "y_null": y_null} if mask is None else {"y": y, "y_null": y_null, "mask": mask}
    for name, tensor in conditions.items():
        if not isinstance(tensor, torch.Tensor) or tensor.ndim == 0 or tensor.shape[0] != z.shape[0]:
            got = getattr(tensor, "shape", type(tensor))
            raise ValueError(f"{name} must be a tensor with z's batch size {z.shape[0]} first, got {got}.")
    if y.shape[1:] != y_null.shape[1:]:
        raise ValueError(f"y and y_null must have the same shape, got {tuple(y.shape)} and {tuple(y_null.shape)}.")


def guided_output(model, x, timestep, y, y_null, mask, cfg_scale, cfg_channel, check=True, model_kwargs=None):
    """One model call on the batch doubled as [conditional; unconditional], guided.

    x: (B, C, ...), timestep: (B,) original-process indices. Returns (B, C_out, ...): the first
    `cfg_channel` channels (default C, the eps part) are uncond + cfg_scale * (cond - uncond), the
    rest (the learned variance) are the conditional ones. `check`: validate the output's shape
    (sampling loops do it on their first step only: the shapes do not change between steps).
    model_kwargs: more model inputs (STDiT2's x_mask, height, width, ...); a tensor with x's batch size
    first is doubled as x is, anything else is passed as it is.
    """
    kwargs = {"y": torch.cat([y, y_null])}
    # Models without masking (class-conditioned DiT) take no mask argument at all.
    if mask is not None:
        kwargs["mask"] = torch.cat([mask, mask])
    for name, value in (model_kwargs or {}).items():
        doubled = isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == x.shape[0]
        kwargs[name] = torch.cat([value, value]) if doubled else value
    out = model(torch.cat([x, x]), torch.cat([timestep, timestep]), **kwargs)
    num_guided = x.shape[1] if cfg_channel is None else cfg_channel
    if check and (out.shape[0] != 2 * x.shape[0] or out.shape[2:] != x.shape[2:]):
        expected = (2 * x.shape[0], "C_out", *x.shape[2:])
        raise ValueError(f"model output must be {expected} for the doubled input, got {tuple(out.shape)}.")
    if check and num_guided > out.shape[1]:
        raise ValueError(f"cfg_channel={num_guided} exceeds the model's {out.shape[1]} output channels.")
    cond, uncond = out.chunk(2)
    guided = uncond[:, :num_guided] + cfg_scale * (cond[:, :num_guided] - uncond[:, :num_guided])
    return torch.cat([guided, cond[:, num_guided:]], dim=1)


def check_frame_mask(frame_mask, x, dtype):
    """Validate a (B, T) frame mask for x (B, C, T, H, W): `dtype` "bool" (training: True = generate) or
    "ratio" (sampling: floats in [0, 1], the edit ratio of each frame)."""
    frames = x.shape[2] if x.ndim == 5 else None
    if frames is None or not isinstance(frame_mask, torch.Tensor) or frame_mask.shape != (x.shape[0], frames):
        shape = getattr(frame_mask, "shape", type(frame_mask))
        raise ValueError(f"frame_mask must be a (B, T) tensor for x of shape (B, C, T, H, W) = {tuple(x.shape)}, "
                         f"got {shape}.")
    if dtype == "bool":
        if frame_mask.dtype != torch.bool:
            raise ValueError(f"frame_mask must be a bool tensor (True = a frame to generate), got {frame_mask.dtype}.")
        if not frame_mask.any(1).all():
            raise ValueError("frame_mask must leave at least one frame to generate (True) in every sample.")
    elif not frame_mask.is_floating_point() or not ((frame_mask >= 0) & (frame_mask <= 1)).all():
        raise ValueError(f"frame_mask must hold edit ratios: floats in [0, 1], got {frame_mask!r}.")


def release_steps(frame_mask, num_steps):
    """(B, T) int64: the step at which each frame of a masked sampling is released, int(ratio * num_steps) as
    Open-Sora v1.1 computes it (in float32); a frame with ratio 1 is never held (num_steps)."""
    return (frame_mask.float() * num_steps).to(torch.int64)


def release_noise(steps, generator, like):
    """{step: (B, C, T, H, W) noise} for every step at which a frame is released (re-noised to that step's
    level), drawn in step order after the ancestral noise; with a list of generators, sample b draws only at
    its own release steps, so its noise does not depend on its batch."""
    per_sample = isinstance(generator, (list, tuple))
    noise = {}
    for b in range(like.shape[0]) if per_sample else [None]:
        rows = steps if b is None else steps[b:b + 1]
        for step in sorted({s for s in rows.flatten().tolist() if s >= 0}, reverse=True):  # -1: never released
            if b is None:
                noise[step] = randn(like.shape, generator, like)
            else:
                noise.setdefault(step, torch.zeros_like(like))[b] = randn(like.shape[1:], generator[b], like)
    return noise


def randn(shape, generator, like):
    """Standard normal noise of `shape` with `like`'s dtype and device.

    Drawn on the generator's device and then moved, so one seeded CPU generator gives the same
    noise whether the computation runs on CPU or GPU. `generator` may also be a list with one
    generator per sample (dim 0), so that a sample's noise does not depend on its batch.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; give one per sample")
        return torch.cat([randn((1, *shape[1:]), g, like) for g in generator])
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class IDDPM:
    """Gaussian diffusion with learned-range variance, respaced for sampling (Open-Sora's "iddpm")."""

    def __init__(
        self,
        num_sampling_steps=None,
        timestep_respacing=None,
        noise_schedule="linear",
        use_kl=False,
        sigma_small=False,
        predict_xstart=False,
        learn_sigma=True,
        rescale_learned_sigmas=False,
        diffusion_steps=1000,
        cfg_scale=4.0,
        cfg_channel=None,
        hold_condition_frames=False,
    ):
        if not (is_int(diffusion_steps) and diffusion_steps >= 1):
            raise ValueError(f"diffusion_steps must be a positive int, got {diffusion_steps!r}.")
        if noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {noise_schedule!r}.")
        flags = dict(
            use_kl=use_kl,
            sigma_small=sigma_small,
            predict_xstart=predict_xstart,
            learn_sigma=learn_sigma,
            rescale_learned_sigmas=rescale_learned_sigmas,
            hold_condition_frames=hold_condition_frames,
        )
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}.")
        check_guidance(cfg_scale, cfg_channel)
        if num_sampling_steps is not None:
            if timestep_respacing is not None:
                raise ValueError(
                    f"give num_sampling_steps or timestep_respacing, not both "
                    f"(got {num_sampling_steps!r} and {timestep_respacing!r})."
                )
            check_sampling_steps(num_sampling_steps, diffusion_steps)
            timestep_respacing = num_sampling_steps
        if timestep_respacing is None or timestep_respacing == "":
            timestep_respacing = diffusion_steps
        if is_int(timestep_respacing):
            timestep_respacing = str(timestep_respacing)
        if not isinstance(timestep_respacing, str) or not re.fullmatch(r"ddim\d+|\d+(,\d+)*", timestep_respacing):
            raise ValueError(
                f"timestep_respacing must be a step count or a string like '100', '10,20' or 'ddim50', "
                f"got {timestep_respacing!r}."
            )

        self.cfg_scale = cfg_scale
        self.cfg_channel = cfg_channel
        self.learn_sigma = learn_sigma
        self.predict_xstart = predict_xstart
        self.use_kl = use_kl
        self.rescale_learned_sigmas = rescale_learned_sigmas
        self.hold_condition_frames = hold_condition_frames
        # The model was trained on the original indices; respaced step i calls it with timestep_map[i].
        self.timestep_map = torch.tensor(space_timesteps(diffusion_steps, timestep_respacing), dtype=torch.long)

        # Respacing keeps alpha-bar at the kept steps: beta'_i = 1 - abar[k_i] / abar[k_{i-1}].
        kept_alphas_cumprod = torch.cumprod(1.0 - named_betas(noise_schedule, diffusion_steps), 0)[self.timestep_map]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), kept_alphas_cumprod[:-1]])
        self._set_schedule(1.0 - kept_alphas_cumprod / previous)
        # Fixed variances: "small" is the posterior variance, "large" is beta except at t=0, where
        # the (clipped) posterior variance gives the decoder a usable likelihood.
        if sigma_small:
            self.fixed_log_variance = self.posterior_log_variance_clipped
        else:
            self.fixed_log_variance = torch.cat([self.posterior_log_variance_clipped[:1], self.log_betas[1:]])

    def _set_schedule(self, betas):
        self._tables = {}  # device -> the tables below, copied there (see _on)
        self.betas = betas
        self.log_betas = torch.log(betas)
        self.num_timesteps = len(betas)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0, so its log takes t=1's value there. A one-step
        # process has no t=1; its t=0 variance is never used in sampling, and beta stands in.
        first = self.posterior_variance[1:2] if len(betas) > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - self.alphas_cumprod)
        )

    def _on(self, name, device):
        """The schedule table `name` on `device`, copied there once: a copy per lookup would make every step
        wait for the GPU several times."""
        tables = self._tables.setdefault(torch.device(device), {})
        if name not in tables:
            tables[name] = getattr(self, name).to(device)
        return tables[name]

    def _at(self, name, t, x):
        """Table `name` at t, as (B, 1, ...) in x's dtype and device, to broadcast against x."""
        return self._on(name, x.device)[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x_start, t, noise):
        """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), drawn with the given noise."""
        return (
            self._at("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._at("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        mean = self._at("posterior_mean_coef1", t, x_t) * x_start + self._at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._at("posterior_variance", t, x_t), self._at("posterior_log_variance_clipped", t, x_t)

    def p_mean_variance(self, model_output, x_t, t, check=True):
        """Mean, log-variance and x_0 prediction of p(x_{t-1} | x_t) from the model's output.

        model_output: (B, 2C, ...) [eps (or x_0); variance fraction v in [-1, 1]] with learn_sigma,
        else (B, C, ...). The learned log-variance is (v + 1) / 2 * log(beta_t)
        + (1 - v) / 2 * log(posterior variance_t). `check`: validate model_output's shape.
        """
        channels = x_t.shape[1]
        expected = (x_t.shape[0], 2 * channels if self.learn_sigma else channels, *x_t.shape[2:])
        if check and model_output.shape != expected:
            raise ValueError(
                f"model output must be {expected} (learn_sigma={self.learn_sigma}) for x_t {tuple(x_t.shape)}, "
                f"got {tuple(model_output.shape)}."
            )
        prediction = model_output[:, :channels]
        if self.learn_sigma:
            frac = (model_output[:, channels:] + 1) / 2
            min_log = self._at("posterior_log_variance_clipped", t, x_t)
            max_log = self._at("log_betas", t, x_t)
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            log_variance = self._at("fixed_log_variance", t, x_t).expand_as(x_t)
        if self.predict_xstart:
            pred_xstart = prediction
        else:
            pred_xstart = (
                self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * prediction
            )
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return mean, log_variance, pred_xstart

    def vlb_terms(self, x_start, x_t, t, model_output, frame_mask=None):
        """One term of the variational bound per sample, in bits per dimension, (B,).

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder's negative
        log-likelihood of x_0 for t = 0; averaged over the frames where `frame_mask` (B, T) is True.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        mean, log_variance, _ = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance), frame_mask) / math.log(2.0)
        log_likelihood = discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)
        decoder_nll = -mean_flat(log_likelihood, frame_mask) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model, x_start, model_kwargs=None, t=None, noise=None, generator=None,
                        frame_mask=None):
        """Per-sample losses for one noised batch: a dict of (B,) tensors.

        `loss` = `mse` (eps, or x_0 with predict_xstart) + `vb` (the variance's bound term, mean
        detached) with learn_sigma, `mse` alone without; with use_kl, `loss` = the bound term times
        num_timesteps (mean not detached). `t` (B,) indexes this scheduler's steps and is drawn
        uniformly when not given; `noise` defaults to standard normal; both draw from `generator`.

        frame_mask: (B, T) bool for x_start (B, C, T, H, W), True = a frame to generate (Open-Sora v1.1's
        masked training): the other frames, the condition, are noised to step 0 only (with the same noise),
        the model gets the mask as `x_mask`, and mse and vb average over the generated frames only.
        """
        if not isinstance(x_start, torch.Tensor) or x_start.ndim < 2 or not x_start.is_floating_point():
            got = getattr(x_start, "shape", type(x_start))
            raise ValueError(f"x_start must be a floating-point tensor (B, C, ...), got {got}.")
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            got = type(model_kwargs).__name__
            raise ValueError(f"model_kwargs must be a dict of model inputs (y, mask), got {got}.")
        if frame_mask is not None:
            check_frame_mask(frame_mask, x_start, "bool")
            if self.use_kl:
                raise ValueError("frame_mask needs the hybrid loss: it is not defined for use_kl=True (nor is it in "
                                 "Open-Sora v1.1).")
            frame_mask = frame_mask.to(x_start.device)
            model_kwargs = {**(model_kwargs or {}), "x_mask": frame_mask}
        batch = x_start.shape[0]
        if t is None:
            device = generator.device if generator is not None else x_start.device
            t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device).to(x_start.device)
        elif (
            not isinstance(t, torch.Tensor)
            or t.shape != (batch,)
            or t.is_floating_point()
            or not (0 <= t.min() and t.max() < self.num_timesteps)
        ):
            raise ValueError(
                f"t must be an integer tensor of shape ({batch},) in [0, {self.num_timesteps}), got {t!r}."
            )
        t = t.to(x_start.device)
        dtype = compute_dtype(x_start)
        x_start = x_start.to(dtype)
        if noise is None:
            noise = randn(x_start.shape, generator, x_start)
        elif noise.shape != x_start.shape:
            raise ValueError(f"noise must have x_start's shape {tuple(x_start.shape)}, got {tuple(noise.shape)}.")
        noise = noise.to(dtype)

        x_t = self.q_sample(x_start, t, noise)
        if frame_mask is not None:
            x_t0 = self.q_sample(x_start, torch.zeros_like(t), noise)
            x_t = torch.where(frame_mask[:, None, :, None, None], x_t, x_t0)
        model_output = model(x_t, self._on("timestep_map", t.device)[t], **(model_kwargs or {})).to(dtype)
        if self.use_kl:
            return {"loss": self.vlb_terms(x_start, x_t, t, model_output) * self.num_timesteps}

        channels = x_start.shape[1]
        target = x_start if self.predict_xstart else noise
        terms = {"mse": mean_flat((target - model_output[:, :channels]) ** 2, frame_mask)}
        terms["loss"] = terms["mse"]
        if self.learn_sigma:
            # The bound trains only the variance; the mean is left to the MSE ("hybrid" loss).
            frozen = torch.cat([model_output[:, :channels].detach(), model_output[:, channels:]], dim=1)
            terms["vb"] = self.vlb_terms(x_start, x_t, t, frozen, frame_mask)
            if self.rescale_learned_sigmas:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
            terms["loss"] = terms["mse"] + terms["vb"]
        return terms

    @torch.no_grad()
    def sample(self, model, z, y, y_null, mask=None, progress=True, generator=None, frame_mask=None,
               model_kwargs=None, cache=None):
        """Ancestral sampling from noise z (B, C, T, H, W) to x_0, with classifier-free guidance.

        Each step calls model(x, t, y=..., mask=..., **model_kwargs) once on the doubled batch [x; x] with
        [y; y_null] (and [mask; mask] when given) at the original timestep index. `generator`: one
        torch.Generator, or a list of B (one per sample). Returns (B, C, T, H, W) in z's dtype.

        frame_mask: (B, T) edit ratios in [0, 1] (Open-Sora v1.1's masked sampling; z holds the reference
        latents at the frames with a ratio below 1). A frame of ratio r is held at its reference until step
        int(r * num_steps) (counting down), re-noised there to that step's level, and denoised from then on;
        x_mask (True = a frame released at an earlier step; at its release step a frame still gets the condition's
        timestep-0 modulation, as in Open-Sora) goes to the model. Ratio 1 is the unmasked computation: an all-ones mask
        samples exactly what no mask samples (the re-noising noise is drawn only for steps that release a
        frame, after the ancestral noise). The mask is read once on the host, before the loop.
        Open-Sora releases a frame of ratio 0 at the last step, where the model's output becomes the frame, an
        output its masked loss never trains: that moves the frame by about sqrt(1 - alpha_bar_0) of it for an
        eps model, and replaces it for an x_0 model (predict_xstart). With hold_condition_frames=True such
        frames stay the reference to the end, and the model sees them as condition at every step.

        cache: None, or a residual cache config such as dict(type="residual", trigger="delta", threshold=0.4)
        (sora.schedulers.cache). After sampling, `model_calls` is (full model calls, steps).
        """
        check_sample_inputs(z, y, y_null, mask)
        model = CountedModel(model, cache, self.num_timesteps)
        x = z.to(compute_dtype(z))
        if frame_mask is not None:
            check_frame_mask(frame_mask, x, "ratio")
            held = release_steps(frame_mask, self.num_timesteps)
            if self.hold_condition_frames:  # never released: -1 is below every step
                held = held.masked_fill(held == 0, -1)
        batch = x.shape[0]
        timesteps = self._on("timestep_map", x.device)
        steps = range(self.num_timesteps - 1, -1, -1)
        # Every step's noise (the last step adds none), drawn before the loop in the order the steps use it: a
        # CPU generator's noise is then on the GPU before the first step instead of each step waiting for its
        # copy (this holds num_timesteps - 1 tensors of z's size on the device).
        noise = iter([randn(x.shape, generator, x) for _ in steps[:-1]])
        if frame_mask is not None:
            renoise = release_noise(held, generator, x)
            held = held.to(x.device)
        kwargs = dict(model_kwargs or {})
        for i in tqdm(steps, disable=not progress):
            first = i == steps[0]
            t = torch.full((batch,), i, dtype=torch.long, device=x.device)
            if frame_mask is not None:
                reference = x
                if i in renoise:  # frames released at this step: the reference re-noised to step i
                    x = torch.where((held == i)[:, None, :, None, None], self.q_sample(reference, t, renoise[i]), x)
                kwargs["x_mask"] = held > i
            out = guided_output(model, x, timesteps[t], y, y_null, mask, self.cfg_scale, self.cfg_channel, first,
                                kwargs)
            mean, log_variance, _ = self.p_mean_variance(out.to(x.dtype), x, t, check=first)
            # The last step returns the mean: x_0 gets no noise.
            x = mean + torch.exp(0.5 * log_variance) * next(noise) if i > 0 else mean
            if frame_mask is not None:  # frames not yet released stay the reference
                x = torch.where((held < i)[:, None, :, None, None], reference, x)
        self.model_calls = (model.computed, model.num_steps)
        return x.to(z.dtype)
