"""scripts/cache_quality.py on a tiny model with random (non-zero) weights: threshold 0 and the repeated uncached
run sample the uncached videos exactly (PSNR inf, SSIM 1, every step a model call), a cache that skips gives other
videos, and a bad setting exits 2 with one line before anything is sampled."""

import contextlib
import io
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


@pytest.fixture(scope="module")
def cache_quality():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import cache_quality
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    return cache_quality


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, checkpoint file): a one-block STDiT at 32x32 sampling STEPS steps, with random weights, without
    the layernorm kernel (interpreted here, it would take minutes)."""
    from sora.config import load_config
    from sora.launch import build_components, setup

    folder = tmp_path_factory.mktemp("cache_quality")
    config = folder / "tiny.py"
    config.write_text(f"_base_ = {os.path.join(ROOT, 'configs', 'tiny', 'sample.py')!r}\nimage_size = (32, 32)\n"
                      "model = dict(depth=1, hidden_size=32, num_heads=2, enable_layernorm_kernel=False)\n"
                      f"scheduler = dict(num_sampling_steps={STEPS})\n")
    cfg = load_config(str(config))
    cfg.sp_size, cfg.seed = 1, 0
    model = build_components(cfg, setup(cfg))[0]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # the zero-initialised output layer would make every step's output the same
    torch.save({"ema": model.state_dict()}, folder / "tiny.pth")
    return str(config), str(folder / "tiny.pth")


def test_threshold_zero_is_the_uncached_video_and_a_skipping_cache_is_not(cache_quality, tiny, capsys):
    config, checkpoint = tiny
    cache_quality.main([checkpoint, "--config", config, "--seeds", "1", "--settings", "delta:0", "interval:2"])
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")}
    # name, calls, fewer calls, wall-clock ratio, CPU time ratio, PSNR mean / min, SSIM mean / min
    assert rows["delta:0"][1:3] == [f"{STEPS}.0 of {STEPS}", "1.00x"]
    assert rows["delta:0"][5:7] == rows["none, again"][5:7] == ["inf / inf", "1.0000 / 1.0000"]
    assert rows["interval:2"][1] == f"4.0 of {STEPS}"  # steps 0, 2, 4 and the last
    psnr_mean, psnr_min = map(float, rows["interval:2"][5].split(" / "))
    assert psnr_min <= psnr_mean < 100 and float(rows["interval:2"][6].split(" / ")[1]) < 1


@pytest.mark.parametrize("setting, message", [
    ("often:1", "error: setting 'often:1' is not TRIGGER:VALUE with TRIGGER one of delta, first_block, interval"),
    ("delta", "error: setting 'delta' is not TRIGGER:VALUE"),
    ("delta:abc", "error: setting 'delta:abc': 'abc' is not a number"),
    ("interval:2.5", "error: setting 'interval:2.5': '2.5' is not an integer"),
    ("delta:-1", "error: setting 'delta:-1': cache threshold must be a finite number >= 0, got -1.0."),
    ("interval:0", "error: setting 'interval:0': cache every must be an int >= 1 with trigger 'interval', got 0."),
])
def test_a_bad_setting_exits_2_with_one_line(cache_quality, setting, message, monkeypatch):
    def sample_seed(*args, **kwargs):
        raise AssertionError("sampled before the settings were checked")

    monkeypatch.setattr(cache_quality, "sample_seed", sample_seed)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        cache_quality.main(["CHECKPOINT", "--settings", "delta:0.1", setting])
    assert exit_info.value.code == 2
    assert stderr.getvalue().count("\n") == 1 and stderr.getvalue().startswith(message)
