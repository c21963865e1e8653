"""IDDPM and DPM-Solver against formulas written out here in float64 numpy, and end to end with
toy models whose answers are known."""

import math

import numpy as np
import pytest
import torch

from sora.schedulers import IDDPM, DPMSolver, build_scheduler
from sora.schedulers.iddpm import guided_output

SHAPE = (2, 4, 3, 4, 5)  # (B, C, T, H, W): small, odd sizes


def reference_schedule():
    """The 1000-step linear DDPM schedule and its posterior, float64 numpy."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return betas, abar, abar_prev, post_var


def bcast(values, t, ndim):
    """values[t] as (B, 1, ...) numpy."""
    return np.asarray(values)[np.asarray(t)].reshape(-1, *([1] * (ndim - 1)))


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def exact_eps_model(x0, channels_out, calls=None):
    """A model whose eps is exact when the data is always x0: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar),
    abar taken at the original 1000-step timestep it is given (between two, log sqrt(abar) interpolated
    linearly, as DPM-Solver's continuous time does). Extra channels: a variance fraction."""
    log_alpha = 0.5 * np.log(reference_schedule()[1])

    def model(x, t, y, mask=None):
        if calls is not None:
            calls.append(dict(x=x.clone(), t=t.clone(), y=y.clone(), mask=mask))
        abar = np.exp(2 * np.interp(t.cpu().double().numpy(), np.arange(1000), log_alpha))
        a = torch.from_numpy(abar).to(x).view(-1, *([1] * (x.ndim - 1)))
        data = x0.to(x).repeat(len(x) // len(x0), *([1] * (x.ndim - 1)))  # the batch may be doubled for CFG
        eps = (x - a.sqrt() * data) / (1 - a).sqrt()
        var_frac = torch.tanh(x[:, : channels_out - x.shape[1]])
        return torch.cat([eps, var_frac], dim=1)

    return model


def conditional_model(x, t, y, mask=None):
    """A smooth toy model (2C output channels) whose output depends on x, t and the caption y (B, 1, L, C_y)."""
    y_scale = y.flatten(1).mean(1).view(-1, *([1] * (x.ndim - 1)))
    tt = t.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) / 1000
    eps = torch.tanh(x * (1 + y_scale)) + 0.5 * tt * y_scale
    var_frac = torch.sin(x + y_scale) * 0.5
    return torch.cat([eps, var_frac], dim=1)


# ---------------------------------------------------------------- IDDPM formulas


def test_schedule_constants_match_the_linear_ddpm_schedule():
    betas, abar, abar_prev, post_var = reference_schedule()
    diffusion = IDDPM()
    assert diffusion.num_timesteps == 1000
    assert diffusion.timestep_map.tolist() == list(range(1000))
    assert diffusion.betas.dtype == torch.float64
    np.testing.assert_allclose(diffusion.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), abar, rtol=1e-12)
    np.testing.assert_allclose(diffusion.posterior_variance.numpy(), post_var, rtol=1e-12, atol=0)
    clipped = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    np.testing.assert_allclose(diffusion.posterior_log_variance_clipped.numpy(), clipped, rtol=1e-12)
    assert IDDPM(timestep_respacing="").num_timesteps == 1000


def test_q_sample_and_posterior_match_the_formulas():
    betas, abar, abar_prev, post_var = reference_schedule()
    diffusion = IDDPM()
    x0, noise, x_t = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2), randn(*SHAPE, seed=3)
    for t_list in ([0, 999], [1, 417]):
        t = torch.tensor(t_list)
        expected = np.sqrt(bcast(abar, t, 5)) * x0.numpy() + np.sqrt(1 - bcast(abar, t, 5)) * noise.numpy()
        np.testing.assert_allclose(diffusion.q_sample(x0, t, noise).numpy(), expected, rtol=1e-12, atol=1e-12)

        mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)
        b, a, ap = bcast(betas, t, 5), bcast(abar, t, 5), bcast(abar_prev, t, 5)
        expected_mean = b * np.sqrt(ap) / (1 - a) * x0.numpy() + (1 - ap) * np.sqrt(1 - b) / (1 - a) * x_t.numpy()
        np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(var.numpy().ravel(), post_var[t_list], rtol=1e-12)
        # log-variance at t=0 is clipped to t=1's (the posterior variance is 0 there)
        expected_log = np.log([post_var[max(s, 1)] for s in t_list])
        np.testing.assert_allclose(log_var.numpy().ravel(), expected_log, rtol=1e-12)


