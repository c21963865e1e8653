"""`python -m sora.sample`: the tiny default end to end, reproducibility, several processes, bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sora.data.video
import sora.sample
from sora.data.video import read_video
from sora.launch import main
from sora.sample import run
from spawn import run as spawn_run

TINY = "configs/tiny/sample.py"
FAST = ["--num-sampling-steps", "3"]
# Under the test suite the kernels run in Triton's interpreter, which makes one 3-step tiny sample ~10 s; the tests
# about the command line itself (seeds, prompts, checkpoints, failed writes) sample with them off. The tiny default
# keeps them on, and tests/test_models.py checks they change nothing.
CLI_ONLY = [*FAST, "--model.enable_layernorm_kernel", "false"]


def sample(tmp_path, *flags, config=TINY, name="out", fast=CLI_ONLY):
    out = tmp_path / name
    main(run, "sample", [config, "--save-dir", str(out), *fast, *flags])
    return out


def frames(path):
    return read_video(str(path))[0].numpy().astype(np.int16)


@pytest.fixture
def videos(monkeypatch):
    """The decoded videos each sampling run hands to save_sample, by file name: the model's output itself,
    which the comparisons below are about (mp4 encoding is lossy)."""
    captured = {}
    real = sora.data.video.save_sample  # sora.sample.run imports it when it runs

    def keep(video, path, fps):
        captured[os.path.basename(path)] = video.clone()
        return real(video, path, fps)

    monkeypatch.setattr(sora.data.video, "save_sample", keep)
    return captured


def keep_videos_worker_side(out):
    """In a spawned worker: also torch.save each video handed to save_sample next to its file."""
    real = sora.data.video.save_sample  # sora.sample.run imports it when it runs

    def keep(video, path, fps):
        torch.save(video, f"{path}.pt")
        return real(video, path, fps)

    sora.data.video.save_sample = keep


def test_tiny_default_writes_one_video_per_prompt(tmp_path, capsys):
    out = sample(tmp_path, fast=FAST)
    assert sorted(os.listdir(out)) == ["sample_0000.mp4", "sample_0001.mp4"]
    for name in ("sample_0000.mp4", "sample_0001.mp4"):
        video = frames(out / name)
        assert video.shape == (8, 64, 64, 3)  # num_frames and image_size of the config
    printed = capsys.readouterr().out
    assert "num_frames = 8" in printed  # the resolved config is printed first
    assert f"wrote {out}/sample_0001.mp4  ('a blue circle moving up')" in printed


def test_same_seed_same_video_and_seed_flag_takes_effect(tmp_path, videos):
    sample(tmp_path, "--prompt", "a green triangle", name="a")
    first = videos.pop("sample_0000")
    sample(tmp_path, "--prompt", "a green triangle", name="b")
    again = videos.pop("sample_0000")
    sample(tmp_path, "--prompt", "a green triangle", "--seed", "7", name="c")
    other = videos.pop("sample_0000")
    assert torch.equal(first, again)
    assert (first - other).abs().mean() > 0.05


def test_prompt_file_and_batches(tmp_path, videos):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square moving left\n\n  \na blue circle moving up\na white square growing\n")
    out = sample(tmp_path, "--prompt-path", str(prompts), "--batch-size", "2", "--prompt", "none")
    assert sorted(os.listdir(out)) == ["sample_0000.mp4", "sample_0001.mp4", "sample_0002.mp4"]
    in_batch = videos.pop("sample_0000")
    # All the noise of prompt i comes from seed + i: prompt 0's video does not depend on its batch.
    sample(tmp_path, "--prompt", "a red square moving left", "--batch-size", "1", name="alone")
    torch.testing.assert_close(videos.pop("sample_0000"), in_batch, rtol=1e-4, atol=1e-4)


def test_checkpoint_is_loaded(tmp_path, videos):
    from sora.config import load_config
    from sora.launch import build_components, setup

    cfg = load_config(TINY)
    cfg.sp_size, cfg.dtype, cfg.seed = 1, "fp32", 0
    model = build_components(cfg, setup(cfg))[0]
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(3.0)  # predicts a large constant eps: a visibly different video
    torch.save({"ema": model.state_dict()}, tmp_path / "tiny.pth")
    sample(tmp_path, "--ckpt-path", str(tmp_path / "tiny.pth"), "--prompt", "x", name="ckpt")
    with_ckpt = videos.pop("sample_0000")
    sample(tmp_path, "--prompt", "x", name="random")
    assert (with_ckpt - videos.pop("sample_0000")).abs().mean() > 0.05


def test_autoencoder_kl_and_one_frame_png(tmp_path):
    config = tmp_path / "kl.py"
    config.write_text(open(TINY).read().replace(
        'vae = dict(type="PixelVAE", factor=4)',
        'from sora.models.vae import TINY_VAE_CONFIG\nvae = dict(type="VideoAutoencoderKL", config=TINY_VAE_CONFIG, micro_batch_size=4)',
    ))
    out = sample(tmp_path, "--num-frames", "1", "--scheduler.type", "dpm-solver", config=str(config))
    assert sorted(os.listdir(out)) == ["sample_0000.png", "sample_0001.png"]


# What sharing prompts and sequence parallelism need, and no more: two frames to split, two heads to trade, two
# steps, the eager path (the kernels under sequence parallelism are tests/test_parallel.py's).
RANKS = ["--num-frames", "2", "--image-size", "16,16", "--num-sampling-steps", "2", "--model.depth", "1",
         "--model.hidden_size", "32", "--model.num_heads", "2", "--model.enable_layernorm_kernel", "false",
         "--batch-size", "1", "--prompt", "a red square moving left", "--prompt", "a blue circle moving up"]


def ranks_worker(rank, world, out):
    """Both layouts of two processes in one start: two data-parallel ranks (one prompt each), then one
    sequence-parallel group of two ranks (both prompts)."""
    keep_videos_worker_side(out)
    for layout, sp_size in (("dp", 1), ("sp", 2)):
        main(run, "sample", [TINY, "--save-dir", f"{out}/{layout}/videos", *RANKS, "--sp-size", str(sp_size)])


@pytest.mark.slow
def test_prompts_shared_across_ranks_and_sequence_parallel(tmp_path, videos):
    sample(tmp_path, *RANKS, name="single")
    spawn_run(ranks_worker, 2, tmp_path)
    for name in ("sample_0000", "sample_0001"):
        assert (tmp_path / "dp/videos" / f"{name}.mp4").is_file()
        assert torch.equal(torch.load(tmp_path / "dp/videos" / f"{name}.pt"), videos[name])
        torch.testing.assert_close(torch.load(tmp_path / "sp/videos" / f"{name}.pt"), videos[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--prompt-path", "missing.txt", "--prompt", "none"], "prompt file 'missing.txt' does not exist"),
    (["--prompt-path", "EMPTY", "--prompt", "none"], "has no prompts"),
    # the config file sets `prompt`; a prompt file on the command line replaces it, so a bad one fails
    (["--prompt-path", "missing.txt"], "^error: prompt file 'missing.txt' does not exist$"),
    (["--prompt-path", "EMPTY"], "prompt file '.*EMPTY' has no prompts"),
    (["--weights", "model"], "weights='model' needs --ckpt-path to be a training checkpoint folder"),
    (["--ckpt-path", "EMPTY", "--weights", "model"], "weights='model' needs --ckpt-path to be a training checkpoint"),
    (["--image-size", "72,64"], r"image_size \(72, 64\) must be divisible by 16 \(the VAE.s 8x downsampling times the model.s patch 2\)"),
    (["--model.patch_size", "[2,2,2]", "--num-frames", "7"], "num_frames=7 must be divisible by the model's temporal patch size 2"),
    (["--scheduler.type", "ddim"], "unknown scheduler type 'ddim'; valid types: iddpm, dpm-solver"),
    (["--ckpt-path", "nowhere.pth"], "^error: model.from_pretrained 'nowhere.pth': no such file or folder$"),
    (["--ckpt-path", "RUN"], "is a training run folder .what --load takes., not a checkpoint: give one of its "
                             "checkpoint folders, e.g. '.*RUN/epoch1-global_step20' .the newest.$"),
    (["--ckpt-path", "RUN/epoch1-global_step20/model"], "is a folder without ema.pt, not a training checkpoint"),
    (["--prompt-path", "RUN"], "prompt file '.*RUN' is a folder; expected a text file, one prompt per line$"),
    (["--ckpt-path", "WRONG"], "does not match the model"),
    (["--dtype", "fp8"], "dtype"),
    (["--num-sampling-step", "4"], "did you mean"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, flags, message):
    (tmp_path / "EMPTY").write_text("\n\n")
    torch.save({"something.weight": torch.ones(2)}, tmp_path / "WRONG")
    for step in (5, 20):  # a run folder, as --load takes, with two complete checkpoints
        (tmp_path / f"RUN/epoch1-global_step{step}/model").mkdir(parents=True)
        (tmp_path / f"RUN/epoch1-global_step{step}/ema.pt").write_bytes(b"")
    flags = [str(tmp_path / f) if f.startswith(("EMPTY", "WRONG", "RUN")) else f for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        main(run, "sample", [TINY, "--save-dir", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    import re
    assert re.search(message, err[0]), err[0]


def test_command_line_exit_code():
    result = subprocess.run([sys.executable, "-m", "sora.sample", TINY, "--prompt-path", "missing.txt", "--prompt", "none"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: prompt file 'missing.txt' does not exist"


@pytest.fixture
def no_model(monkeypatch):
    """Building a model fails the test: what is checked must fail before."""
    monkeypatch.setattr(sora.sample, "build_components", lambda *args, **kwargs: pytest.fail("a model was built"))


def exits_2(capsys, *flags):
    with pytest.raises(SystemExit) as exit_info:
        main(run, "sample", [TINY, *CLI_ONLY, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1:]  # the line after the progress bar


def test_save_dir_that_cannot_be_written_fails_before_any_model_is_built(tmp_path, capsys, no_model):
    (tmp_path / "file").write_text("")
    err = exits_2(capsys, "--save-dir", str(tmp_path / "file" / "videos"))
    assert err == [f"error: save_dir '{tmp_path}/file/videos' cannot be written: Not a directory"]


def test_failed_write_is_one_line_naming_the_file_and_the_partial_file_goes(tmp_path, capsys, monkeypatch):
    import errno

    import av

    def disk_full(path, mode="r", **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(av, "open", disk_full)
    err = exits_2(capsys, "--save-dir", str(tmp_path / "out"))
    assert err == [f"error: could not write {tmp_path}/out/sample_0000.mp4: No space left on device"]
    assert os.listdir(tmp_path / "out") == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 KiB tmpfs (skipped where this process may not mount one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_full_and_read_only_disks(tiny_disk, capsys, monkeypatch):
    err = exits_2(capsys, "--save-dir", str(tiny_disk / "videos"))
    assert err == [f"error: could not write {tiny_disk}/videos/sample_0000.mp4: No space left on device"]
    assert os.listdir(tiny_disk / "videos") == []
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    monkeypatch.setattr(sora.sample, "build_components", lambda *args, **kwargs: pytest.fail("a model was built"))
    err = exits_2(capsys, "--save-dir", str(tiny_disk / "other"))
    assert err == [f"error: save_dir '{tiny_disk}/other' cannot be written: Read-only file system"]



def test_weights_line_says_how_much_of_the_ema_is_its_start(tmp_path):
    """running_states.json's ema_decay and global step: 0.9999**2000 = 0.819 of the EMA is still the weights
    training started from; a checkpoint saved before ema_decay was stored gets the update count alone."""
    import json

    from sora.checkpointing import describe_weights

    states = tmp_path / "running_states.json"
    states.write_text(json.dumps({"global_step": 2000, "ema_decay": 0.9999}))
    assert describe_weights(str(tmp_path), "ema") == (
        f"weights: the EMA of {tmp_path}, which has seen 2000 updates at decay 0.9999: 82% of it is still the "
        "weights training started from (--weights model for the trained weights)")
    states.write_text(json.dumps({"global_step": 2000}))
    assert describe_weights(str(tmp_path), "ema") == (
        f"weights: the EMA of {tmp_path}, which has seen 2000 updates (--weights model for the trained weights)")
    assert describe_weights(str(tmp_path), "model") == (
        f"weights: the trained model of {tmp_path} at step 2000, not its EMA")
