"""Open-Sora v1.1's reference conditioning (sora.reference) and `python -m sora.sample` with references,
mask strategies and loops: parsing, the frames written, one line and exit code 2 for bad input, and sampling
end to end with a small model that takes x_mask."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

import sora.sample
from sora.data.video import write_video
from sora.launch import main
from sora.models.vae import PixelVAE
from sora.reference import (Conditioning, MaskGroup, apply_mask_strategy, loop_prompts, parse_mask_strategy,
                            prompt_options, read_reference)
from sora.sample import run, sample_videos
from sora.schedulers import IDDPM

TINY = "configs/tiny/sample.py"


# ---------------------------------------------------------------- mask strategies, loop prompts


@pytest.mark.parametrize("text, groups", [
    ("0", [MaskGroup(0, 0, 0, 0, 1, 0.0)]),  # image-to-video
    ("0,0,0,1,0", [MaskGroup(0, 0, 0, 1, 0, 0.0)]),  # five fields: target 1, length 0 (Open-Sora #390)
    ("0,0,0,-8,8", [MaskGroup(0, 0, 0, -8, 8, 0.0)]),
    ("0;0,1,0,-1,1", [MaskGroup(0, 0, 0, 0, 1, 0.0), MaskGroup(0, 1, 0, -1, 1, 0.0)]),  # connect two images
    ("0,0,0,0,32,0.4", [MaskGroup(0, 0, 0, 0, 32, 0.4)]),
    (None, []),
])
def test_mask_strategy_fields_and_their_defaults(text, groups):
    assert parse_mask_strategy(text) == groups


@pytest.mark.parametrize("text, message", [
    ("0,0,0,0,1,0.5,3", "group '0,0,0,0,1,0.5,3' has 7 fields; expected 1 to 6"),
    ("0;a", "group 'a' is not numbers"),
    ("0,0,0,0,2,1.5", r"edit_ratio in \[0, 1\]"),
    ("0,-1", "loop_id, ref_id and length >= 0"),
])
def test_malformed_mask_strategies_are_named(text, message):
    with pytest.raises(ValueError, match=f"^mask_strategy {re.escape(repr(text))}: .*{message}"):
        parse_mask_strategy(text)


def test_loop_prompts_and_json_options():
    assert loop_prompts("|0|a cat|2|a dog", 4) == ["a cat", "a cat", "a dog", "a dog"]
    assert loop_prompts("a cat", 3) == ["a cat"] * 3
    for bad in ("|0|a cat|2", "|0|a|x|b", "|0|a|3|b"):
        with pytest.raises(ValueError, match="loop prompt"):
            loop_prompts(bad, 3)
    assert prompt_options('waves.{"mask_strategy": "0", "reference_path": "w.png"}') == (
        "waves.", {"mask_strategy": "0", "reference_path": "w.png"})
    with pytest.raises(ValueError, match="may set reference_path and mask_strategy, not loop"):
        prompt_options('waves.{"loop": 2}')


def test_apply_mask_strategy_writes_reference_frames_and_edit_ratios():
    z = torch.zeros(2, 6, 1, 1)
    references = [torch.arange(3.0).view(1, 3, 1, 1).repeat(2, 1, 1, 1), torch.full((2, 1, 1, 1), 9.0)]
    groups = parse_mask_strategy("0,0,1,-2,2,0.3;0,1,0,0;1,1,0,3")
    ratios = apply_mask_strategy(z, references, groups, 0)
    assert z[0, :, 0, 0].tolist() == [9, 0, 0, 0, 1, 2]
    assert ratios.tolist() == pytest.approx([0, 1, 1, 1, 0.3, 0.3])
    for text, message in (("0,2", "reference 2 does not exist"), ("0,0,2,0,2", "outside reference 0's 3"),
                          ("0,0,0,5,2", "outside the clip's 6")):
        with pytest.raises(ValueError, match=message):
            apply_mask_strategy(z, references, parse_mask_strategy(text), 0, text)


# ---------------------------------------------------------------- references


def write_image(path, color, size=(20, 30)):
    Image.fromarray(np.full((*size, 3), color, dtype=np.uint8)).save(path)
    return str(path)


def test_read_reference_images_and_whole_videos(tmp_path):
    image = read_reference(write_image(tmp_path / "a.png", (255, 0, 0)), (16, 16))
    assert image.shape == (3, 1, 16, 16) and image[0].min() > 0.99 and image[1].max() < -0.99
    video = torch.zeros(5, 24, 24, 3, dtype=torch.uint8)
    write_video(str(tmp_path / "v.mp4"), video, fps=7)
    assert read_reference(str(tmp_path / "v.mp4"), (16, 16)).shape == (3, 5, 16, 16)  # every frame
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "a.txt").write_text("a caption")
    for path, message in ((tmp_path / "none.png", "no such file"), (tmp_path / "bad.png", "UnidentifiedImageError"),
                          ("https://x.org/v.mp4", "URLs are not downloaded"),
                          (tmp_path / "a.txt", ".txt is neither an image")):
        with pytest.raises(ValueError, match=f"^reference '{re.escape(str(path))}' cannot be read: {message}"):
            read_reference(str(path), (16, 16))


# ---------------------------------------------------------------- sampling with references and loops


class MaskedModel(torch.nn.Module):
    """STDiT2's call signature on a small smooth function; records what it is given."""

    def __init__(self):
        super().__init__()
        self.y_embedder = type("Null", (), {"null": staticmethod(lambda n: torch.zeros(n, 1, 2, 4))})()
        self.calls = []

    def forward(self, x, timestep, y, mask=None, x_mask=None, num_frames=None, height=None, width=None, ar=None,
                fps=None):
        self.calls.append(dict(x=x.clone(), x_mask=x_mask, height=height, fps=fps))
        eps = 0.1 * torch.tanh(x + y.mean())
        return torch.cat([eps, torch.zeros_like(x)], 1)