def test_learned_range_variance_interpolates_between_posterior_variance_and_beta():
    betas, abar, abar_prev, post_var = reference_schedule()
    diffusion = IDDPM()
    x_t, eps = randn(*SHAPE, seed=4), randn(*SHAPE, seed=5)
    frac_raw = torch.rand(*SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 523])
    mean, log_var, pred_x0 = diffusion.p_mean_variance(torch.cat([eps, frac_raw], 1), x_t, t)

    frac = (frac_raw.numpy() + 1) / 2
    min_log = np.log(np.array([post_var[1], post_var[523]])).reshape(-1, 1, 1, 1, 1)
    max_log = np.log(bcast(betas, t, 5))
    np.testing.assert_allclose(log_var.numpy(), frac * max_log + (1 - frac) * min_log, rtol=1e-12)
    a = bcast(abar, t, 5)
    expected_x0 = (x_t.numpy() - np.sqrt(1 - a) * eps.numpy()) / np.sqrt(a)
    np.testing.assert_allclose(pred_x0.numpy(), expected_x0, rtol=1e-10, atol=1e-10)
    b, ap = bcast(betas, t, 5), bcast(abar_prev, t, 5)
    expected_mean = b * np.sqrt(ap) / (1 - a) * expected_x0 + (1 - ap) * np.sqrt(1 - b) / (1 - a) * x_t.numpy()
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("sigma_small", [False, True])
def test_fixed_variances_and_x0_prediction(sigma_small):
    betas, abar, abar_prev, post_var = reference_schedule()
    diffusion = IDDPM(learn_sigma=False, sigma_small=sigma_small, predict_xstart=True)
    x_t, x0_pred = randn(*SHAPE, seed=30), randn(*SHAPE, seed=31)
    t = torch.tensor([0, 811])
    mean, log_var, pred_x0 = diffusion.p_mean_variance(x0_pred, x_t, t)
    # "large" is beta except at t=0, "small" the posterior variance; both use t=1's posterior at t=0
    expected_var = [post_var[1], post_var[811] if sigma_small else betas[811]]
    np.testing.assert_allclose(log_var[:, 0, 0, 0, 0].numpy(), np.log(expected_var), rtol=1e-12)
    assert torch.equal(pred_x0, x0_pred)
    b, a, ap = bcast(betas, t, 5), bcast(abar, t, 5), bcast(abar_prev, t, 5)
    expected_mean = b * np.sqrt(ap) / (1 - a) * x0_pred.numpy() + (1 - ap) * np.sqrt(1 - b) / (1 - a) * x_t.numpy()
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-9, atol=1e-10)


def reference_mean(values, frames=None):
    """Mean of one sample's (C, T, H, W) values, over the frames where `frames` (T,) is True when given."""
    return values.mean() if frames is None else values[:, frames].mean()


def reference_vlb(x0, x_t, t, eps, frac_raw, frame_mask=None):
    """KL (t > 0) or discretized-Gaussian decoder NLL (t = 0), bits per dim, written out in numpy; averaged
    over the frames where frame_mask (B, T) is True."""
    betas, abar, abar_prev, post_var = reference_schedule()
    out = []
    for i, s in enumerate(t):
        frames = None if frame_mask is None else frame_mask[i]
        x0_i, xt_i, eps_i, v_i = x0[i], x_t[i], eps[i], frac_raw[i]
        coef1 = betas[s] * np.sqrt(abar_prev[s]) / (1 - abar[s])
        coef2 = (1 - abar_prev[s]) * np.sqrt(1 - betas[s]) / (1 - abar[s])
        true_mean = coef1 * x0_i + coef2 * xt_i
        true_logvar = np.log(post_var[max(s, 1)])
        pred_x0 = (xt_i - np.sqrt(1 - abar[s]) * eps_i) / np.sqrt(abar[s])
        model_mean = coef1 * pred_x0 + coef2 * xt_i
        frac = (v_i + 1) / 2
        model_logvar = frac * np.log(betas[s]) + (1 - frac) * np.log(post_var[max(s, 1)])
        if s > 0:
            kl = 0.5 * (
                -1
                + model_logvar
                - true_logvar
                + np.exp(true_logvar - model_logvar)
                + (true_mean - model_mean) ** 2 * np.exp(-model_logvar)
            )
            out.append(reference_mean(kl, frames) / math.log(2))
        else:
            cdf = lambda v: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))  # noqa: E731
            inv_std = np.exp(-0.5 * model_logvar)
            plus = cdf(inv_std * (x0_i - model_mean + 1 / 255))
            minus = cdf(inv_std * (x0_i - model_mean - 1 / 255))
            log_p = np.where(
                x0_i < -0.999,
                np.log(np.maximum(plus, 1e-12)),
                np.where(x0_i > 0.999, np.log(np.maximum(1 - minus, 1e-12)), np.log(np.maximum(plus - minus, 1e-12))),
            )
            out.append(-reference_mean(log_p, frames) / math.log(2))
    return np.array(out)


def test_vlb_terms_match_kl_and_decoder_nll():
    diffusion = IDDPM()
    shape = (3, *SHAPE[1:])
    # data in [-1, 1] with some values on the edge bins, as the decoder likelihood expects
    x0 = (randn(*shape, seed=7) * 0.8).clamp(-1, 1)
    x_t, eps = randn(*shape, seed=8), randn(*shape, seed=9)
    frac_raw = torch.rand(*shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 1, 640])
    got = diffusion.vlb_terms(x0, x_t, t, torch.cat([eps, frac_raw], 1))
    expected = reference_vlb(x0.numpy(), x_t.numpy(), t.tolist(), eps.numpy(), frac_raw.numpy())
    assert (x0.abs() >= 0.999).any() and expected[1] > 0.01
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8)


# ---------------------------------------------------------------- respacing


@pytest.mark.parametrize("steps", [10, 37, 100])
def test_respacing_keeps_alpha_bar_at_the_kept_timesteps(steps):
    abar = reference_schedule()[1]
    diffusion = IDDPM(num_sampling_steps=steps)
    kept = diffusion.timestep_map.numpy()
    assert diffusion.num_timesteps == steps and len(kept) == steps
    assert kept[0] == 0 and kept[-1] == 999 and np.all(np.diff(kept) > 0)
    np.testing.assert_allclose(np.cumprod(1 - diffusion.betas.numpy()), abar[kept], rtol=1e-12)


