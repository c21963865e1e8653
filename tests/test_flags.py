"""Every documented flag of `python -m sora.sample` and `python -m sora.train` changes what it says it changes.

Sampling: each row runs the tiny config (made smaller still) with one flag and compares what reached the model,
the scheduler, the encoders and the written files with a run without it. Training: each row checks the parsed
and validated config (sora.train owns what it does with it). Both tables must cover every key of the schema
and every alias, so a new flag needs a row here.
"""

import contextlib
import copy
import io
import os

import pytest
import torch

import sora.data.video
import sora.sample
from sora.checkpointing import save_checkpoint
from sora.config import ALIASES, SCHEMAS, parse_args
from sora.launch import main
from sora.schedulers import DPMSolver

TINY = "configs/tiny/sample.py"
SMALL = ["--num-frames", "2", "--image-size", "32,32", "--num-sampling-steps", "2", "--model.depth", "2",
         "--model.hidden_size", "64", "--model.num_heads", "4"]


def sample(out, *flags):
    """Run sora.sample on the small config; what it did: the calls of sample_videos (model, vae, encoder,
    scheduler, prompts, seed, model calls), the saved videos (by file name, with fps), stdout, the exit code
    and stderr."""
    record = dict(calls=[], saved={}, code=0)
    real_sample_videos, real_save = sora.sample.sample_videos, sora.data.video.save_sample

    def sample_videos(model, vae, text_encoder, scheduler, prompts, latent_size, seed, device, dtype, **kwargs):
        calls = []
        hook = model.register_forward_hook(lambda *args: calls.append(1))
        videos = real_sample_videos(model, vae, text_encoder, scheduler, prompts, latent_size, seed, device, dtype,
                                    **kwargs)
        hook.remove()
        record["calls"].append(dict(model=model, vae=vae, text_encoder=text_encoder, scheduler=scheduler,
                                    prompts=prompts, seed=seed, model_calls=len(calls)))
        return videos

    def save_sample(video, path, fps):
        record["saved"][os.path.basename(path)] = (video.clone(), fps)
        return real_save(video, path, fps)

    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sora.sample, "sample_videos", sample_videos)
        patch.setattr(sora.data.video, "save_sample", save_sample)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main(sora.sample.run, "sample", [TINY, "--save-dir", str(out), *SMALL, *flags])
            except SystemExit as exit_info:
                record["code"] = exit_info.code
    record.update(out=str(out), stdout=stdout.getvalue(), stderr=stderr.getvalue().strip())
    return record


def video(record, name="sample_0000"):
    return record["saved"][name][0]


def differs(a, b):
    return a.shape == b.shape and (a - b).abs().mean() > 1e-3


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return sample(tmp_path_factory.mktemp("base") / "out")


@pytest.fixture(scope="module")
def checkpoints(base, tmp_path_factory):
    """A state-dict file and a training checkpoint folder for the small model: the file holds random weights
    (a model that, unlike the freshly built one with its zero output layer, sees its condition); the folder
    holds that file's weights as its EMA, after 5 updates, and as its trained weights the freshly built model
    predicting a constant eps."""
    folder = tmp_path_factory.mktemp("ckpt")
    model = copy.deepcopy(base["calls"][0]["model"]).float()
    ema = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(-2.0)
        for param in ema.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    torch.save({"ema": ema.state_dict()}, folder / "tiny.pth")
    optimizer = torch.optim.AdamW(model.parameters())
    states = dict(epoch=0, step=5, global_step=5, seed=42)
    run = save_checkpoint(str(folder), model, ema, optimizer, states)
    return dict(file=str(folder / "tiny.pth"), folder=run)


def fails(message):
    def check(base, run, paths):
        return run["code"] == 2 and len(run["stderr"].splitlines()) == 1 and message in run["stderr"]
    return check


def prompts(record):
    return [prompt for called in record["calls"] for prompt in called["prompts"]]


def call(key):
    return lambda record: record["calls"][0][key]


