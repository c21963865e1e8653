"""sora.data: video IO, the synthetic dataset, and the CSV datasets (decoding, frame picking, crop, skipping)."""

import csv
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sora.data import (
    VariableVideoBatchSampler,
    VariableVideoTextDataset,
    VideoTextDataset,
    probe,
    read_image,
    read_video,
    save_sample,
    write_video,
)
from sora.data.synthetic import COLORS, CSV_COLUMNS, MOTIONS, SHAPES, main, make_synthetic_dataset

BRIGHTNESS_STEP = 8  # frame i of the counting clip is grey 8 + 8 * i


def write_csv(path, rows, columns=("path", "text")):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows(rows)
    return str(path)


def counting_clip(path, num_frames, height=36, width=48):
    """A clip whose frame i is uniformly grey at BRIGHTNESS_STEP * (i + 1): the pixels say which frame it is."""
    levels = BRIGHTNESS_STEP * (torch.arange(num_frames) + 1)
    frames = levels.view(-1, 1, 1, 1).expand(num_frames, height, width, 3).to(torch.uint8)
    return write_video(path, frames, fps=10)


def picked_frames(video):
    """Frame numbers of a counting clip's (3, T, H, W) sample in [-1, 1]."""
    grey = (video + 1) * 127.5
    return [round(level / BRIGHTNESS_STEP) - 1 for level in grey.mean(dim=(0, 2, 3)).tolist()]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    csv_path = make_synthetic_dataset(str(out), num_videos=28, seed=1)
    with open(csv_path, newline="") as file:
        return out, csv_path, list(csv.DictReader(file))


# ---- synthetic dataset -------------------------------------------------------------------------


def test_synthetic_csv_and_clips(synthetic):
    out, csv_path, rows = synthetic
    with open(csv_path, newline="") as file:
        assert tuple(next(csv.reader(file))) == CSV_COLUMNS
    assert len(rows) == 28
    caption = re.compile(rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) ({'|'.join(MOTIONS)})")
    for row in rows:
        assert caption.fullmatch(row["text"]), row["text"]
        assert (row["num_frames"], row["height"], row["width"], row["aspect_ratio"], row["fps"]) == ("16", "64", "64", "1.0", "8")
        frames, fps = read_video(out / row["path"])
        assert frames.shape == (16, 64, 64, 3) and frames.dtype == torch.uint8
        assert fps == 8.0
    assert {row["text"].split(" ", 3)[3] for row in rows} == set(MOTIONS)  # seed 1 draws every motion


def test_synthetic_pixels_show_the_caption(synthetic):
    out, _, rows = synthetic
    for row in rows:
        _, color, shape, motion = row["text"].split(" ", 3)
        frames = read_video(out / row["path"])[0].numpy().astype(int)
        named = np.abs(frames - np.array(COLORS[color])).max(-1) < 40  # (T, H, W)
        area = named.sum((1, 2))
        assert area.min() >= 40, row["text"]
        for other, rgb in COLORS.items():
            if other != color:
                assert (np.abs(frames - np.array(rgb)).max(-1) < 40).sum() < 0.05 * area.sum(), (row["text"], other)
        ys, xs = [np.array([np.nonzero(named[t])[axis].mean() for t in range(16)]) for axis in (0, 1)]
        dx, dy = xs[-1] - xs[0], ys[-1] - ys[0]
        expected = {
            "moving left": dx < -25, "moving right": dx > 25, "moving up": dy < -25, "moving down": dy > 25,
            "growing": area[-1] > 4 * area[0], "shrinking": area[0] > 4 * area[-1],
            "staying still": abs(dx) < 1 and abs(dy) < 1 and area.max() - area.min() <= 0.05 * area.max(),
        }
        assert expected[motion], (row["text"], dx, dy, area[0], area[-1])
        if motion.startswith("moving"):  # steady travel: the other axis stays put
            assert abs(dy if motion in ("moving left", "moving right") else dx) < 1, row["text"]
        biggest = named[area.argmax()]
        rows_lit, cols_lit = np.nonzero(biggest)
        fill = biggest.sum() / ((np.ptp(rows_lit) + 1) * (np.ptp(cols_lit) + 1))
        assert {"square": fill > 0.93, "circle": 0.7 < fill <= 0.93, "triangle": fill <= 0.7}[shape], (row["text"], fill)


