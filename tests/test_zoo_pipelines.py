"""The DiT and Latte configs (configs/dit, configs/latte) end to end through `python -m sora.sample` and
`python -m sora.train`, in-process and CPU-sized: each config runs as written except for its sizes (the XL
preset becomes a 2-block, width-64 model of the same kind and patch), its weights (none, or a checkpoint
written here) and its encoders (the tiny file-less AutoencoderKL; a tiny CLIP with a tokenizer saved offline).
Class-conditional guidance is checked against what the null class makes of it, and bad input exits 2."""

import json
import os
import re
import string

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import sora.data.video
import sora.sample
import sora.train
from sora.config import load_config, parse_args, validate
from sora.data.synthetic import make_synthetic_dataset
from sora.data.video import read_video
from sora.launch import build_components, main, setup
from sora.models import model_patch_size
from sora.models.text_encoder import build_text_encoder
from sora.models.vae import TINY_VAE_CONFIG

SAMPLE_CONFIGS = {
    "configs/dit/inference/1x256x256-class.py": ("DiT-XL/2", "label_1000", "classes"),
    "configs/dit/inference/1x256x256.py": ("DiT-XL/2", "text", "clip"),
    "configs/dit/inference/16x256x256.py": ("DiT-XL/2", "text", "clip"),
    "configs/latte/inference/16x256x256-class.py": ("Latte-XL/2", "label_101", "classes"),
    "configs/latte/inference/16x256x256.py": ("Latte-XL/2", "text", "clip"),
}
TRAIN_CONFIGS = ["configs/dit/train/1x256x256.py", "configs/dit/train/16x256x256.py", "configs/latte/train/16x256x256.py"]
DIT_CLASS = "configs/dit/inference/1x256x256-class.py"
VIDEO_FRAMES = 4  # the 16-frame configs run on 4 frames here


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIP text model (width 32, 77 positions as openai/clip-vit-base-patch32) and a character-level
    BPE tokenizer, saved as a from_pretrained folder."""
    letters = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.save_pretrained(folder)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(2)
    CLIPTextModel(config).save_pretrained(folder)
    return folder


def tiny_flags(config, clip_folder):
    """Overrides that make `config` CPU-sized: a 2-block model of the preset's kind and patch, no weights,
    the tiny AutoencoderKL, fp32, 64x64 (and 4 frames for video configs), the tiny CLIP for text configs."""
    cfg = load_config(config)
    kind = cfg.model.type.split("-")[0]
    flags = ["--model.type", kind, "--model.patch_size", str(list(model_patch_size(cfg.model))),
             "--model.depth", "2", "--model.hidden_size", "64", "--model.num_heads", "4",
             "--model.from_pretrained", "none",
             "--vae.from_pretrained", "none", "--vae.config", repr(TINY_VAE_CONFIG),
             "--dtype", "fp32", "--image-size", "64,64"]
    if cfg.num_frames > 1:
        flags += ["--num-frames", str(VIDEO_FRAMES)]
    if cfg.text_encoder.type == "clip":
        flags += ["--text-encoder.from_pretrained", str(clip_folder)]
    return flags


def randomized_checkpoint(config, flags, path, null_like=None):
    """A checkpoint of the tiny model `config` + `flags` builds, whose output depends on its condition: the
    zero-initialised (adaLN-Zero) layers get random weights, class rows (or the caption projection) are spread
    out, and the null class is zero (or, with `null_like=k`, a copy of class k's row)."""
    cfg = parse_args([config, *flags, "--prompt", "0"], "sample")
    model = build_components(cfg, setup(cfg))[0]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        if model.num_classes is not None:
            table = model.y_embedder.embedding_table.weight
            table.copy_(torch.randn(table.shape, generator=generator))
            table[model.num_classes] = 0 if null_like is None else table[null_like]
        else:
            for linear in (model.y_embedder.y_proj.fc1, model.y_embedder.y_proj.fc2):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.5)
    torch.save({"ema": model.state_dict()}, path)
    return path


def sample(config, out, *flags):
    main(sora.sample.run, "sample", [config, "--save-dir", str(out), "--num-sampling-steps", "2", *flags])
    return out