def test_respacing_picks_improved_diffusions_timesteps():
    # improved-diffusion (and Open-Sora) accumulate a float stride: 21 steps keep 499, not 500
    expected = list(range(0, 500, 50))[:-1] + [450, 499] + list(range(549, 1000, 50))
    assert IDDPM(num_sampling_steps=21).timestep_map.tolist() == expected
    assert IDDPM(timestep_respacing="3,5").timestep_map.tolist() == [0, 250, 499, 500, 625, 750, 874, 999]
    assert IDDPM(timestep_respacing="ddim50").timestep_map.tolist() == list(range(0, 1000, 20))


def test_sampling_calls_the_model_at_original_timesteps_with_a_doubled_batch():
    calls = []
    x0 = randn(*SHAPE, seed=11).float()
    diffusion = IDDPM(num_sampling_steps=7)
    y, y_null = torch.randn(2, 1, 3, 6), torch.randn(2, 1, 3, 6)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    z = torch.randn(SHAPE)
    diffusion.sample(exact_eps_model(x0, 8, calls), z, y, y_null, mask=mask, progress=False)
    kept = diffusion.timestep_map.tolist()
    assert [c["t"].tolist() for c in calls] == [[k] * 4 for k in reversed(kept)]
    assert torch.equal(calls[0]["x"], torch.cat([z, z]))
    for call in calls:
        assert torch.equal(call["y"], torch.cat([y, y_null]))
        assert torch.equal(call["mask"], torch.cat([mask, mask]))


# ---------------------------------------------------------------- classifier-free guidance


def test_guidance_combines_cond_and_uncond_on_the_first_cfg_channels():
    x = torch.randn(SHAPE, dtype=torch.float64)
    t = torch.tensor([900, 900])
    y, y_null = torch.randn(2, 1, 3, 6, dtype=torch.float64), torch.randn(2, 1, 3, 6, dtype=torch.float64)
    cond = conditional_model(x, t, y)
    uncond = conditional_model(x, t, y_null)
    for scale, cfg_channel in [(1.0, None), (4.5, None), (7.0, 3)]:
        got = guided_output(conditional_model, x, t, y, y_null, None, scale, cfg_channel)
        k = 4 if cfg_channel is None else cfg_channel
        expected = torch.cat([uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], 1)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(cond[:, :4], uncond[:, :4])


def test_guidance_with_class_ids_and_no_mask_argument():
    def class_model(x, t, y):  # no mask parameter, like a class-conditioned DiT
        return torch.cat([x * y.view(-1, 1, 1, 1, 1), x], dim=1)

    x = torch.randn(SHAPE, dtype=torch.float64)
    y, y_null = torch.tensor([3, 7]), torch.tensor([1000, 1000])
    got = guided_output(class_model, x, torch.tensor([5, 5]), y, y_null, None, 2.0, None)
    expected_eps = x * 1000 + 2.0 * (x * torch.tensor([3.0, 7.0]).view(-1, 1, 1, 1, 1) - x * 1000)
    torch.testing.assert_close(got, torch.cat([expected_eps, x], 1))