def test_synthetic_runs_as_a_module_without_warnings(tmp_path):
    """`python -m sora.data.synthetic`, as README.md has it: sora.data must not import the script before runpy."""
    result = subprocess.run([sys.executable, "-m", "sora.data.synthetic", str(tmp_path), "--num-videos", "1",
                             "--frames", "2", "--size", "32"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    assert (tmp_path / "data.csv").is_file() and (tmp_path / "clip_0000.mp4").is_file()


def test_synthetic_cli_is_deterministic(tmp_path, capsys):
    main([str(tmp_path / "a"), "--num-videos", "3", "--frames", "5", "--size", "32", "--seed", "7"])
    assert "wrote 3 clips" in capsys.readouterr().out
    main([str(tmp_path / "b"), "--num-videos", "3", "--frames", "5", "--size", "32", "--seed", "7"])
    main([str(tmp_path / "c"), "--num-videos", "3", "--frames", "5", "--size", "32", "--seed", "8"])
    texts = {name: (tmp_path / name / "data.csv").read_text() for name in "abc"}
    assert texts["a"] == texts["b"] != texts["c"]
    for i in range(3):
        a, b = (read_video(tmp_path / name / f"clip_{i:04d}.mp4")[0] for name in "ab")
        assert a.shape == (5, 32, 32, 3) and torch.equal(a, b)


def test_synthetic_vocabulary_options(tmp_path):
    main([str(tmp_path), "--num-videos", "12", "--frames", "3", "--size", "32", "--colors", "red,blue",
          "--shapes", "square", "--motions", "moving left,growing"])
    with open(tmp_path / "data.csv") as f:
        captions = {row["text"] for row in csv.DictReader(f)}
    assert captions <= {f"a {c} square {m}" for c in ("red", "blue") for m in ("moving left", "growing")}
    assert len(captions) > 1
    with pytest.raises(ValueError, match=r"colors \['purple'\]: each must be one of red"):
        make_synthetic_dataset(str(tmp_path / "x"), num_videos=1, colors=("purple",))


def test_same_frames_same_file_even_after_decoding(tmp_path):
    """x264's mbtree rate control made files differ after a decode in the same process; write_video turns it off."""
    frames = (torch.rand(6, 32, 32, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    write_video(tmp_path / "other.mp4", frames, fps=8)
    files = set()
    for _ in range(8):
        files.add((tmp_path / "out.mp4").read_bytes() if write_video(tmp_path / "out.mp4", frames, fps=8) else None)
        read_video(tmp_path / "other.mp4")
    assert len(files) == 1


def test_synthetic_shape_size(tmp_path):
    """--shape-size fixes a square's half-width as a fraction of the frame: 0.25 of 32 px is a 16 px square."""
    main([str(tmp_path), "--num-videos", "1", "--frames", "2", "--size", "32", "--shapes", "square",
          "--motions", "staying still", "--shape-size", "0.25"])
    frame = read_video(tmp_path / "clip_0000.mp4")[0][0].float()
    lit = frame.amax(-1) > 100
    rows, cols = lit.any(1).nonzero().flatten(), lit.any(0).nonzero().flatten()
    assert 15 <= rows[-1] - rows[0] + 1 <= 17 and 15 <= cols[-1] - cols[0] + 1 <= 17


@pytest.mark.parametrize("args", [["--size", "15"], ["--num-videos", "0"], ["--frames", "x"], [],
                                  ["--colors", "red,purple"], ["--motions", "jumping"], ["--shape-size", "0.6"]])
def test_synthetic_cli_rejects_bad_arguments(tmp_path, args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(([str(tmp_path)] if args else []) + args)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


# ---- video IO ----------------------------------------------------------------------------------


def test_write_read_roundtrip_and_odd_sizes(tmp_path):
    t, y, x = torch.meshgrid(torch.arange(6), torch.arange(33), torch.arange(47), indexing="ij")
    frames = torch.stack([4 * x + 10 * t, 5 * y + 10 * t, 120 + 0 * x], dim=-1).clamp(0, 255).to(torch.uint8)
    write_video(tmp_path / "odd.mp4", frames, fps=12)
    decoded, fps = read_video(tmp_path / "odd.mp4")
    assert decoded.shape == (6, 34, 48, 3) and fps == 12.0  # padded to even by repeating the last row/column
    assert (decoded[:, :33, :47].float() - frames.float()).abs().mean() < 3
    assert (decoded[:, 33].float() - decoded[:, 32].float()).abs().mean() < 3
    assert probe(tmp_path / "odd.mp4") == (6, 34, 48, 12.0)


def test_read_video_picks_frames(tmp_path):
    counting_clip(tmp_path / "count.mp4", 12)
    everything, fps = read_video(tmp_path / "count.mp4")
    seen = []
    picked, _ = read_video(tmp_path / "count.mp4", pick=lambda total: seen.append(total) or torch.tensor([7, 2, 2, 11]))
    assert seen == [12]  # the header's frame count
    assert torch.equal(picked, everything[[7, 2, 2, 11]])
    assert [round(level / BRIGHTNESS_STEP) - 1 for level in picked.float().mean((1, 2, 3)).tolist()] == [7, 2, 2, 11]


def test_save_sample_png_and_mp4(tmp_path):
    image = torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1).expand(3, 1, 8, 10)
    path = save_sample(image, tmp_path / "out" / "still", fps=8)
    assert path == str(tmp_path / "out" / "still.png")
    assert read_image(path).tolist() == [[[0, 128, 255]] * 10] * 8
    assert probe(path) == (1, 8, 10, 0.0)
    video = torch.linspace(-1, 1, 4).view(1, 4, 1, 1).expand(3, 4, 16, 16) * 2  # out of range: clamped
    path = save_sample(video, tmp_path / "clip", fps=5)
    assert path.endswith("clip.mp4")
    decoded, fps = read_video(path)
    assert decoded.shape == (4, 16, 16, 3) and fps == 5.0
    assert decoded[0].float().mean() < 3 and decoded[-1].float().mean() > 252


def test_io_errors_name_the_file(tmp_path):
    for reader in (read_video, read_image, probe):
        with pytest.raises(FileNotFoundError, match="nothere"):
            reader(tmp_path / "nothere.mp4")
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        write_video(tmp_path / "x.mp4", torch.zeros(2, 4, 4, 3))
    with pytest.raises(ValueError, match=r"\(3, T, H, W\)"):
        save_sample(torch.zeros(4, 2, 4, 4), tmp_path / "x")


# ---- VideoTextDataset --------------------------------------------------------------------------


def test_frame_sampling_with_interval(tmp_path):
    counting_clip(tmp_path / "count.mp4", 24)
    data = write_csv(tmp_path / "data.csv", [["count.mp4", "counting"]])
    dataset = VideoTextDataset(data, num_frames=4, frame_interval=3, image_size=(16, 16), seed=5)
    sample = dataset[0]
    assert sample["text"] == "counting"
    assert sample["video"].shape == (3, 4, 16, 16) and sample["video"].dtype == torch.float32
    starts = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        frames = picked_frames(dataset[0]["video"])
        assert frames == [frames[0] + 3 * i for i in range(4)]
        assert 0 <= frames[0] <= 24 - 10
        assert picked_frames(dataset[0]["video"]) == frames  # same (seed, epoch, index): same frames
        starts.add(frames[0])
    assert len(starts) > 3  # new epochs draw new starts
    again = VideoTextDataset(data, num_frames=4, frame_interval=3, image_size=(16, 16), seed=5)
    again.set_epoch(11)
    assert picked_frames(again[0]["video"]) == frames


def test_short_clip_repeats_its_last_frame(tmp_path):
    counting_clip(tmp_path / "short.mp4", 5)
    data = write_csv(tmp_path / "data.csv", [["short.mp4", "short"]])
    video = VideoTextDataset(data, num_frames=4, frame_interval=3, image_size=(8, 8))[0]["video"]
    assert picked_frames(video) == [0, 3, 4, 4]


def test_resize_keeps_aspect_and_center_crops(tmp_path):
    halves = np.zeros((40, 80, 3), np.uint8)  # H=40, W=80: left half red, right half blue
    halves[:, :40] = (255, 0, 0)
    halves[:, 40:] = (0, 0, 255)
    Image.fromarray(halves).save(tmp_path / "halves.png")
    data = write_csv(tmp_path / "data.csv", [["halves.png", "two halves"]])
    # square target: shorter side 40 -> 20, so 20 x 40, then the middle 20 columns: red | blue
    video = VideoTextDataset(data, num_frames=3, image_size=(20, 20))[0]["video"]
    assert video.shape == (3, 3, 20, 20) and video.min() >= -1 and video.max() <= 1
    assert torch.equal(video[:, 0], video[:, 2])  # an image is one frame repeated to num_frames
    red, blue = torch.tensor([1.0, -1, -1]), torch.tensor([-1.0, -1, 1])
    assert torch.allclose(video[:, 0, :, :9].mean((1, 2)), red, atol=0.02)
    assert torch.allclose(video[:, 0, :, 11:].mean((1, 2)), blue, atol=0.02)
    # wide target (10, 40): width decides the scale (80 -> 40), nothing is cropped
    video = VideoTextDataset(data, num_frames=1, image_size=(10, 40))[0]["video"]
    assert video.shape == (3, 1, 10, 40)
    assert torch.allclose(video[:, 0, :, :19].mean((1, 2)), red, atol=0.02)
    assert torch.allclose(video[:, 0, :, 21:].mean((1, 2)), blue, atol=0.02)


def test_use_image_transform_takes_the_first_frame(tmp_path):
    counting_clip(tmp_path / "count.mp4", 10)
    data = write_csv(tmp_path / "data.csv", [["count.mp4", "first"]])
    video = VideoTextDataset(data, num_frames=3, image_size=(8, 8), use_image_transform=True)[0]["video"]
    assert picked_frames(video) == [0, 0, 0]


def test_unreadable_files_are_skipped_with_one_warning_each(tmp_path):
    (tmp_path / "garbage.mp4").write_bytes(b"not a video" * 50)
    counting_clip(tmp_path / "good.mp4", 8)
    rows = [["garbage.mp4", "bad"], ["missing.mp4", "gone"], ["good.mp4", "good"]]
    dataset = VideoTextDataset(write_csv(tmp_path / "data.csv", rows), num_frames=2, image_size=(8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample = dataset[0]
    assert sample["text"] == "good" and sample["video"].shape == (3, 2, 8, 8)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "garbage.mp4" in messages[0] and "missing.mp4" in messages[1]
    assert all("\n" not in message for message in messages)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dataset[1]["text"] == "good"  # the same bad files again: no new warnings
    assert caught == []


def test_all_unreadable_raises(tmp_path):
    (tmp_path / "garbage.mp4").write_bytes(b"\x00" * 100)
    data = write_csv(tmp_path / "data.csv", [["garbage.mp4", "bad"], ["missing.mp4", "gone"]])
    dataset = VideoTextDataset(data, num_frames=2, image_size=(8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none readable: the error alone, no warning per file before it
        with pytest.raises(ValueError, match=r"none of the 2 videos of .*data.csv can be read, e.g. .*garbage.mp4: "):
            dataset[0]


def test_csv_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        VideoTextDataset(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['text'\]; found \['path', 'caption'\]"):
        VideoTextDataset(write_csv(tmp_path / "a.csv", [["x.mp4", "y"]], columns=("path", "caption")))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        VideoTextDataset(tmp_path / "empty.csv")
    with pytest.raises(ValueError, match="no rows"):
        VideoTextDataset(write_csv(tmp_path / "header.csv", []))
    with pytest.raises(ValueError, match="line 2: column num_frames = 'many'"):
        VideoTextDataset(write_csv(tmp_path / "n.csv", [["x.mp4", "y", "many"]], ("path", "text", "num_frames")))
    with pytest.raises(ValueError, match="frame_interval"):
        VideoTextDataset(write_csv(tmp_path / "ok.csv", [["x.mp4", "y"]]), frame_interval=0)


def test_root_is_prefixed_to_relative_paths(tmp_path):
    (tmp_path / "videos").mkdir()
    counting_clip(tmp_path / "videos" / "count.mp4", 4)
    data = write_csv(tmp_path / "data.csv", [["count.mp4", "rooted"]])
    dataset = VideoTextDataset(data, num_frames=2, image_size=(8, 8), root=tmp_path / "videos")
    assert dataset.path(0) == str(tmp_path / "videos" / "count.mp4")
    assert dataset[0]["text"] == "rooted"


# ---- VariableVideoTextDataset ------------------------------------------------------------------


def test_variable_dataset_item_at_bucket_size(synthetic):
    _, csv_path, rows = synthetic
    dataset = VariableVideoTextDataset(csv_path)
    assert dataset.get_data_info(0) == (16, 64, 64)
    sample = dataset[(0, 4, 32, 48)]
    assert sample["video"].shape == (3, 4, 32, 48)
    assert (sample["text"], sample["num_frames"], sample["height"], sample["width"]) == (rows[0]["text"], 4, 32, 48)
    assert sample["ar"] == 48 / 32 and sample["fps"] == 8.0
    assert torch.equal(dataset["0-4-32-48"]["video"], sample["video"])  # Open-Sora's string key


def test_variable_dataset_probes_missing_sizes(tmp_path):
    counting_clip(tmp_path / "count.mp4", 9, height=36, width=48)
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(tmp_path / "still.jpg")
    (tmp_path / "garbage.mp4").write_bytes(b"junk" * 30)
    data = write_csv(tmp_path / "data.csv", [["count.mp4", "a"], ["still.jpg", "b"], ["garbage.mp4", "c"]])
    with pytest.warns(UserWarning) as caught:
        dataset = VariableVideoTextDataset(data, frame_interval=2)
    assert "3 row(s) lack num_frames/height/width; probing" in str(caught[0].message)
    assert "garbage.mp4" in str(caught[-1].message)
    assert [dataset.get_data_info(i) for i in range(3)] == [(9, 36, 48), (1, 30, 50), (0, 0, 0)]
    image = dataset[(1, 1, 16, 16)]
    assert image["video"].shape == (3, 1, 16, 16) and image["fps"] == 120
    assert picked_frames(dataset[(0, 3, 8, 8)]["video"])[1:] in ([2, 4], [3, 5], [4, 6], [5, 7], [6, 8])


def test_dataloader_with_bucket_batches(tmp_path):
    csv_path = make_synthetic_dataset(str(tmp_path), num_videos=5, num_frames=8, size=192, seed=2)
    dataset = VariableVideoTextDataset(csv_path)
    sampler = VariableVideoBatchSampler(dataset, {"144p": {4: (1.0, 2)}}, seed=3)
    batches = list(torch.utils.data.DataLoader(dataset, batch_sampler=sampler))
    assert len(batches) == 3  # 5 samples, batch 2: the last batch padded
    for batch in batches:
        assert batch["video"].shape == (2, 3, 4, 192, 192)
        assert batch["num_frames"].tolist() == [4, 4] and batch["height"].tolist() == [192, 192]
        assert len(batch["text"]) == 2