@pytest.fixture
def decoded(monkeypatch):
    """{written file: the (3, T, H, W) video the VAE decoded for it}. Samples are compared before encoding:
    libx264 does not always give the same mp4 for the same frames (seen under CPU load, on noisy frames)."""
    videos = {}
    save_sample = sora.data.video.save_sample  # sora.sample.run imports it when it runs

    def recording_save_sample(video, path_without_ext, fps=8):
        path = save_sample(video, path_without_ext, fps=fps)
        videos[path] = video.clone()
        return path

    monkeypatch.setattr(sora.data.video, "save_sample", recording_save_sample)
    return videos


def frames_of(path):
    """(T, H, W, 3) uint8 frames of a .png or .mp4 sample, as read back from the file."""
    if str(path).endswith(".png"):
        return np.asarray(Image.open(path).convert("RGB"))[None]
    return read_video(path)[0].numpy()


@pytest.mark.parametrize("config", SAMPLE_CONFIGS)
def test_config_as_written(config):
    """Open-Sora v1.0.0's settings: the XL/2 preset, its condition and encoder, DPM-Solver 20 steps at cfg 4."""
    cfg = validate(load_config(config), "sample")
    model_type, condition, encoder = SAMPLE_CONFIGS[config]
    assert (cfg.model.type, cfg.model.condition, cfg.text_encoder.type) == (model_type, condition, encoder)
    assert dict(cfg.scheduler) == dict(type="dpm-solver", num_sampling_steps=20, cfg_scale=4.0)
    assert cfg.model.enable_flashattn and cfg.model.enable_layernorm_kernel
    assert cfg.image_size == (256, 256) and cfg.num_frames == (1 if "/1x" in config else 16)
    assert cfg.model.from_pretrained.startswith("./pretrained_models/")
    if encoder == "clip":
        assert dict(cfg.text_encoder) == dict(type="clip", from_pretrained="openai/clip-vit-base-patch32",
                                              model_max_length=77)
    else:
        # The class ids the config reads are valid for its model: ImageNet's for DiT, UCF-101's for Latte.
        ids = build_text_encoder(cfg.text_encoder).encode(sora.sample.read_prompts(cfg))["y"]
        expected = [207, 360, 387, 974, 88, 979, 417, 279] if condition == "label_1000" else [0, 1, 2, 3, 4, 5]
        assert ids.tolist() == expected


@pytest.mark.parametrize("config", SAMPLE_CONFIGS)
def test_sample_config_end_to_end(config, clip_folder, tmp_path, decoded):
    """One file per prompt with the config's frame count (.png for one frame); the same prompt and noise give
    the same sample, another prompt (class id or caption) with the same noise another sample."""
    flags = tiny_flags(config, clip_folder)
    flags += ["--ckpt-path", str(randomized_checkpoint(config, flags, tmp_path / "tiny.pth"))]
    first, second = ("3", "7") if SAMPLE_CONFIGS[config][2] == "classes" else ("a cat", "a dog")
    mixed = sample(config, tmp_path / "mixed", *flags, "--prompt", first, "--prompt", second)
    same = sample(config, tmp_path / "same", *flags, "--prompt", first, "--prompt", first)
    frames = 1 if "/1x" in config else VIDEO_FRAMES
    names = [f"sample_000{i}.{'png' if frames == 1 else 'mp4'}" for i in range(2)]
    assert sorted(os.listdir(mixed)) == names and sorted(os.listdir(same)) == names
    for run in (mixed, same):
        for name in names:
            assert frames_of(run / name).shape == (frames, 64, 64, 3)
            assert decoded[str(run / name)].shape == (3, frames, 64, 64)
    video = {(run, name): decoded[str(run / name)] for run in (mixed, same) for name in names}
    torch.testing.assert_close(video[mixed, names[0]], video[same, names[0]])  # `first`, noise of seed + 0
    assert (video[mixed, names[1]] - video[same, names[1]]).abs().mean() > 0.01  # `second` / `first`, seed + 1


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    make_synthetic_dataset(str(folder), num_videos=4, num_frames=8, size=64, seed=0)
    return folder / "data.csv"