@pytest.mark.parametrize("make", [lambda s: IDDPM(num_sampling_steps=8, cfg_scale=s), lambda s: DPMSolver(8, s)])
def test_cfg_scale_one_samples_the_conditional_model(make):
    y, y_null = torch.randn(2, 1, 3, 6), torch.randn(2, 1, 3, 6)

    def conditional_only(x, t, y):  # both halves see the caption: no guidance at any scale
        return conditional_model(x, t, y[: len(y) // 2].repeat(2, 1, 1, 1))

    z = torch.randn(SHAPE)

    def sample(scale, model):
        return make(scale).sample(model, z, y, y_null, progress=False, generator=torch.Generator().manual_seed(0))

    guided, strong = sample(1.0, conditional_model), sample(6.0, conditional_model)
    torch.testing.assert_close(guided, sample(1.0, conditional_only), rtol=1e-5, atol=1e-5)
    assert (strong - guided).abs().max() > 0.1


# ---------------------------------------------------------------- sampling


def test_sampling_is_reproducible_from_the_generator():
    diffusion = IDDPM(num_sampling_steps=6)
    y, y_null, z = torch.randn(2, 1, 3, 6), torch.randn(2, 1, 3, 6), torch.randn(SHAPE)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return diffusion.sample(conditional_model, z, y, y_null, progress=False, generator=generator)

    assert torch.equal(run(3), run(3))
    assert (run(3) - run(4)).abs().max() > 1e-3


def test_per_sample_generators_make_a_sample_independent_of_its_batch():
    """With one generator per sample, sample 0 of a batch of two equals sample 0 sampled alone."""
    diffusion = IDDPM(num_sampling_steps=6)
    y, y_null, z = torch.randn(2, 1, 3, 6), torch.randn(2, 1, 3, 6), torch.randn(SHAPE)
    pair = diffusion.sample(conditional_model, z, y, y_null, progress=False,
                            generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    alone = diffusion.sample(conditional_model, z[:1], y[:1], y_null[:1], progress=False,
                             generator=[torch.Generator().manual_seed(5)])
    torch.testing.assert_close(pair[:1], alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="got 1 generators for a batch of 2"):
        diffusion.sample(conditional_model, z, y, y_null, progress=False, generator=[torch.Generator()])


def test_iddpm_sampling_with_an_exact_model_ends_at_the_data():
    x0 = randn(*SHAPE, seed=12).float()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(13))
    y, y_null = torch.randn(2, 1, 3, 6), torch.randn(2, 1, 3, 6)
    sample = IDDPM(num_sampling_steps=50, cfg_scale=4.0).sample(
        exact_eps_model(x0, 8), z, y, y_null, progress=False, generator=torch.Generator().manual_seed(14)
    )
    # every step predicts x0 exactly, and the last step's posterior mean is x0 itself
    torch.testing.assert_close(sample, x0, rtol=0, atol=2e-4)


def test_dpm_solver_with_an_exact_model_follows_the_ode_to_step_zero():
    abar = reference_schedule()[1]
    x0 = randn(*SHAPE, seed=15).float()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(16))
    y, y_null = torch.randn(2, 1, 3, 6), torch.randn(2, 1, 3, 6)
    sample = DPMSolver(num_sampling_steps=20).sample(exact_eps_model(x0, 8), z, y, y_null, progress=False)
    # With exact x0 predictions the ODE keeps the noise direction of z: it ends at step 0's marginal.
    eps = (z.double() - math.sqrt(abar[999]) * x0.double()) / math.sqrt(1 - abar[999])
    expected = math.sqrt(abar[0]) * x0.double() + math.sqrt(1 - abar[0]) * eps
    torch.testing.assert_close(sample.double(), expected, rtol=0, atol=1e-4)
    assert (sample - x0).abs().max() < 0.06


def reference_dpm_solver_pp_2m(eps_fn, z, steps, grid):
    """Multistep DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), float64, on Open-Sora v1's discretisation of
    the linear schedule: continuous time tau in [1/1000, 1] with log alpha(tau) the linear interpolation of
    log sqrt(abar_n) at tau_n = (n + 1) / 1000; grid uniform in tau or in lambda from 1 to 1/1000; the model at
    timestep 1000 (tau - 1/1000); first order on the first step, and on the last when steps < 10."""
    abar = reference_schedule()[1]
    knots = (np.arange(1000) + 1) / 1000

    def log_alpha(tau):
        return np.interp(tau, knots, 0.5 * np.log(abar))

    def lam(tau):  # lambda = log(alpha / sigma)
        return log_alpha(tau) - 0.5 * np.log(1 - np.exp(2 * log_alpha(tau)))

    if grid == "time_uniform":
        taus = np.linspace(1.0, 1 / 1000, steps + 1)
    else:  # invert lambda by bisection: lambda decreases with tau
        taus = []
        for target in np.linspace(lam(1.0), lam(1 / 1000), steps + 1):
            low, high = 1 / 1000, 1.0
            for _ in range(100):
                mid = (low + high) / 2
                low, high = (mid, high) if lam(mid) > target else (low, mid)
            taus.append((low + high) / 2)
    x, history = z.double(), []
    for i in range(steps):
        s, t = taus[i], taus[i + 1]
        alpha_s, sigma_s = np.exp(log_alpha(s)), np.sqrt(1 - np.exp(2 * log_alpha(s)))
        alpha_t, sigma_t = np.exp(log_alpha(t)), np.sqrt(1 - np.exp(2 * log_alpha(t)))
        data = (x - sigma_s * eps_fn(x, 1000 * (s - 1 / 1000))) / alpha_s
        h = lam(t) - lam(s)
        if not history or (steps < 10 and i == steps - 1):
            d = data
        else:
            prev_s, prev_data = history[-1]
            r = (lam(s) - lam(prev_s)) / h
            d = data + (data - prev_data) / (2 * r)
        x = sigma_t / sigma_s * x - alpha_t * np.expm1(-h) * d
        history.append((s, data))
    return x


@pytest.mark.parametrize("grid", ["time_uniform", "logSNR"])
@pytest.mark.parametrize("steps", [10, 20, 7])
def test_dpm_solver_follows_open_soras_time_grid_and_order_schedule(steps, grid):
    y, y_null = torch.randn(2, 1, 3, 6), torch.randn(2, 1, 3, 6)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(17))
    scale = 3.0
    calls = []

    def model(x, t, y, mask=None):
        calls.append(t.clone())
        return conditional_model(x, t, y)

    def guided_eps(x, timestep):
        t = torch.full((2,), timestep, dtype=torch.float64)
        cond, uncond = conditional_model(x, t, y.double())[:, :4], conditional_model(x, t, y_null.double())[:, :4]
        return uncond + scale * (cond - uncond)

    got = DPMSolver(num_sampling_steps=steps, cfg_scale=scale, time_grid=grid).sample(model, z, y, y_null,
                                                                                       progress=False)
    expected = reference_dpm_solver_pp_2m(guided_eps, z, steps, grid)
    assert ((got.double() - expected).norm() / expected.norm()).item() < 1e-5
    # one call per step, at float timesteps from 999 down (time_uniform: evenly spaced, never rounded)
    assert len(calls) == steps and calls[0][0].item() == pytest.approx(999)
    if grid == "time_uniform":
        torch.testing.assert_close(torch.stack([c[0] for c in calls]).double(),
                                   torch.linspace(999, 0, steps + 1, dtype=torch.float64)[:-1])


# ---------------------------------------------------------------- training losses


