import pytest
import torch
from diffusers import AutoencoderKL

from sora.models.vae import TINY_VAE_CONFIG, VideoAutoencoderKL, build_vae


@pytest.fixture(scope="module")
def vae():
    return build_vae(dict(type="VideoAutoencoderKL", config=TINY_VAE_CONFIG))


@pytest.fixture(scope="module")
def video():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 3, 16, 24, generator=generator) * 2 - 1  # (B, C, T, H, W) in [-1, 1]


def reference_autoencoder():
    torch.manual_seed(0)  # what config= builds with
    return AutoencoderKL(**TINY_VAE_CONFIG)


def frames(x):
    return x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B, C, T, H, W) -> (B*T, C, H, W)


def test_attributes(vae):
    assert vae.out_channels == 4 and vae.patch_size == (1, 8, 8) and vae.scaling_factor == 0.18215
    assert vae.get_latent_size((16, 256, 512)) == (16, 32, 64)
    assert not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(ValueError, match=r"\(T, H, W\) = \(16, 250, 256\): H and W must be multiples of 8"):
        vae.get_latent_size((16, 250, 256))


def test_matches_diffusers_per_frame(vae, video):
    model = reference_autoencoder()
    with torch.no_grad():
        z = vae.encode(video)
        mean = model.encode(frames(video)).latent_dist.mean  # (B*T, 4, h, w)
        expected_z = (mean * 0.18215).unflatten(0, (2, 3)).permute(0, 2, 1, 3, 4)
        assert z.shape == (2, 4, 3, 2, 3)
        torch.testing.assert_close(z, expected_z, rtol=1e-5, atol=1e-6)
        decoded = vae.decode(z)
        expected_video = model.decode(frames(z) / 0.18215).sample.unflatten(0, (2, 3)).permute(0, 2, 1, 3, 4)
        assert decoded.shape == video.shape
        torch.testing.assert_close(decoded, expected_video, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("micro_batch_size", [1, 4])
def test_micro_batches_equal_all_at_once(vae, video, micro_batch_size):
    chunked = VideoAutoencoderKL(config=TINY_VAE_CONFIG, micro_batch_size=micro_batch_size)
    with torch.no_grad():
        z = vae.encode(video)
        torch.testing.assert_close(chunked.encode(video), z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chunked.decode(z), vae.decode(z), rtol=1e-5, atol=1e-5)
        sampled = chunked.encode(video, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(sampled, vae.encode(video, generator=torch.Generator().manual_seed(3)))


def test_posterior_sample_is_reproducible(vae, video):
    model = reference_autoencoder()
    with torch.no_grad():
        sample = vae.encode(video, generator=torch.Generator().manual_seed(7))
        posterior = model.encode(frames(video)).latent_dist
        noise = torch.randn(2, 4, 3, 2, 3, generator=torch.Generator().manual_seed(7))
        std = posterior.std.unflatten(0, (2, 3)).permute(0, 2, 1, 3, 4)
        mean = posterior.mean.unflatten(0, (2, 3)).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(sample, (mean + std * noise) * 0.18215, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(sample, vae.encode(video))


def test_seeded_config_leaves_global_rng(video):
    torch.manual_seed(11)
    expected = torch.rand(2)
    torch.manual_seed(11)
    a = VideoAutoencoderKL(config=TINY_VAE_CONFIG)
    assert torch.equal(torch.rand(2), expected)
    b = VideoAutoencoderKL(config=TINY_VAE_CONFIG)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_save_load_round_trip(vae, video, tmp_path):
    vae.module.save_pretrained(tmp_path / "sd" / "vae")
    for loaded in (
        VideoAutoencoderKL(from_pretrained=str(tmp_path / "sd" / "vae"), micro_batch_size=2),
        build_vae(dict(type="VideoAutoencoderKL", from_pretrained=str(tmp_path / "sd"), subfolder="vae")),
    ):
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode(video), vae.encode(video), rtol=1e-5, atol=1e-6)


def test_errors(vae, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"VAE not found: .*nope is not a folder with config\.json and weights"):
        VideoAutoencoderKL(from_pretrained=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"VAE folder .* holds no model: expected config\.json and weights"):
        VideoAutoencoderKL(from_pretrained=str(tmp_path))
    offline = r"offline \(HF_HUB_OFFLINE is set\) and not in the Hugging Face cache"
    with pytest.raises(FileNotFoundError, match=f"could not load VAE 'no-such-org/no-such-vae': {offline}"):
        VideoAutoencoderKL(from_pretrained="no-such-org/no-such-vae")
    with pytest.raises(ValueError, match="set exactly one of from_pretrained"):
        VideoAutoencoderKL()
    with pytest.raises(ValueError, match="micro_batch_size must be a positive integer or None, got 0"):
        VideoAutoencoderKL(config=TINY_VAE_CONFIG, micro_batch_size=0)
    with pytest.raises(ValueError, match=r"x must be \(B, 3, T, H, W\), got shape \(2, 3, 16, 16\)"):
        vae.encode(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"z must be \(B, 4, T, H, W\), got shape \(1, 3, 1, 2, 2\)"):
        vae.decode(torch.zeros(1, 3, 1, 2, 2))
    with pytest.raises(ValueError, match=r"unknown argument\(s\) micro_batch for vae 'VideoAutoencoderKL'"):
        build_vae(dict(type="VideoAutoencoderKL", config=TINY_VAE_CONFIG, micro_batch=2))
    with pytest.raises(ValueError, match="unknown vae type 'VideoAutoencoderKLTemporalDecoder'"):
        build_vae(dict(type="VideoAutoencoderKLTemporalDecoder"))


def test_tiny_config_file(tmp_path, video):
    """The form configs/tiny/*.py use: the constant imported into the config file."""
    from sora.config import format_config, load_config

    path = tmp_path / "tiny.py"
    path.write_text(
        "from sora.models.vae import TINY_VAE_CONFIG\n"
        "vae = dict(type='VideoAutoencoderKL', config=TINY_VAE_CONFIG, micro_batch_size=2)\n"
    )
    cfg = load_config(path)
    assert list(cfg) == ["vae"] and cfg.vae.config == TINY_VAE_CONFIG
    (tmp_path / "again.py").write_text(format_config(cfg))
    assert load_config(tmp_path / "again.py") == cfg
    with torch.no_grad():
        torch.testing.assert_close(build_vae(cfg.vae).encode(video), VideoAutoencoderKL(config=TINY_VAE_CONFIG).encode(video))


def test_pixel_vae_pools_and_upsamples():
    vae = build_vae(dict(type="PixelVAE", factor=4))
    x = torch.rand(2, 3, 3, 8, 12) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 3, 3, 2, 3)
    assert vae.get_latent_size((3, 8, 12)) == (3, 2, 3)
    # Latent pixel (h, w) is the mean of its 4x4 block.
    torch.testing.assert_close(z[1, 2, 2, 1, 2], x[1, 2, 2, 4:8, 8:12].mean())
    # Decoding a latent of constant colour gives that colour everywhere; decode inverts encode on such frames.
    flat = torch.full((1, 3, 2, 2, 3), 0.25)
    torch.testing.assert_close(vae.decode(flat), torch.full((1, 3, 2, 8, 12), 0.25))
    torch.testing.assert_close(vae.encode(vae.decode(flat)), flat)
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(torch.zeros(1, 3, 1, 6, 8))
