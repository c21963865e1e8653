"""configs/opensora-v1-1: every config loads and validates, its model builds (on the meta device: no weights),
and its buckets, mask ratios and scheduler are accepted by the pieces that use them."""

import glob

import pytest
import torch

from sora.config import parse_args
from sora.data import Bucket
from sora.masks import MaskGenerator
from sora.models import build_model
from sora.reference import Conditioning
from sora.schedulers import build_scheduler
from sora.train import check_bucket_frames

CONFIGS = sorted(glob.glob("configs/opensora-v1-1/*/*.py"))


def test_the_v11_configs_are_all_there():
    names = {path.split("configs/opensora-v1-1/")[1] for path in CONFIGS}
    assert names == {"inference/sample.py", "inference/sample-ref.py", "train/stage1.py", "train/stage2.py",
                     "train/stage3.py", "train/image.py", "train/video.py"}


@pytest.mark.parametrize("path", CONFIGS)
def test_v11_config_builds(path):
    mode = "train" if "/train/" in path else "sample"
    cfg = parse_args([path], mode)
    model = {k: v for k, v in cfg.model.items() if k != "from_pretrained"}
    with torch.device("meta"):
        built = build_model(model, caption_channels=4096, model_max_length=200)
    assert type(built).__name__ == "STDiT2" and built.input_sq_size == 512
    assert build_scheduler(cfg.scheduler).num_timesteps == (1000 if mode == "train" else 100)
    if mode == "train":
        Bucket(cfg.bucket_config)
        check_bucket_frames(cfg)
        assert (cfg.mask_ratios is not None) == ("stage" in path)
        if cfg.mask_ratios:
            MaskGenerator(cfg.mask_ratios)
    else:
        assert cfg.multi_resolution == "STDiT2" and cfg.fps // cfg.frame_interval == 8


def test_sample_ref_strategies_parse_and_its_json_prompt_sets_a_reference(monkeypatch):
    cfg = parse_args(["configs/opensora-v1-1/inference/sample-ref.py"], "sample")
    monkeypatch.setattr("sora.reference.read_reference", lambda path, size: torch.zeros(3, 1, *size))
    conditioning = Conditioning(cfg.prompt, cfg.reference_path, cfg.mask_strategy, cfg.image_size, cfg.loop,
                                cfg.condition_frame_length)
    assert [len(paths) for paths in conditioning.paths] == [1, 1, 1] and conditioning.texts[1][0].endswith("Highway.")