def test_training_losses_vanish_for_an_exact_model_and_true_variance():
    x0 = randn(*SHAPE, seed=18)
    diffusion = IDDPM()

    def model(x, t, y):
        eps = exact_eps_model(x0, 4)(x, t, y)
        return torch.cat([eps, -torch.ones_like(eps)], 1)  # v = -1: the posterior variance

    t = torch.tensor([1, 700])
    losses = diffusion.training_losses(model, x0, dict(y=torch.randn(2, 1, 3, 6)), t=t, noise=randn(*SHAPE, seed=19))
    assert set(losses) == {"loss", "mse", "vb"}
    assert all(v.shape == (2,) for v in losses.values())
    assert losses["mse"].max() < 1e-18 and losses["vb"].abs().max() < 1e-9 and losses["loss"].abs().max() < 1e-9


def test_training_losses_values_and_detached_mean():
    diffusion = IDDPM()
    x0, noise = randn(*SHAPE, seed=20).clamp(-1, 1), randn(*SHAPE, seed=21)
    output = torch.cat([randn(*SHAPE, seed=22), torch.rand(SHAPE, dtype=torch.float64) * 2 - 1], 1).requires_grad_()
    t = torch.tensor([0, 333])
    losses = diffusion.training_losses(lambda x, t: output * 1.0, x0, None, t=t, noise=noise)
    eps, frac_raw = output.detach()[:, :4], output.detach()[:, 4:]
    np.testing.assert_allclose(losses["mse"].detach().numpy(), ((noise - eps) ** 2).mean((1, 2, 3, 4)).numpy())
    x_t = diffusion.q_sample(x0, t, noise)
    expected_vb = reference_vlb(x0.numpy(), x_t.numpy(), [0, 333], eps.numpy(), frac_raw.numpy())
    np.testing.assert_allclose(losses["vb"].detach().numpy(), expected_vb, rtol=1e-8)
    losses["loss"].sum().backward()
    # the bound does not reach the eps channels: their gradient is the MSE's alone
    expected_grad = 2 * (eps - noise) / eps[0].numel()
    torch.testing.assert_close(output.grad[:, :4], expected_grad, rtol=1e-10, atol=1e-12)
    assert output.grad[:, 4:].abs().max() > 0


def test_training_losses_use_kl_is_the_rescaled_bound_through_the_mean():
    diffusion = IDDPM(use_kl=True)
    x0, noise = randn(*SHAPE, seed=32).clamp(-1, 1), randn(*SHAPE, seed=33)
    output = torch.cat([randn(*SHAPE, seed=34), torch.rand(SHAPE, dtype=torch.float64) * 2 - 1], 1).requires_grad_()
    t = torch.tensor([0, 90])
    losses = diffusion.training_losses(lambda x, t: output * 1.0, x0, t=t, noise=noise)
    x_t = diffusion.q_sample(x0, t, noise)
    eps, frac_raw = output.detach()[:, :4], output.detach()[:, 4:]
    expected = 1000 * reference_vlb(x0.numpy(), x_t.numpy(), [0, 90], eps.numpy(), frac_raw.numpy())
    assert set(losses) == {"loss"}
    np.testing.assert_allclose(losses["loss"].detach().numpy(), expected, rtol=1e-8)
    losses["loss"].sum().backward()
    assert output.grad[:, :4].abs().max() > 0


def test_training_losses_sample_t_from_the_generator_and_map_respaced_steps():
    seen = []

    def model(x, t, y):
        seen.append(t)
        return torch.cat([x, x], 1)

    diffusion = IDDPM(num_sampling_steps=10)
    x0 = randn(5, 4, 1, 3, 3, seed=23)
    diffusion.training_losses(model, x0, dict(y=torch.arange(5)), generator=torch.Generator().manual_seed(24))
    expected_t = torch.randint(0, 10, (5,), generator=torch.Generator().manual_seed(24))
    assert torch.equal(seen[0], diffusion.timestep_map[expected_t])
    diffusion.training_losses(model, x0, dict(y=torch.arange(5)), t=torch.tensor([9, 0, 1, 2, 3]))
    assert seen[1].tolist() == [999, 0, 111, 222, 333]


def test_training_losses_without_learned_sigma_is_plain_mse():
    diffusion = IDDPM(learn_sigma=False)
    x0, noise, output = randn(*SHAPE, seed=25), randn(*SHAPE, seed=26), randn(*SHAPE, seed=27)
    losses = diffusion.training_losses(lambda x, t: output, x0, t=torch.tensor([3, 4]), noise=noise)
    assert set(losses) == {"loss", "mse"}
    np.testing.assert_allclose(losses["loss"].numpy(), ((noise - output) ** 2).mean((1, 2, 3, 4)).numpy())


# ---------------------------------------------------------------- configuration errors


