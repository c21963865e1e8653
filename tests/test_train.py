"""`python -m sora.train`: tiny runs on synthetic clips, checkpoints, exact resume, FSDP2 and sequence
parallelism across gloo processes, atomic saves, and bad input."""

import errno
import json
import os
import re
import subprocess

import pytest
import torch

from sora import checkpointing
from sora.data.synthetic import make_synthetic_dataset
from sora.launch import main
from sora.train import run
from spawn import run as spawn_run

# configs/tiny/train.py, made smaller still: the suite runs the kernels under the Triton interpreter.
SMALL = ["--model.depth", "2", "--model.hidden_size", "64", "--batch-size", "2", "--num-workers", "0",
         "--log-every", "1", "--num-frames", "4"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    make_synthetic_dataset(str(folder), num_videos=6, num_frames=8, size=64, seed=0)
    return folder / "data.csv"


def train(tmp_path, clips, *flags, outputs="outputs"):
    main(run, "train", ["configs/tiny/train.py", "--data-path", str(clips), "--outputs", str(tmp_path / outputs),
                        *SMALL, *flags])
    runs = sorted((tmp_path / outputs).iterdir())
    return runs[-1]


def losses(exp_dir):
    with open(exp_dir / "metrics.jsonl") as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


def checkpoint_at(exp_dir, global_step):
    return next(p for p in exp_dir.iterdir() if p.name.endswith(f"-global_step{global_step}"))


def test_tiny_run_writes_checkpoints_and_metrics(tmp_path, clips):
    exp = train(tmp_path, clips, "--max-steps", "4", "--ckpt-every", "2")
    assert exp.name == "000-STDiT"
    assert sorted(p.name for p in exp.iterdir() if p.name.startswith("epoch")) == [
        "epoch0-global_step2", "epoch1-global_step4"]  # 6 clips, batch 2: 3 steps per epoch
    ckpt = exp / "epoch1-global_step4"
    assert sorted(os.listdir(ckpt)) == ["ema.pt", "model", "optimizer", "running_states.json"]
    states = json.loads((ckpt / "running_states.json").read_text())
    assert (states["epoch"], states["step"], states["global_step"], states["seed"]) == (1, 1, 4, 42)
    assert states["ema_decay"] == 0.99  # configs/tiny/train.py's
    assert states["sampler"] == {"seed": 42, "epoch": 1, "index": 2}  # one batch of 2 samples into epoch 1
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(exp).values()) and len(losses(exp)) == 4
    ema = torch.load(ckpt / "ema.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ema.values()) and "blocks.1.attn_temp.qkv.weight" in ema
    # A second run gets the next experiment folder.
    assert train(tmp_path, clips, "--max-steps", "1", "--ckpt-every", "0").name == "001-STDiT"


def test_new_run_folder_follows_the_highest_number(tmp_path, clips):
    (tmp_path / "outputs/002-STDiT").mkdir(parents=True)  # 000 and 001 were deleted
    assert train(tmp_path, clips, "--max-steps", "1", "--ckpt-every", "0").name == "003-STDiT"


def test_resume_takes_the_new_lr(tmp_path, clips):
    first = train(tmp_path, clips, "--max-steps", "2", "--ckpt-every", "2", outputs="first")
    resumed = train(tmp_path, clips, "--max-steps", "3", "--lr", "3e-4", "--load", str(checkpoint_at(first, 2)),
                    outputs="second")
    with open(resumed / "metrics.jsonl") as f:
        assert [json.loads(line)["lr"] for line in f] == [3e-4]


@pytest.mark.filterwarnings("error:torch.distributed is disabled")  # single-process saves and loads stay quiet
def test_resume_continues_the_run_exactly(tmp_path, clips):
    whole = losses(train(tmp_path, clips, "--max-steps", "6", "--ckpt-every", "3", outputs="whole"))
    first = train(tmp_path, clips, "--max-steps", "3", "--ckpt-every", "3", outputs="first")
    resumed = train(tmp_path, clips, "--max-steps", "6", "--ckpt-every", "3", "--load",
                    str(checkpoint_at(first, 3)), outputs="second")
    assert sorted(losses(resumed)) == [4, 5, 6]
    for step, loss in losses(resumed).items():
        assert loss == pytest.approx(whole[step], rel=1e-5, abs=1e-7), step
    assert "resumed from" in (resumed / "log.txt").read_text()


def test_a_killed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    ema = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    states = dict(epoch=0, step=1, global_step=1, seed=0, sampler={})
    good = checkpointing.save_checkpoint(str(tmp_path), model, ema, optimizer, states)
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    real_save = checkpointing.dcp.save

    def dies_on_optimizer(state, checkpoint_id):
        if checkpoint_id.endswith("optimizer"):
            raise KeyboardInterrupt("killed")
        real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(checkpointing.dcp, "save", dies_on_optimizer)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(str(tmp_path), model, ema, optimizer, dict(states, global_step=2))
    assert sorted(os.listdir(tmp_path)) == [".tmp-epoch0-global_step2", "epoch0-global_step1"]
    restored = torch.nn.Linear(3, 2)
    checkpointing.load_checkpoint(good, restored, torch.nn.Linear(3, 2), torch.optim.AdamW(restored.parameters()))
    for key, value in restored.state_dict().items():
        assert torch.equal(value, saved[key])


def test_the_next_save_removes_partial_saves(tmp_path):
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    (tmp_path / ".tmp-epoch0-global_step2" / "model").mkdir(parents=True)  # a save that was killed
    checkpointing.save_checkpoint(str(tmp_path), model, ema, optimizer, dict(epoch=0, step=3, global_step=3, seed=0))
    assert sorted(os.listdir(tmp_path)) == ["epoch0-global_step3"]


def test_load_takes_a_run_folder(tmp_path, clips):
    first = train(tmp_path, clips, "--max-steps", "4", "--ckpt-every", "2", outputs="first")
    (first / "epoch2-global_step6").mkdir()  # incomplete: no running_states.json
    (first / ".tmp-epoch2-global_step6").mkdir()  # left by a killed save
    resumed = train(tmp_path, clips, "--max-steps", "5", "--ckpt-every", "0", "--load", str(first), outputs="second")
    assert sorted(losses(resumed)) == [5]
    assert f"resumed from {first / 'epoch1-global_step4'}" in (resumed / "log.txt").read_text()
    assert not (first / ".tmp-epoch2-global_step6").exists()


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_unwritable_outputs_fail_before_any_model_is_built(tmp_path, clips, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr("sora.train.build_data", lambda *args, **kwargs: pytest.fail("data built"))
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path, clips, "--max-steps", "1", outputs="file/outputs")
    assert exit_info.value.code == 2
    assert f"outputs '{tmp_path}/file/outputs' cannot be written: Not a directory" in one_error_line(capsys)


def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, clips, capsys, monkeypatch):
    real_save = checkpointing.torch.save

    def disk_full_at_step_4(obj, path):
        if "global_step4" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, path)

    monkeypatch.setattr(checkpointing.torch, "save", disk_full_at_step_4)
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path, clips, "--max-steps", "4", "--ckpt-every", "2")
    assert exit_info.value.code == 2
    (exp,) = (tmp_path / "outputs").iterdir()
    assert one_error_line(capsys) == (f"error: could not write checkpoint {exp}/epoch1-global_step4: [Errno 28] No "
                                      "space left on device; the previous checkpoint is intact")
    assert sorted(p.name for p in exp.iterdir() if "global_step" in p.name) == ["epoch0-global_step2"]


