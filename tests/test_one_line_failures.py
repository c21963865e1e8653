"""Failures of the command line that end in one line and a known exit code: ranks agreeing on a mistake, videos
that cannot be read, pretrained pieces that are missing, Ctrl-C in training."""

import pickle
import warnings

import pytest

import sora.launch
import sora.train
from sora.data import VideoTextDataset
from sora.data.synthetic import make_synthetic_dataset
from sora.launch import main
from sora.sample import run as sample
from sora.train import run as train

SAMPLE = "configs/tiny/sample.py"
SMALL_TRAIN = ["configs/tiny/train.py", "--model.depth", "1", "--model.hidden_size", "64", "--batch-size", "2",
               "--num-workers", "0", "--num-frames", "4", "--model.enable_layernorm_kernel", "false"]


def exits(capsys, run, mode, argv):
    """(exit code, stderr lines) of one command-line run."""
    with pytest.raises(SystemExit) as exit_info:
        main(run, mode, argv)
    return exit_info.value.code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_mistake_every_rank_meets_is_said_once_by_rank_0(tmp_path, capsys, monkeypatch, rank):
    """torchrun --nproc_per_node 2 ... --sp-size 3: each rank exits with code 2 before any process group is made;
    only rank 0 prints, so the two ranks' lines are never glued together."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    code, err = exits(capsys, sample, "sample", [SAMPLE, "--save-dir", str(tmp_path), "--sp-size", "3"])
    assert code == 2
    assert err == (["error: sp_size=3 does not divide the number of processes 2"] if rank == 0 else [])


def unreadable_csv(folder, names):
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"not a video")
    (folder / "data.csv").write_text("path,text\n" + "".join(f"{name},a clip\n" for name in names))
    return folder / "data.csv"


def test_no_readable_video_stops_training_in_one_line_and_leaves_no_run_folder(tmp_path, capsys):
    csv = unreadable_csv(tmp_path / "data", [f"clip{i}.mp4" for i in range(4)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = exits(capsys, train, "train", [*SMALL_TRAIN, "--data-path", str(csv),
                                                   "--outputs", str(tmp_path / "outputs"), "--num-workers", "2"])
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"error: none of the 4 videos of {csv} can be read, e.g. "
                                               f"{tmp_path / 'data/clip0.mp4'}: "), err
    assert not [w for w in caught if "skipping" in str(w.message)]
    assert list((tmp_path / "outputs").iterdir()) == []


def test_an_unreadable_video_is_warned_about_once(tmp_path):
    make_synthetic_dataset(str(tmp_path / "data"), num_videos=2, num_frames=4, size=32, seed=0)
    (tmp_path / "data/broken.mp4").write_bytes(b"not a video")
    csv = tmp_path / "data/data.csv"
    header, *rows = csv.read_text().splitlines(keepends=True)
    csv.write_text("".join([header, "broken.mp4,a broken clip,4,32,32,1.0,8\n", *rows]))
    dataset = VideoTextDataset(str(csv), num_frames=4, image_size=(32, 32))
    with pytest.warns(UserWarning, match="skipping .*broken.mp4: cannot read it") as caught:
        dataset.check_readable()  # in the main process, before the loader's workers start
        worker_copy = pickle.loads(pickle.dumps(dataset))  # what a worker starts from
        for _ in range(3):
            assert worker_copy[0]["text"] != "a broken clip"  # the next readable clip stands in
    assert len([w for w in caught if "broken.mp4" in str(w.message)]) == 1


def test_missing_pretrained_pieces_are_listed_before_anything_is_built(tmp_path, capsys, monkeypatch):
    """An Open-Sora config offline whose weights, VAE and T5 are not there: one line for each, naming the key,
    and no model, VAE or text encoder built first."""
    config = tmp_path / "opensora.py"
    config.write_text(open(SAMPLE).read() + (
        f"model['from_pretrained'] = {str(tmp_path / 'OpenSora-v1-HQ-16x256x256.pth')!r}\n"
        "vae = dict(type='VideoAutoencoderKL', from_pretrained='sora-tests/no-such-vae')\n"
        "text_encoder = dict(type='t5', from_pretrained='sora-tests/no-such-t5')\n"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("sora.models.vae.build_vae", lambda *args: pytest.fail("the VAE was built"))
    code, err = exits(capsys, sample, "sample", [str(config), "--save-dir", str(tmp_path / "out")])
    assert code == 2
    offline = "offline (HF_HUB_OFFLINE is set) and not in the Hugging Face cache"
    assert err == [
        f"error: model.from_pretrained {str(tmp_path / 'OpenSora-v1-HQ-16x256x256.pth')!r}: no such file or folder",
        f"error: vae.from_pretrained 'sora-tests/no-such-vae': {offline}",
        f"error: text_encoder.from_pretrained 'sora-tests/no-such-t5': {offline}",
    ]


def test_ctrl_c_in_training_is_one_line_naming_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    make_synthetic_dataset(str(tmp_path / "data"), num_videos=4, num_frames=4, size=64, seed=0)
    real_step, steps = sora.train.train_step, []

    def interrupted_at_the_third(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sora.train, "train_step", interrupted_at_the_third)
    code, err = exits(capsys, train, "train", [*SMALL_TRAIN, "--data-path", str(tmp_path / "data/data.csv"),
                                               "--outputs", str(tmp_path / "outputs"), "--ckpt-every", "2"])
    assert code == 130
    last = tmp_path / "outputs/000-STDiT/epoch0-global_step2"
    assert err == [f"interrupted at global step 2; last checkpoint: {last}"]