def test_build_scheduler():
    iddpm = build_scheduler(dict(type="iddpm", num_sampling_steps=100, cfg_scale=7.0))
    assert isinstance(iddpm, IDDPM) and iddpm.num_timesteps == 100 and iddpm.cfg_scale == 7.0
    solver = build_scheduler(dict(type="dpm-solver", num_sampling_steps=20, cfg_scale=4.0, cfg_channel=3))
    assert isinstance(solver, DPMSolver) and solver.num_sampling_steps == 20 and solver.cfg_channel == 3


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(type="ddim"), r"unknown scheduler type 'ddim'; valid types: iddpm, dpm-solver"),
        (dict(num_sampling_steps=10), r"unknown scheduler type None"),
        (dict(type="iddpm", num_steps=10), r"unknown argument\(s\) num_steps for scheduler 'iddpm'; valid: num_sampling_steps"),
        (dict(type="dpm-solver", timestep_respacing="10"), r"timestep_respacing for scheduler 'dpm-solver'; valid: .*cfg_channel"),
        (dict(type="iddpm", cfg_scale="7"), r"cfg_scale must be a finite number, got '7'"),
        (dict(type="dpm-solver", cfg_scale=float("nan")), r"cfg_scale must be a finite number"),
        (dict(type="iddpm", num_sampling_steps=0), r"num_sampling_steps must be an int in \[1, 1000\], got 0"),
        (dict(type="dpm-solver", num_sampling_steps=1001), r"got 1001"),
        (dict(type="iddpm", num_sampling_steps=2.5), r"got 2.5"),
        (dict(type="iddpm", num_sampling_steps=10, timestep_respacing="10"), r"not both"),
        (dict(type="iddpm", timestep_respacing="fast"), r"timestep_respacing must be"),
        (dict(type="iddpm", timestep_respacing="ddim600"), r"no integer stride gives 600"),
        (dict(type="iddpm", cfg_channel=0), r"cfg_channel must be None or a positive int, got 0"),
        (dict(type="iddpm", noise_schedule="cosine"), r"noise_schedule must be one of"),
        (dict(type="iddpm", learn_sigma="yes"), r"learn_sigma must be True or False"),
        (dict(type="dpm-solver", time_grid="karras"), r"time_grid must be one of time_uniform, logSNR, got 'karras'"),
    ],
)
def test_build_scheduler_rejects_bad_configs(cfg, message):
    with pytest.raises(ValueError, match=message):
        build_scheduler(cfg)


def test_sample_rejects_mismatched_inputs():
    diffusion = IDDPM(num_sampling_steps=2)
    z, y = torch.randn(SHAPE), torch.randn(2, 1, 3, 6)
    with pytest.raises(ValueError, match="y_null must be a tensor with z's batch size 2"):
        diffusion.sample(conditional_model, z, y, torch.randn(1, 1, 3, 6), progress=False)
    with pytest.raises(ValueError, match=r"model output must be \(2, 8, 3, 4, 5\)"):
        diffusion.sample(lambda x, t, y: x, z, y, y, progress=False)
    with pytest.raises(ValueError, match="cfg_channel=9 exceeds the model's 8 output channels"):
        IDDPM(num_sampling_steps=2, cfg_channel=9).sample(conditional_model, z, y, y, progress=False)
    with pytest.raises(ValueError, match="model_kwargs must be a dict"):
        diffusion.training_losses(conditional_model, z, torch.tensor([1, 2]))


# ---------------------------------------------------------------- no host synchronisation in the loop


@pytest.mark.parametrize("make", [lambda: IDDPM(num_sampling_steps=5), lambda: DPMSolver(num_sampling_steps=5),
                                  lambda: DPMSolver(num_sampling_steps=12, time_grid="logSNR")])
def test_sampling_loop_reads_nothing_back_from_the_tensors(make, monkeypatch):
    """On CUDA, reading a tensor's value on the host (.item(), bool(), int(), .tolist(), .cpu(), numpy) waits
    for the GPU: the denoising loop must not. Here any such read raises, and sampling still works."""
    y, y_null, z = torch.randn(2, 1, 3, 6), torch.randn(2, 1, 3, 6), torch.randn(SHAPE)
    scheduler = make()
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    expected = scheduler.sample(conditional_model, z, y, y_null, progress=False, generator=generators)

    def host_read(*args, **kwargs):
        raise AssertionError("the sampling loop read a tensor's value on the host")

    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    got = scheduler.sample(conditional_model, z, y, y_null, progress=False, generator=generators)
    monkeypatch.undo()
    assert torch.equal(got, expected)


# ---------------------------------------------------------------- masked diffusion (Open-Sora v1.1)

MASKED_SHAPE = (3, 2, 5, 3, 2)  # (B, C, T, H, W)
FRAME_MASK = torch.tensor([[True, False, True, True, False], [True] * 5, [False, False, False, False, True]])