class Texts:
    def __init__(self):
        self.seen = []

    def encode(self, prompts):
        self.seen.append(list(prompts))
        y = torch.stack([torch.full((1, 2, 4), float(len(p))) for p in prompts])
        return {"y": y, "mask": torch.ones(len(prompts), 2, dtype=torch.long)}


def run_sampler(conditioning, prompts, frames=4, steps=4, model=None, texts=None):
    model, texts = model or MaskedModel(), texts or Texts()
    videos = sample_videos(model, PixelVAE(factor=4), texts, IDDPM(num_sampling_steps=steps), prompts,
                           (frames, 4, 4), 3, "cpu", torch.float32, conditioning=conditioning,
                           model_kwargs=dict(height=torch.tensor([16.0] * len(prompts))))
    return videos, model, texts


def test_references_that_a_loop_does_not_use_sample_the_text_only_video(tmp_path):
    image = write_image(tmp_path / "a.png", (0, 255, 0), (16, 16))
    prompts = ["one", "two"]
    plain, model, _ = run_sampler(None, prompts)
    unused = Conditioning(prompts, [image, None], ["1,0", None], (16, 16))  # loop 1 of a one-loop run
    same, masked_model, _ = run_sampler(unused, prompts)
    assert torch.equal(same, plain) and all(call["x_mask"] is None for call in masked_model.calls)
    assert torch.equal(model.calls[0]["height"], torch.full((4,), 16.0))


def test_image_to_video_keeps_the_image_as_frame_zero(tmp_path):
    image = write_image(tmp_path / "a.png", (0, 255, 0), (16, 16))
    conditioning = Conditioning(["a green field"], [image], ["0"], (16, 16))
    videos, model, _ = run_sampler(conditioning, ["a green field"])
    reference = read_reference(image, (16, 16))[:, 0]
    assert (videos[0, :, 0] - reference).abs().max() < 0.05
    assert (videos[0, :, 1:] - reference[:, None]).abs().max() > 0.5  # the others are generated
    # held until the last step, then released with the condition's timestep-0 modulation
    assert all(call["x_mask"][:, 0].logical_not().all() and call["x_mask"][:, 1:].all() for call in model.calls)


