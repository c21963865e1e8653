"""configs/tiny/stdit2: a few training steps with buckets (images and clips at 144p and 256) and masks, then
text-to-video (scored by scripts/score_tiny.py), image-to-video and a 2-loop extension from the checkpoint,
scored by scripts/score_i2v.py; and the synthetic generator's --append that makes the mixed set."""

import csv
import functools
import os
import runpy

import pytest

from sora.data.synthetic import make_synthetic_dataset
from sora.data.video import read_video
from sora.launch import main
from sora.models.stdit2 import STDiT2
from sora import sample, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "tiny", "stdit2")
VOCABULARY = dict(colors=("red", "green", "blue"), shapes=("square",), motions=("moving left", "moving right"),
                  shape_size=0.2)
# The configs' model made smaller still, in PyTorch only (the suite would run the layer-norm kernel under the
# Triton interpreter), and two samples of every bucket per batch.
SMALL_MODEL = dict(depth=1, hidden_size=48, num_heads=2, enable_layernorm_kernel=False)
MODEL_FLAGS = [arg for key, value in SMALL_MODEL.items() for arg in (f"--model.{key}", str(value))]
BUCKETS = "{'144p': {1: (1.0, 2), 8: (1.0, 2)}, '256': {8: (1.0, 2)}}"


def score_module(name):
    return runpy.run_path(os.path.join(ROOT, "scripts", name))


@pytest.fixture(scope="module")
def mixed_set(tmp_path_factory):
    """Two clips of 17 frames at 192x192, two at 256x256, two images at 192x192: each fills one bucket."""
    folder = str(tmp_path_factory.mktemp("tiny2"))
    make_synthetic_dataset(folder, num_videos=2, num_frames=17, size=192, seed=0, **VOCABULARY)
    make_synthetic_dataset(folder, num_videos=2, num_frames=17, size=256, seed=1, append=True, **VOCABULARY)
    return make_synthetic_dataset(folder, num_videos=2, num_frames=1, size=192, seed=2, append=True, **VOCABULARY)


@pytest.fixture(scope="module")
def checkpoint(mixed_set, tmp_path_factory):
    """(checkpoint folder, {(T, h, w) of the latents the model trained on}, [x_mask of each training call])."""
    out = tmp_path_factory.mktemp("runs")
    seen, masks = set(), []
    forward = STDiT2.forward

    @functools.wraps(forward)  # train checks the signature for x_mask
    def spy(self, x, *args, **kwargs):
        if self.training:
            seen.add(tuple(x.shape[2:]))
            masks.append(kwargs.get("x_mask"))
        return forward(self, x, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(STDiT2, "forward", spy)
        main(train.run, "train", [os.path.join(CONFIGS, "train.py"), "--data-path", mixed_set, "--outputs", str(out),
                                  *MODEL_FLAGS, "--bucket-config", BUCKETS, "--num-workers", "0", "--max-steps", "3",
                                  "--ckpt-every", "3"])
    (run,) = out.iterdir()
    return run / "epoch0-global_step3", seen, masks


def test_append_numbers_new_clips_after_the_rows_kept(tmp_path):
    make_synthetic_dataset(str(tmp_path), num_videos=2, num_frames=4, size=32, **VOCABULARY)
    csv_path = make_synthetic_dataset(str(tmp_path), num_videos=1, num_frames=1, size=48, append=True, **VOCABULARY)
    with open(csv_path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["path"], r["num_frames"], r["height"]) for r in rows] == [
        ("clip_0000.mp4", "4", "32"), ("clip_0001.mp4", "4", "32"), ("clip_0002.mp4", "1", "48")]
    assert read_video(str(tmp_path / "clip_0002.mp4"))[0].shape == (1, 48, 48, 3)
    csv_path = make_synthetic_dataset(str(tmp_path), num_videos=1, num_frames=4, size=32, **VOCABULARY)
    with open(csv_path, newline="") as file:
        assert [r["path"] for r in csv.DictReader(file)] == ["clip_0000.mp4"]  # without append: replaced


def test_trains_on_both_resolutions_images_and_clips_with_masks(checkpoint):
    ckpt, seen, masks = checkpoint
    assert sorted(os.listdir(ckpt)) == ["ema.pt", "model", "optimizer", "running_states.json"]
    # PixelVAE(16): 144p (192x192) -> 12x12 latents, 256 -> 16x16; images are one frame
    assert seen == {(1, 12, 12), (8, 12, 12), (8, 16, 16)}
    assert len(masks) == 3 and all(m is not None for m in masks)


def test_samples_text_image_and_loop_from_the_checkpoint(checkpoint, mixed_set, tmp_path, capsys):
    ckpt = str(checkpoint[0])
    config = tmp_path / "sample.py"
    config.write_text(f"_base_ = {os.path.join(CONFIGS, 'sample.py')!r}\nmodel = dict(type='STDiT2', "
                      + ", ".join(f"{k}={v}" for k, v in SMALL_MODEL.items())
                      + ", patch_size=(1, 2, 2), input_sq_size=256, qk_norm=True)\n"
                      "scheduler = dict(type='iddpm', num_sampling_steps=1, cfg_scale=4.0)\nbatch_size = 6\n")
    counts = score_module("score_tiny.py")["score"](ckpt, [1], config=str(config))
    assert counts["samples"] == 6 and "6 samples: colour right" in capsys.readouterr().out

    reference = os.path.join(os.path.dirname(mixed_set), "clip_0004.mp4")  # the first image
    common = [str(config), "--ckpt-path", ckpt, "--prompt", "a red square moving left"]
    main(sample.run, "sample", [*common, "--save-dir", str(tmp_path / "i2v"), "--reference-path", reference,
                                "--mask-strategy", "0"])
    scores = score_module("score_i2v.py")["first_frame"](str(tmp_path / "i2v" / "sample_0000.mp4"), reference, 16)
    # frame 0 is the reference's latent, held to the end (hold_condition_frames): only the VAE stand-in and mp4
    # coding stand between them
    assert abs(scores["psnr"] - scores["vae_psnr"]) < 0.1 and scores["vae_psnr"] > 15

    main(sample.run, "sample", [*common, "--save-dir", str(tmp_path / "loop"), "--loop", "2",
                                "--condition-frame-length", "2"])
    looped = str(tmp_path / "loop" / "sample_0000.mp4")
    assert read_video(looped)[0].shape == (8 + 8 - 2, 192, 192, 3)
    seam = score_module("score_i2v.py")["seam"](looped, 8)
    assert seam["seam_change"] >= 0 and seam["median_change"] >= 0


def test_score_i2v_bad_seam_is_one_line_and_exit_code_2(tmp_path, capsys):
    make_synthetic_dataset(str(tmp_path), num_videos=1, num_frames=4, size=32, **VOCABULARY)
    video = tmp_path / "clip_0000.mp4"
    with pytest.raises(SystemExit) as exit_:
        score_module("score_i2v.py")["main"]([str(video), "--seam-at", "4"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --seam-at 4 must be in [1, 3] of a video of 3 or more frames, {video} has 4"]