def recording_model(output, calls):
    def model(x, t, **kwargs):
        calls.append(dict(x=x.clone(), t=t.clone(), **kwargs))
        return output * 1.0

    return model


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-8), (torch.float32, 2e-4)])
def test_masked_training_losses_match_a_float64_reference(dtype, rtol):
    """Open-Sora v1.1's masked loss: condition frames noised to step 0 with the same noise, x_mask = the mask,
    mse and vb over the generated frames. Open-Sora computes its coefficients in float32, within 6.4e-5 of
    these float64 ones (sqrt_recipm1_alphas_cumprod at small t); float32 inputs are held to that rounding."""
    diffusion = IDDPM()
    shape2 = (MASKED_SHAPE[0], 2 * MASKED_SHAPE[1], *MASKED_SHAPE[2:])
    x0, noise = randn(*MASKED_SHAPE, seed=40).clamp(-1, 1), randn(*MASKED_SHAPE, seed=41)
    output = torch.cat([randn(*MASKED_SHAPE, seed=42), torch.rand(MASKED_SHAPE, dtype=torch.float64) * 2 - 1], 1)
    assert output.shape == shape2
    t = torch.tensor([0, 500, 7])
    calls = []
    losses = diffusion.training_losses(recording_model(output.to(dtype), calls), x0.to(dtype), dict(y=1), t=t,
                                       noise=noise.to(dtype), frame_mask=FRAME_MASK)

    _, abar, _, _ = reference_schedule()
    frames = FRAME_MASK.numpy()[:, None, :, None, None]
    a = np.where(frames, bcast(abar, t, 5), abar[0])
    x_t = np.sqrt(a) * x0.numpy() + np.sqrt(1 - a) * noise.numpy()
    np.testing.assert_allclose(calls[0]["x"].double().numpy(), x_t, rtol=rtol, atol=rtol)
    assert torch.equal(calls[0]["x_mask"], FRAME_MASK) and calls[0]["y"] == 1
    eps, frac_raw = output[:, :2].numpy(), output[:, 2:].numpy()
    expected_mse = [reference_mean((noise.numpy()[i] - eps[i]) ** 2, FRAME_MASK[i].numpy()) for i in range(3)]
    expected_vb = reference_vlb(x0.numpy(), x_t, t.tolist(), eps, frac_raw, FRAME_MASK.numpy())
    np.testing.assert_allclose(losses["mse"].double().numpy(), expected_mse, rtol=rtol)
    np.testing.assert_allclose(losses["vb"].double().numpy(), expected_vb, rtol=rtol)
    np.testing.assert_allclose(losses["loss"].double().numpy(), np.add(expected_mse, expected_vb), rtol=rtol)


def test_an_all_true_training_mask_is_the_unmasked_loss_plus_x_mask():
    diffusion = IDDPM()
    x0, noise = randn(*MASKED_SHAPE, seed=43).clamp(-1, 1), randn(*MASKED_SHAPE, seed=44)
    output = torch.cat([randn(*MASKED_SHAPE, seed=45), torch.rand(MASKED_SHAPE, dtype=torch.float64) * 2 - 1], 1)
    t, calls = torch.tensor([3, 999, 0]), []
    masked = diffusion.training_losses(recording_model(output, calls), x0, t=t, noise=noise,
                                       frame_mask=torch.ones(3, 5, dtype=torch.bool))
    plain = diffusion.training_losses(recording_model(output, calls), x0, t=t, noise=noise)
    for key in ("mse", "vb", "loss"):
        torch.testing.assert_close(masked[key], plain[key], rtol=1e-12, atol=0)
    assert torch.equal(calls[0]["x"], calls[1]["x"]) and calls[0]["x_mask"].all() and "x_mask" not in calls[1]


@pytest.mark.parametrize("frame_mask, message", [
    (torch.ones(3, 4, dtype=torch.bool), r"frame_mask must be a \(B, T\) tensor"),
    (torch.ones(3, 5), "frame_mask must be a bool tensor"),
    (torch.tensor([[True] * 5, [False] * 5, [True] * 5]), "at least one frame to generate"),
])
def test_masked_training_rejects_bad_masks(frame_mask, message):
    x0 = randn(*MASKED_SHAPE, seed=46)
    with pytest.raises(ValueError, match=message):
        IDDPM().training_losses(lambda x, t, **kw: torch.cat([x, x], 1), x0, frame_mask=frame_mask)
    with pytest.raises(ValueError, match="frame_mask needs the hybrid loss"):
        IDDPM(use_kl=True).training_losses(lambda x, t, **kw: x, x0, frame_mask=torch.ones(3, 5, dtype=torch.bool))


def masked_toy_model(calls):
    def model(x, t, y, x_mask=None, height=None):
        calls.append(dict(x=x.clone(), t=t.clone(), x_mask=x_mask, height=height))
        return conditional_model(x, t, y)

    return model


def test_an_all_ones_sampling_mask_samples_what_no_mask_samples():
    """Open-Sora v1.1 draws a re-noising tensor at every step even for an all-ones mask, so its masked sampler
    gives another video for the same seed; here the re-noising noise is drawn only for steps that release a
    frame, so the all-ones mask is the unmasked computation."""
    diffusion = IDDPM(num_sampling_steps=6)
    z, y, y_null = randn(*MASKED_SHAPE, seed=47), torch.randn(3, 1, 3, 6), torch.randn(3, 1, 3, 6)
    for make_generator in (lambda: torch.Generator().manual_seed(5),
                           lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]):
        calls = []
        plain = diffusion.sample(masked_toy_model(calls), z, y, y_null, progress=False, generator=make_generator())
        masked = diffusion.sample(masked_toy_model(calls), z, y, y_null, progress=False, generator=make_generator(),
                                  frame_mask=torch.ones(3, 5))
        assert torch.equal(masked, plain)
        assert all(c["x_mask"] is None for c in calls[:6]) and all(c["x_mask"].all() for c in calls[6:])