def test_loops_continue_from_the_last_frames_with_per_loop_prompts():
    prompts = ["|0|a cat|1|a dog", "a fish"]
    conditioning = Conditioning(prompts, loop=3, condition_frame_length=2)
    videos, model, texts = run_sampler(conditioning, prompts, frames=5, steps=3)
    assert videos.shape == (2, 3, 5 + 2 * 3, 16, 16)
    assert texts.seen == [["a cat", "a fish"], ["a dog", "a fish"], ["a dog", "a fish"]]
    first_loop, second_loop = model.calls[:3], model.calls[3:6]
    assert all(call["x_mask"] is None for call in first_loop)
    expected = torch.tensor([[False, False, True, True, True]] * 4)
    assert all(torch.equal(call["x_mask"], expected) for call in second_loop)
    # the new clip's held frames are the last clip's last two frames, encoded again
    last = PixelVAE(factor=4).encode(videos[:, :, 3:5])
    torch.testing.assert_close(second_loop[0]["x"][:2, :, :2], last, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the command line: exit code 2, one line


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(sora.sample, "build_components", lambda *args, **kwargs: pytest.fail("a model was built"))


@pytest.mark.parametrize("flags, message", [
    (["--reference-path", "IMAGE", "--mask-strategy", "0,0,x"], "mask_strategy '0,0,x': group '0,0,x' is not numbers"),
    (["--reference-path", "MISSING", "--mask-strategy", "0"], "reference '.*missing.png' cannot be read: no such file"),
    (["--reference-path", "IMAGE", "--mask-strategy", "0,1"],
     r"mask_strategy '0,1': reference 1 does not exist in loop 0 \(its prompt has 1 reference\(s\) there\)"),
    (["--reference-path", "IMAGE", "IMAGE", "--mask-strategy", "0"], "reference_path has 2 entries for 1 prompts"),
    (["--reference-path", "IMAGE"], "reference_path needs mask_strategy"),
    (["--loop", "2"], "loop=2 needs condition_frame_length"),
    (["--prompt", "|0|a|1|b", "--loop", "2", "--condition-frame-length", "1", "--scheduler.type", "dpm-solver"],
     "need scheduler type 'iddpm', got 'dpm-solver'"),
])
def test_bad_references_and_strategies_exit_2_before_any_model(tmp_path, capsys, no_model, flags, message):
    image = write_image(tmp_path / "a.png", (1, 2, 3))
    flags = [image if f == "IMAGE" else str(tmp_path / "missing.png") if f == "MISSING" else f for f in flags]
    prompt = [] if "--prompt" in flags else ["--prompt", "a"]
    with pytest.raises(SystemExit) as exit_info:
        main(run, "sample", [TINY, "--save-dir", str(tmp_path / "out"), *prompt, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_a_model_without_x_mask_or_size_inputs_is_refused(tmp_path, capsys):
    image = write_image(tmp_path / "a.png", (1, 2, 3))
    with pytest.raises(SystemExit):
        main(run, "sample", [TINY, "--save-dir", str(tmp_path / "out"), "--prompt", "a", "--reference-path", image,
                             "--mask-strategy", "0", "--num-sampling-steps", "2"])
    assert "need a model that takes x_mask (STDiT2); STDiT does not" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(run, "sample", [TINY, "--save-dir", str(tmp_path / "out"), "--multi-resolution", "STDiT2"])
    assert "multi_resolution='STDiT2' needs a model that takes the size conditioning (STDiT2); STDiT does not" in \
        capsys.readouterr().err


def test_stdit2_image_to_video_in_two_loops_on_the_command_line(tmp_path, capsys):
    """configs/tiny/sample.py with a small STDiT2: its random weights' zero-initialised final layer predicts no
    noise, so the image, held until the last step and denoised there from its own level, comes back as frame 0."""
    from sora.data.video import read_video

    image = write_image(tmp_path / "a.png", (200, 40, 90), (64, 64))
    stdit2 = dict(type="STDiT2", depth=1, hidden_size=48, num_heads=4, input_sq_size=64, patch_size=(1, 2, 2))
    main(run, "sample", [TINY, "--save-dir", str(tmp_path / "out"), "--model", repr(stdit2), "--multi-resolution",
                         "STDiT2", "--prompt", "|0|a red square|1|a blue square", "--reference-path", image,
                         "--mask-strategy", "0", "--loop", "2", "--condition-frame-length", "3", "--fps", "8",
                         "--frame-interval", "2", "--num-sampling-steps", "3"])
    frames, fps = read_video(str(tmp_path / "out" / "sample_0000.mp4"))
    assert frames.shape == (8 + 8 - 3, 64, 64, 3) and fps == 4  # saved at fps // frame_interval
    assert (frames[0].float() - torch.tensor([200.0, 40.0, 90.0])).abs().mean() < 8  # h264 rounding