def test_a_full_disk_during_a_save(tmp_path, clips, capsys):
    """A real full filesystem (a 6 MiB tmpfs, when this process may mount one; a checkpoint of this model
    takes 3.9 MB): the second save runs out of space, in whichever writer, and says so."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(run, "train", ["configs/tiny/train.py", "--data-path", str(clips), "--outputs", str(disk), *SMALL,
                                "--max-steps", "4", "--ckpt-every", "2"])
        assert exit_info.value.code == 2
        line = one_error_line(capsys)
        assert re.fullmatch(r"error: could not write checkpoint .*/epoch1-global_step4: \[Errno 28\] No space left on "
                            r"device; the previous checkpoint is intact", line), line
        (exp,) = disk.iterdir()
        assert sorted(p.name for p in exp.iterdir() if "global_step" in p.name) == ["epoch0-global_step2"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def sp_worker(rank, world, out, clips, plugin):
    main(run, "train", ["configs/tiny/train.py", "--data-path", clips, "--outputs", f"{out}/runs", *SMALL,
                        "--max-steps", "3", "--ckpt-every", "3", "--plugin", plugin, "--sp-size", str(world if plugin == "zero2-seq" else 1)])


@pytest.mark.slow
def test_sequence_parallel_training_equals_one_process(tmp_path, clips):
    """zero2-seq with sp=2 on 2 ranks (FSDP2 over both, one data-parallel rank): the same losses as one process."""
    single = losses(train(tmp_path, clips, "--max-steps", "3", "--ckpt-every", "0", outputs="single"))
    spawn_run(sp_worker, 2, tmp_path / "sp", str(clips), "zero2-seq")
    parallel = losses(next((tmp_path / "sp/runs").iterdir()))
    for step, loss in single.items():
        assert parallel[step] == pytest.approx(loss, rel=1e-4), step


@pytest.mark.slow
def test_zero2_on_two_ranks_resumes_on_one(tmp_path, clips):
    """FSDP2 across 2 ranks writes a sharded checkpoint; a single process resumes from it."""
    spawn_run(sp_worker, 2, tmp_path / "dp", str(clips), "zero2")
    exp = next((tmp_path / "dp/runs").iterdir())
    assert len(losses(exp)) == 3
    ckpt = checkpoint_at(exp, 3)
    resumed = train(tmp_path, clips, "--max-steps", "4", "--load", str(ckpt), "--ckpt-every", "4", outputs="one")
    assert sorted(losses(resumed)) == [4]
    # The single process loaded the 2-rank model: its EMA after one more step moved from the saved one by
    # at most (1 - ema_decay) times the distance to the weights.
    before = torch.load(ckpt / "ema.pt", weights_only=True)
    after = torch.load(checkpoint_at(resumed, 4) / "ema.pt", weights_only=True)
    assert before.keys() == after.keys()
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 0.05


@pytest.mark.parametrize("flags, message", [
    (["--data-path", "missing.csv"], "missing.csv"),
    (["--data-path", "NO_TEXT"], "text"),
    (["--data-path", "FOLDER"], "dataset .*FOLDER is a folder without index.json; expected a CSV of path,text rows "
                                "or a folder written by python -m sora.preprocess$"),
    (["--bucket-config", "{'360p': {8: (1.0, 2)}}"], "no sample of .* fits any bucket"),
    (["--bucket-config", "{'361p': {8: (1.0, 2)}}"], "361p"),
    (["--sp-size", "2"], "sp_size=2 needs plugin='zero2-seq'"),
    (["--plugin", "zero2-seq", "--sp-size", "3"], "sp_size=3 does not divide the number of processes 1"),
    (["--load", "nowhere"], "load='nowhere': no such checkpoint folder"),
    (["--scheduler", "{'type': 'dpm-solver'}"], "training needs scheduler type 'iddpm'"),
    (["--dtype", "fp16"], "dtype fp16 is not supported for training"),
    (["--model.patch_size", "[2,2,2]", "--bucket-config", "{'144p': {3: (1.0, 2)}}"],
     r"bucket_config\['144p'\]\[3\]: 3 frames do not split into temporal patches of 2"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, clips, capsys, flags, message):
    (tmp_path / "NO_TEXT").write_text("path\nclip_0000.mp4\n")
    (tmp_path / "FOLDER").mkdir()
    flags = [str(tmp_path / f) if f in ("NO_TEXT", "FOLDER") else f for f in flags]
    if "--data-path" not in flags:
        flags = ["--data-path", str(clips), *flags]
    with pytest.raises(SystemExit) as exit_info:
        main(run, "train", ["configs/tiny/train.py", "--outputs", str(tmp_path / "out"), *SMALL, "--max-steps", "1", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]


def test_bucketed_training(tmp_path):
    """bucket_config: each batch comes from one (resolution, frames, aspect ratio) bucket."""
    make_synthetic_dataset(str(tmp_path / "clips"), num_videos=4, num_frames=8, size=192, seed=1)
    exp = train(tmp_path, tmp_path / "clips/data.csv", "--max-steps", "2", "--ckpt-every", "0", "--model.depth", "1",
                "--frame-interval", "1", "--bucket-config", "{'144p': {4: (1.0, 2)}}")
    assert len(losses(exp)) == 2


class SizeConditioned(torch.nn.Module):
    """STDiT2's call signature on one weight; records what it is given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x, timestep, y, mask=None, x_mask=None, num_frames=None, height=None, width=None, ar=None,
                fps=None):
        self.calls.append(dict(x_mask=x_mask, num_frames=num_frames, height=height, width=width, ar=ar, fps=fps))
        return torch.cat([x, x], 1) * self.weight