def test_masked_sampling_holds_renoises_and_releases_frames_on_open_soras_schedule():
    steps = 10
    diffusion = IDDPM(num_sampling_steps=steps)
    ratios = torch.tensor([[0.0, 0.3, 1.0, 0.55, 0.3], [1.0, 1.0, 0.19, 1.0, 1.0]])
    release = [[0, 3, 10, 5, 3], [10, 10, 1, 10, 10]]  # int(ratio * steps), in float32 as Open-Sora
    z = randn(2, *MASKED_SHAPE[1:], seed=48)
    y, calls = torch.randn(2, 1, 3, 6), []
    generators = [torch.Generator().manual_seed(s) for s in (8, 9)]
    out = diffusion.sample(masked_toy_model(calls), z, y, y, progress=False, generator=generators, frame_mask=ratios,
                           model_kwargs=dict(height=torch.tensor([4.0, 5.0])))
    assert len(calls) == steps
    for call, i in zip(calls, range(steps - 1, -1, -1)):
        x = call["x"][:2]  # the conditional half of the doubled batch
        assert torch.equal(call["height"], torch.tensor([4.0, 5.0, 4.0, 5.0]))
        expected_x_mask = torch.tensor(release) > i
        assert torch.equal(call["x_mask"], torch.cat([expected_x_mask, expected_x_mask]))
        for b in range(2):
            for f in range(5):
                if release[b][f] > i:
                    continue
                frame = x[b, :, f]
                if release[b][f] < i:  # held: exactly the reference
                    assert torch.equal(frame, z[b, :, f]), (i, b, f)
                else:  # released now: the reference at step i's noise level
                    a = diffusion.alphas_cumprod[i]
                    residual = (frame - a.sqrt() * z[b, :, f]) / (1 - a).sqrt()
                    assert not torch.equal(frame, z[b, :, f]) and abs(residual.std() - 1) < 0.6, (i, b, f)
    # frames of ratio 0 are released at the last step: the output there is the model's, not the reference
    assert not torch.equal(out[0, :, 0], z[0, :, 0])
    # sample 1 alone, with its own generator, samples the same: its noise does not depend on its batch
    alone = diffusion.sample(masked_toy_model([]), z[1:], y[1:], y[1:], progress=False,
                             generator=[torch.Generator().manual_seed(9)], frame_mask=ratios[1:],
                             model_kwargs=dict(height=torch.tensor([5.0])))
    torch.testing.assert_close(alone, out[1:], rtol=1e-12, atol=1e-12)


def test_held_condition_frames_stay_the_reference_and_the_rest_keep_open_soras_schedule():
    """hold_condition_frames=True: frames of ratio 0 are condition at every step and the output there is the
    reference; every other frame is held, re-noised and released as without it."""
    steps = 10
    ratios = torch.tensor([[0.0, 0.3, 1.0, 0.0, 0.3], [1.0, 1.0, 0.19, 1.0, 0.0]])
    release = torch.tensor([[-1, 3, 10, -1, 3], [10, 10, 1, 10, -1]])
    z, y = randn(2, *MASKED_SHAPE[1:], seed=51), torch.randn(2, 1, 3, 6)
    calls, open_sora_calls = [], []
    out = IDDPM(num_sampling_steps=steps, hold_condition_frames=True).sample(
        masked_toy_model(calls), z, y, y, progress=False, generator=torch.Generator().manual_seed(3),
        frame_mask=ratios)
    IDDPM(num_sampling_steps=steps).sample(masked_toy_model(open_sora_calls), z, y, y, progress=False,
                                           generator=torch.Generator().manual_seed(3), frame_mask=ratios)
    held = (release == -1)[:, None, :, None, None].expand_as(z)
    for call, open_sora_call, i in zip(calls, open_sora_calls, range(steps - 1, -1, -1)):
        assert torch.equal(call["x_mask"][:2], release > i), i
        assert torch.equal(call["x"][:2][held], z[held]), i
        if i > 0:  # up to the last step, the same computation as Open-Sora's schedule
            assert torch.equal(call["x"], open_sora_call["x"]), i
    assert torch.equal(out[held], z[held])
    assert not torch.equal(out[~held], z[~held]) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="hold_condition_frames must be True or False, got 'yes'"):
        IDDPM(hold_condition_frames="yes")


@pytest.mark.parametrize("frame_mask, message", [
    (torch.ones(2, 4), r"frame_mask must be a \(B, T\) tensor"),
    (torch.full((2, 5), 1.5), r"frame_mask must hold edit ratios: floats in \[0, 1\]"),
    (torch.ones(2, 5, dtype=torch.bool), r"frame_mask must hold edit ratios"),
])
def test_masked_sampling_rejects_bad_masks(frame_mask, message):
    z, y = randn(2, *MASKED_SHAPE[1:], seed=49), torch.randn(2, 1, 3, 6)
    with pytest.raises(ValueError, match=message):
        IDDPM(num_sampling_steps=2).sample(masked_toy_model([]), z, y, y, progress=False, frame_mask=frame_mask)


def test_dpm_solver_refuses_a_frame_mask_and_passes_model_kwargs():
    z, y, calls = randn(2, *MASKED_SHAPE[1:], seed=50), torch.randn(2, 1, 3, 6), []
    with pytest.raises(ValueError, match="^dpm-solver cannot sample with a frame mask .*use scheduler type 'iddpm'"):
        DPMSolver(num_sampling_steps=2).sample(masked_toy_model(calls), z, y, y, progress=False,
                                               frame_mask=torch.ones(2, 5))
    DPMSolver(num_sampling_steps=2).sample(masked_toy_model(calls), z, y, y, progress=False,
                                           model_kwargs=dict(height=torch.tensor([1.0, 2.0]), x_mask=None))
    assert torch.equal(calls[0]["height"], torch.tensor([1.0, 2.0, 1.0, 2.0])) and calls[0]["x_mask"] is None