SAMPLE_FLAGS = {
    "num_frames": (["--num-frames", "4"], lambda base, run, paths: video(run).shape[1] == 4 != video(base).shape[1]),
    "fps": (["--fps", "3"], lambda base, run, paths: run["saved"]["sample_0000"][1] == 3 != base["saved"]["sample_0000"][1]),
    "image_size": (["--image-size", "32,48"], lambda base, run, paths: video(run).shape[2:] == (32, 48)),
    "frame_interval": (["--frame-interval", "2"],
                       lambda base, run, paths: run["saved"]["sample_0000"][1] == 2 != base["saved"]["sample_0000"][1]),
    "multi_resolution": (["--multi-resolution", "true"], fails("multi_resolution")),
    # The small config's STDiT takes no x_mask: these flags reach sora.reference's checks, or the model check.
    "reference_path": (["--reference-path", "MISSING.png", "none", "--mask-strategy", "0", "none"],
                       fails("reference 'MISSING.png' cannot be read: no such file")),
    "mask_strategy": (["--mask-strategy", "0,x", "none"], fails("mask_strategy '0,x': group '0,x' is not numbers")),
    "loop": (["--loop", "2"], fails("loop=2 needs condition_frame_length")),
    "condition_frame_length": (["--loop", "2", "--condition-frame-length", "1"],
                               fails("need a model that takes x_mask (STDiT2); STDiT does not")),
    "model": (["--model", "{'type': 'STDiT', 'depth': 1, 'hidden_size': 32, 'num_heads': 2}"],
              lambda base, run, paths: len(call("model")(run).blocks) == 1 and call("model")(run).hidden_size == 32),
    "vae": (["--vae", "{'type': 'PixelVAE', 'factor': 4}"],
            lambda base, run, paths: call("vae")(run).factor == 4 != call("vae")(base).factor),
    "text_encoder": (["--text-encoder.model_max_length", "16"],
                     lambda base, run, paths: call("text_encoder")(run).model_max_length == 16
                     and call("model")(run).y_embedder.y_embedding.shape[0] == 16),
    "scheduler": (["--scheduler.type", "dpm-solver"], lambda base, run, paths: isinstance(call("scheduler")(run), DPMSolver)),
    "num_sampling_steps": (["--num-sampling-steps", "3"],
                           lambda base, run, paths: call("model_calls")(run) == 3 and call("model_calls")(base) == 2),
    "cfg_scale": (["--ckpt-path", "FILE", "--cfg-scale", "1.5"],
                  lambda base, run, paths: call("scheduler")(run).cfg_scale == 1.5
                  and differs(video(run), video(sample(paths["tmp"] / "ref", "--ckpt-path", paths["FILE"])))),
    "dtype": (["--dtype", "bf16"], lambda base, run, paths: next(call("model")(run).parameters()).dtype == torch.bfloat16),
    "batch_size": (["--batch-size", "1"],
                   lambda base, run, paths: [c["prompts"] for c in run["calls"]] == [[p] for p in prompts(base)]
                   and len(base["calls"]) == 1),
    "seed": (["--seed", "7"], lambda base, run, paths: call("seed")(run) == 7 and differs(video(run), video(base))),
    "prompt": (["--prompt", "a green triangle"], lambda base, run, paths: prompts(run) == ["a green triangle"]),
    # The config file sets `prompt`: a prompt file given on the command line replaces it.
    "prompt_path": (["--prompt-path", "PROMPTS"], lambda base, run, paths: prompts(run) == ["one", "two", "three"]),
    "save_dir": (["--save-dir", "ELSEWHERE"],
                 lambda base, run, paths: sorted(os.listdir(paths["ELSEWHERE"])) == ["sample_0000.mp4", "sample_0001.mp4"]),
    "sp_size": (["--sp-size", "2"], fails("sp_size=2 does not divide the number of processes 1")),
    "ckpt_path": (["--ckpt-path", "FILE"],
                  lambda base, run, paths: "weights: " in run["stdout"] and differs(video(run), video(base))),
    "weights": (["--ckpt-path", "FOLDER", "--weights", "model"],
                lambda base, run, paths: "the trained model of" in run["stdout"] and differs(video(run), video(base))),
    "compile": (["--compile", "true"],
                lambda base, run, paths: type(call("model")(run)).__name__ == "OptimizedModule"
                and torch.allclose(video(run), video(base), rtol=1e-4, atol=1e-4)),
    # 4 steps, every 2nd computed and the last: 0, 2, 3.
    "cache": (["--num-sampling-steps", "4", "--cache.type", "residual", "--cache.trigger", "interval",
               "--cache.every", "2"],
              lambda base, run, paths: "model calls: 3 of 4" in run["stdout"]
              and "model calls: 2 of 2" in base["stdout"]),
}


def test_sample_table_covers_every_documented_flag():
    assert set(SAMPLE_FLAGS) == set(SCHEMAS["sample"]) | set(ALIASES)


@pytest.mark.parametrize("key", sorted(SAMPLE_FLAGS))
def test_sample_flag_changes_what_it_says(key, base, checkpoints, tmp_path):
    flags, check = SAMPLE_FLAGS[key]
    (tmp_path / "prompts.txt").write_text("one\ntwo\n\nthree\n")
    paths = {"PROMPTS": str(tmp_path / "prompts.txt"), "ELSEWHERE": str(tmp_path / "elsewhere"),
             "FILE": checkpoints["file"], "FOLDER": checkpoints["folder"], "tmp": tmp_path}
    run = sample(tmp_path / "out", *[paths.get(flag, flag) for flag in flags])
    assert run["code"] == 0 or check.__qualname__.startswith("fails"), run["stderr"]
    assert check(base, run, paths)


def test_weights_ema_is_the_default_and_says_its_updates(base, checkpoints, tmp_path):
    run = sample(tmp_path / "out", "--ckpt-path", checkpoints["folder"])
    assert f"weights: the EMA of {checkpoints['folder']}, which has seen 5 updates" in run["stdout"]
    from_file = sample(tmp_path / "file", "--ckpt-path", checkpoints["file"])
    assert torch.equal(video(run), video(from_file))  # the folder's EMA is the file's weights
    trained = sample(tmp_path / "trained", "--ckpt-path", checkpoints["folder"], "--weights", "model")
    assert differs(video(trained), video(run))
    assert "weights: random (no checkpoint given: set --ckpt-path), so the videos will be noise" in base["stdout"]


TRAIN = "configs/tiny/train.py"

# flag -> (value, where it lands in the validated config, the value expected there)
TRAIN_FLAGS = {
    "num_frames": ("4", "num_frames", 4),
    "frame_interval": ("3", "frame_interval", 3),
    "image_size": ("32,48", "image_size", (32, 48)),
    "data_path": ("clips.csv", "data_path", "clips.csv"),
    "root": ("videos", "root", "videos"),
    "use_image_transform": ("true", "use_image_transform", True),
    "num_workers": ("3", "num_workers", 3),
    "bucket_config": ("{'256': {16: (1.0, 4)}}", "bucket_config", {"256": {16: (1.0, 4)}}),
    "mask_ratios": ("{'mask_no': 1.0}", "mask_ratios", {"mask_no": 1.0}),
    "model": ("{'type': 'DiT', 'condition': 'label_10'}", "model", {"type": "DiT", "condition": "label_10"}),
    "vae": ("{'type': 'PixelVAE', 'factor': 2}", "vae", {"type": "PixelVAE", "factor": 2}),
    "text_encoder": ("{'type': 'classes', 'num_classes': 10}", "text_encoder", {"type": "classes", "num_classes": 10}),
    "scheduler": ("{'type': 'iddpm', 'timestep_respacing': '50'}", "scheduler", {"type": "iddpm", "timestep_respacing": "50"}),
    "dtype": ("bf16", "dtype", "bf16"),
    "grad_checkpoint": ("true", "grad_checkpoint", True),
    "plugin": ("zero2-seq", "plugin", "zero2-seq"),
    "sp_size": ("2", "sp_size", 2),
    "seed": ("7", "seed", 7),
    "outputs": ("runs", "outputs", "runs"),
    "wandb": ("true", "wandb", True),
    "epochs": ("3", "epochs", 3),
    "max_steps": ("5", "max_steps", 5),
    "log_every": ("7", "log_every", 7),
    "ckpt_every": ("0", "ckpt_every", 0),
    "load": ("runs/000/epoch0-global_step5", "load", "runs/000/epoch0-global_step5"),
    "batch_size": ("3", "batch_size", 3),
    "lr": ("1e-3", "lr", 1e-3),
    "grad_clip": ("0.5", "grad_clip", 0.5),
    "ema_decay": ("0.9", "ema_decay", 0.9),
    "ckpt_path": ("ckpt.pt", "model.from_pretrained", "ckpt.pt"),
    "num_sampling_steps": ("25", "scheduler.num_sampling_steps", 25),
    "cfg_scale": ("2", "scheduler.cfg_scale", 2.0),
}


def lookup(cfg, key):
    for part in key.split("."):
        cfg = cfg.get(part)
    return cfg


def test_train_table_covers_every_documented_flag():
    assert set(TRAIN_FLAGS) == set(SCHEMAS["train"]) | set(ALIASES)


@pytest.mark.parametrize("key", sorted(TRAIN_FLAGS))
def test_train_flag_sets_its_key(key):
    text, where, expected = TRAIN_FLAGS[key]
    without = parse_args([TRAIN], "train")
    cfg = parse_args([TRAIN, f"--{key.replace('_', '-')}", text], "train")
    assert lookup(without, where) != expected
    assert lookup(cfg, where) == expected and isinstance(lookup(cfg, where), type(expected))
    # nothing else changes
    others = {k: v for k, v in cfg.items() if k != where.split(".")[0]}
    assert others == {k: v for k, v in without.items() if k != where.split(".")[0]}