def test_train_step_gives_the_model_the_datas_size_and_the_drawn_masks():
    """As Open-Sora v1.1: height, width, ar (= width / height, their dataset's), fps and num_frames of the batch,
    and x_mask = the MaskGenerator's masks, drawn from the step's generator (after the latents)."""
    from sora.masks import MaskGenerator
    from sora.schedulers import IDDPM
    from sora.train import train_step

    model = SizeConditioned()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = {"mean": torch.randn(3, 3, 8, 4, 4), "y": torch.randn(3, 1, 2, 8), "height": torch.tensor([144] * 3),
             "width": torch.tensor([256] * 3), "ar": torch.tensor([256 / 144] * 3, dtype=torch.float64),
             "fps": torch.tensor([24.0, 120.0, 30.0], dtype=torch.float64), "num_frames": torch.tensor([8] * 3)}
    masks = MaskGenerator({"mask_quarter_random": 0.5, "mask_image_head": 0.5})
    train_step(model, SizeConditioned(), optimizer, IDDPM(), batch, torch.Generator().manual_seed(3),
               mask_generator=masks)
    (call,) = model.calls
    expected_masks = masks.get_masks(3, 8, torch.Generator().manual_seed(3))
    assert torch.equal(call["x_mask"], expected_masks) and not expected_masks.all()
    for key in ("height", "width", "ar", "fps", "num_frames"):
        assert call[key].dtype == torch.float32 and torch.equal(call[key], batch[key].float()), key


def test_mask_ratios_need_a_model_that_takes_x_mask(tmp_path, clips, capsys):
    with pytest.raises(SystemExit):
        train(tmp_path, clips, "--max-steps", "1", "--mask-ratios", "{'mask_no': 1.0}")
    assert "mask_ratios needs a model that takes x_mask (STDiT2); STDiT does not" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train(tmp_path, clips, "--max-steps", "1", "--mask-ratios", "{'mask_no': 0.5}")
    assert "mask_ratios must sum to 1, got 0.5" in capsys.readouterr().err


def test_trainer_pieces_import_without_pyav():
    """The benchmarks time train_step and optimizer_step on GPU machines without PyAV: only building a dataset
    needs it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['av'] = None; "
            "from sora.train import train_step, optimizer_step, build_optimizer, run; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr
