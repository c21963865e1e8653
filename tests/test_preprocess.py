"""`python -m sora.preprocess`: training on a pre-encoded set takes the same steps as encoding on the fly,
shards are written atomically and skipped when done, and a folder of another encoding is refused."""

import json
import os

import pytest
import torch

from sora.data.encoded import EncodedDataset
from sora.data.synthetic import make_synthetic_dataset
from sora.launch import main
from sora.models.vae import TINY_VAE_CONFIG
from sora.preprocess import cli
from sora.train import run
from spawn import run as spawn_run

# Kernels off: these tests are about the data (under the suite the kernels would run in Triton's interpreter).
SMALL = ["--model.depth", "2", "--model.hidden_size", "64", "--batch-size", "2", "--num-workers", "0",
         "--num-frames", "4", "--model.enable_layernorm_kernel", "false"]
# The tiny config's weight-free PixelVAE, and a tiny AutoencoderKL whose posterior is sampled (mean + std * noise).
KL_VAE = ["--vae", repr(dict(type="VideoAutoencoderKL", config=TINY_VAE_CONFIG, micro_batch_size=4))]
BUCKETS = ["--frame-interval", "1", "--model.depth", "1",
           "--bucket-config", "{'144p': {4: (1.0, 2)}, '256': {4: (0.5, 2)}}"]
# Open-Sora v1.1: STDiT2 conditioned on each bucket's size and the files' fps, with masked frames.
STDIT2_MASKED = [*BUCKETS, "--model", repr(dict(type="STDiT2", depth=1, hidden_size=48, num_heads=4, input_sq_size=64)),
                 "--mask-ratios", repr({"mask_no": 0.25, "mask_quarter_head": 0.25, "mask_image_tail": 0.5})]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    make_synthetic_dataset(str(folder), num_videos=6, num_frames=8, size=64, seed=0)
    return folder / "data.csv"


@pytest.fixture(scope="module")
def large_clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("large")
    make_synthetic_dataset(str(folder), num_videos=4, num_frames=8, size=288, seed=1)
    return folder / "data.csv"


def preprocess(csv, save_dir, *flags):
    cli(["configs/tiny/train.py", "--data-path", str(csv), "--save-dir", str(save_dir), *SMALL, *flags])


def train_losses(data_path, outputs, *flags):
    main(run, "train", ["configs/tiny/train.py", "--data-path", str(data_path), "--outputs", str(outputs), *SMALL,
                        "--log-every", "1", "--ckpt-every", "0", "--dtype", "fp32", *flags])
    (exp,) = outputs.iterdir()
    with open(exp / "metrics.jsonl") as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f) if row["epoch"] == 0}


@pytest.mark.parametrize("data, flags", [
    ("clips", []),
    ("clips", KL_VAE),
    ("large_clips", BUCKETS),  # 288x288 clips qualify for '256' (kept half the time) and '144p': both encoded
    ("large_clips", STDIT2_MASKED),
], ids=["pixel-vae", "kl-vae", "buckets", "stdit2-masks"])
def test_pre_encoded_training_equals_on_the_fly(tmp_path, request, data, flags):
    """The first epoch (whose frames were encoded; later epochs draw other frames on the fly) gives the same
    losses to 1e-6, with the same seed."""
    csv = request.getfixturevalue(data)
    preprocess(csv, tmp_path / "encoded", "--shard-size", "4", *flags)
    steps = ["--max-steps", "3"]
    on_the_fly = train_losses(csv, tmp_path / "fly", *steps, *flags)
    encoded = train_losses(tmp_path / "encoded", tmp_path / "encoded-run", *steps, *flags)
    assert sorted(encoded) == sorted(on_the_fly) and len(encoded) >= 2
    for step, loss in on_the_fly.items():
        assert encoded[step] == pytest.approx(loss, rel=1e-6, abs=0), step
    if flags == KL_VAE:
        assert "std" in EncodedDataset(tmp_path / "encoded")[0]  # the posterior's spread was stored and sampled


def test_shards_done_are_skipped(tmp_path, clips):
    out = tmp_path / "encoded"
    preprocess(clips, out, "--shard-size", "4")
    index = json.loads((out / "index.json").read_text())
    assert [len(shard["keys"]) for shard in index["shards"]] == [4, 2]
    first = torch.load(out / "shard-00000.pt", weights_only=True)
    # A run stopped after the first shard: its file is there, the second's and the index are not.
    os.remove(out / "shard-00001.pt")
    os.remove(out / "index.json")
    stamp = os.stat(out / "shard-00000.pt").st_mtime_ns
    preprocess(clips, out, "--shard-size", "4")
    assert os.stat(out / "shard-00000.pt").st_mtime_ns == stamp
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "plan.json", "shard-00000.pt", "shard-00001.pt"]
    dataset = EncodedDataset(out)
    assert len(dataset) == 6 and torch.equal(dataset[0]["mean"], first[0]["mean"])
    # PixelVAE: 3 channels at 1/8 of 64x64; TINY_T5_CONFIG: 32 tokens of width 32.
    assert dataset[5]["mean"].shape == (3, 4, 8, 8) and dataset[5]["y"].shape == (1, 32, 32)


def test_another_encoding_in_the_folder_is_refused(tmp_path, clips, capsys):
    preprocess(clips, tmp_path / "encoded", "--shard-size", "4")
    with pytest.raises(SystemExit) as exit_info:
        preprocess(clips, tmp_path / "encoded", "--shard-size", "4", "--seed", "7")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds an encoding of another config" in err[0], err


def test_training_with_other_settings_is_refused(tmp_path, clips, capsys):
    preprocess(clips, tmp_path / "encoded")
    with pytest.raises(SystemExit) as exit_info:
        train_losses(tmp_path / "encoded", tmp_path / "out", "--max-steps", "1", "--num-frames", "8")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was encoded with num_frames=4, the config has 8" in err[0], err


def preprocess_worker(rank, world, out, csv):
    preprocess(csv, f"{out}/encoded", "--shard-size", "2")


@pytest.mark.slow
def test_ranks_share_the_shards(tmp_path, clips):
    """Under torchrun (2 gloo processes) shard k is encoded by rank k mod 2; the set equals one process's."""
    spawn_run(preprocess_worker, 2, tmp_path / "two", str(clips))
    preprocess(clips, tmp_path / "one", "--shard-size", "2")
    two, one = EncodedDataset(tmp_path / "two/encoded"), EncodedDataset(tmp_path / "one")
    assert len(two.index["shards"]) == 3 and two.index == one.index
    for i in range(6):
        assert all(torch.equal(two[i][key], one[i][key]) for key in ("mean", "y", "mask")), i


@pytest.mark.parametrize("flags, message", [
    (["--save-dir", "FILE/encoded"], "save_dir '.*FILE/encoded' cannot be written: Not a directory$"),
    (["--save-dir", "encoded", "--shard-size", "0"], "config key 'shard_size' must be a positive integer, got 0$"),
    ([], "config key 'save_dir' is required for preprocess but not set$"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, clips, capsys, flags, message):
    """preprocess's flags go through the config schema like every entry point's, and its output folder through
    the same writability check, named by its key."""
    import re

    (tmp_path / "FILE").write_text("")
    flags = [str(tmp_path / f) if f.startswith("FILE") else f for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        cli(["configs/tiny/train.py", "--data-path", str(clips), *SMALL, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and re.search(f"^error: {message}", err[0]), err