@pytest.mark.parametrize("config", TRAIN_CONFIGS)
def test_train_config_end_to_end(config, clip_folder, clips, tmp_path):
    """Two steps on synthetic clips: finite losses and a checkpoint whose EMA is the CLIP-conditioned model,
    which the matching inference config samples from."""
    flags = tiny_flags(config, clip_folder)
    main(sora.train.run, "train", [config, *flags, "--data-path", str(clips), "--outputs", str(tmp_path / "runs"),
                                   "--num-workers", "0", "--batch-size", "2", "--max-steps", "2", "--ckpt-every", "2",
                                   "--log-every", "1"])
    (exp,) = (tmp_path / "runs").iterdir()
    assert exp.name == f"000-{load_config(config).model.type.split('-')[0]}"
    (ckpt,) = exp.glob("epoch*-global_step2")
    assert {"ema.pt", "model", "optimizer", "running_states.json"} <= set(os.listdir(ckpt))
    losses = [json.loads(line)["loss"] for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    ema = torch.load(ckpt / "ema.pt", weights_only=True)
    assert ema["y_embedder.y_proj.fc1.weight"].shape == (64, 32)  # hidden x the tiny CLIP's width
    inference = config.replace("/train/", "/inference/")
    out = sample(inference, tmp_path / "samples", *tiny_flags(inference, clip_folder), "--prompt", "a red square",
                 "--ckpt-path", str(ckpt))
    assert len(os.listdir(out)) == 1


def test_class_guidance_uses_the_null_class(tmp_path, decoded):
    """A tiny DiT whose output depends on its class: guidance mixes the class's prediction with the null
    class's, so cfg 4 moves the sample away from cfg 1 (the class's prediction alone); with the null row set to
    the class's own row both branches agree and cfg 4 gives cfg 1's sample."""
    flags = tiny_flags(DIT_CLASS, None)
    zero_null = randomized_checkpoint(DIT_CLASS, flags, tmp_path / "zero_null.pth")
    same_null = randomized_checkpoint(DIT_CLASS, flags, tmp_path / "same_null.pth", null_like=3)

    def image(ckpt, cfg_scale, name, class_id="3"):
        out = sample(DIT_CLASS, tmp_path / name, *flags, "--ckpt-path", str(ckpt), "--cfg-scale", cfg_scale,
                     "--prompt", class_id)
        return decoded[str(out / "sample_0000.png")]

    plain = image(zero_null, "1", "plain")
    assert (image(zero_null, "4", "guided") - plain).abs().mean() > 0.05
    torch.testing.assert_close(image(same_null, "4", "guided_same_null"), plain, rtol=0, atol=1e-4)
    torch.testing.assert_close(image(same_null, "1", "plain_same_null"), plain, rtol=0, atol=1e-4)
    assert (image(zero_null, "1", "other_class", class_id="7") - plain).abs().mean() > 0.05


@pytest.mark.parametrize("config, prompt, message", [
    (DIT_CLASS, "1000", r"prompt '1000' is not a class id: expected an integer in \[0, 1000\)"),
    (DIT_CLASS, "tabby cat", r"prompt 'tabby cat' is not a class id"),
    ("configs/latte/inference/16x256x256-class.py", "101", r"expected an integer in \[0, 101\)"),
    (DIT_CLASS, "-1", r"prompt '-1' is not a class id"),
])
def test_bad_class_id_exits_2_with_one_line(config, prompt, message, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text(f"1\n\n{prompt}\n")
    with pytest.raises(SystemExit) as exit_info:
        sample(config, tmp_path / "out", *tiny_flags(config, None), "--prompt-path", str(ids))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]


def test_checkpoint_that_does_not_match_exits_2_with_one_line(tmp_path, capsys):
    """A Latte UCF-101 checkpoint (101 classes + null) given to the ImageNet DiT (1000 + null)."""
    flags = tiny_flags(DIT_CLASS, None)
    torch.save({"ema": {"y_embedder.embedding_table.weight": torch.zeros(102, 64)}}, tmp_path / "ucf101.pt")
    with pytest.raises(SystemExit) as exit_info:
        sample(DIT_CLASS, tmp_path / "out", *flags, "--prompt", "3", "--ckpt-path", str(tmp_path / "ucf101.pt"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "does not match the model" in err[0] and "y_embedder.embedding_table.weight (102, 64) (model: (1001, 64))" in err[0]
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
