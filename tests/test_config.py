import copy
import functools
import pickle
import subprocess
import sys
import textwrap

import pytest

from sora.config import (
    Config,
    apply_overrides,
    format_config,
    load_config,
    parse_args,
    validate,
)
from sora.registry import build

SAMPLE = """
import math
from math import pi
from string import ascii_lowercase

num_frames = 16
fps = 24 // 3
image_size = (256, 256)

model = dict(
    type="STDiT-XL/2",
    space_scale=0.5,
    time_scale=1.0,
    enable_flashattn=True,
    from_pretrained="PRETRAINED_MODEL",
)
vae = dict(type="VideoAutoencoderKL", from_pretrained="stabilityai/sd-vae-ft-ema", micro_batch_size=None)
text_encoder = dict(type="t5", from_pretrained="./pretrained_models/t5_ckpts", model_max_length=120)
scheduler = dict(type="iddpm", cfg_scale=7.0)
dtype = "fp16"

_scratch = math.sqrt(4) + len(ascii_lowercase)
def helper():
    return 1

batch_size = 2
seed = 42
prompt_path = "./assets/texts/t2v_samples.txt"
save_dir = "./outputs/samples/"
"""

TRAIN = """
num_frames = 16
frame_interval = 3
image_size = (256, 256)
root = None
data_path = "CSV_PATH"
use_image_transform = False
num_workers = 4
dtype = "bf16"
grad_checkpoint = True
plugin = "zero2"
sp_size = 1
model = dict(type="STDiT-XL/2", from_pretrained=None)
vae = dict(type="VideoAutoencoderKL", from_pretrained="stabilityai/sd-vae-ft-ema")
text_encoder = dict(type="t5", from_pretrained="./pretrained_models/t5_ckpts", shardformer=True)
scheduler = dict(type="iddpm", timestep_respacing="")
seed = 42
outputs = "outputs"
wandb = False
epochs = 1000
log_every = 10
ckpt_every = 1000
load = None
batch_size = 8
lr = 2e-5
grad_clip = 1.0
"""


def write(tmp_path, text, name="cfg.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture
def sample_path(tmp_path):
    return write(tmp_path, SAMPLE)


@pytest.fixture
def train_path(tmp_path):
    return write(tmp_path, TRAIN, "train.py")


def test_load_config_keeps_settings_only(sample_path):
    cfg = load_config(sample_path)
    assert list(cfg) == [
        "num_frames", "fps", "image_size", "model", "vae", "text_encoder", "scheduler", "dtype",
        "batch_size", "seed", "prompt_path", "save_dir",
    ]  # fmt: skip
    assert cfg.fps == 8 and cfg["fps"] == 8
    assert cfg.image_size == (256, 256)
    assert isinstance(cfg.model, Config)
    assert cfg.model.space_scale == 0.5 and cfg["model"]["type"] == "STDiT-XL/2"
    assert cfg.vae.micro_batch_size is None


def test_config_attribute_access():
    cfg = Config(a=1, nested=dict(b=dict(c=2)))
    assert cfg.nested.b.c == 2 and isinstance(cfg.nested.b, Config)
    cfg.x = dict(y=3)
    assert cfg["x"].y == 3
    cfg.update(z={"w": 4})
    assert cfg.z.w == 4
    with pytest.raises(AttributeError, match="missing"):
        cfg.missing
    assert getattr(cfg, "missing", "default") == "default"
    del cfg.a
    assert "a" not in cfg
    for clone in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert clone == cfg and isinstance(clone.nested.b, Config) and clone.nested.b.c == 2


def test_every_sample_flag_reaches_its_key(sample_path):
    cfg = parse_args(
        [
            sample_path,
            "--prompt-path", "p.txt",
            "--save-dir", "out",
            "--num-sampling-steps", "25",
            "--cfg-scale", "4",
            "--seed", "7",
            "--dtype", "bf16",
            "--batch-size", "3",
            "--ckpt-path", "ckpt.pt",
            "--model.enable_flashattn", "false",
            "--model.enable-layernorm-kernel", "yes",
            "--vae.micro_batch_size", "4",
            "--scheduler.type", "dpm-solver",
            "--image-size", "128,192",
            "--num-frames=8",
            "--text_encoder.from_pretrained", "none",
        ],
        "sample",
    )  # fmt: skip
    assert cfg.prompt_path == "p.txt"
    assert cfg.save_dir == "out"
    # Open-Sora v1 dropped --num-sampling-steps; here it reaches the scheduler as an int.
    assert cfg.scheduler.num_sampling_steps == 25 and type(cfg.scheduler.num_sampling_steps) is int
    assert cfg.scheduler.cfg_scale == 4.0 and type(cfg.scheduler.cfg_scale) is float
    assert cfg.scheduler.type == "dpm-solver"
    assert cfg.seed == 7 and cfg.dtype == "bf16" and cfg.batch_size == 3
    assert cfg.model.from_pretrained == "ckpt.pt"
    assert cfg.model.enable_flashattn is False and cfg.model.enable_layernorm_kernel is True
    assert cfg.vae.micro_batch_size == 4
    assert cfg.image_size == (128, 192) and cfg.num_frames == 8
    assert cfg.text_encoder.from_pretrained is None
    assert "ckpt_path" not in cfg and "num_sampling_steps" not in cfg


def test_flag_value_forms(sample_path):
    cfg = load_config(sample_path)
    apply_overrides(cfg, ["--image-size", "[64, 96]", "--model.space_scale", "0.25"], "sample")
    assert cfg.image_size == (64, 96) and cfg.model.space_scale == 0.25
    apply_overrides(cfg, ["--model.enable_flashattn", "1", "--model.input_sizes", "16,32,32"], "sample")
    assert cfg.model.enable_flashattn is True and cfg.model.input_sizes == (16, 32, 32)
    apply_overrides(cfg, ["--model.enable_flashattn", "0", "--model.from_pretrained", "123"], "sample")
    # a string stays a string even when it reads as a number
    assert cfg.model.enable_flashattn is False and cfg.model.from_pretrained == "123"
    apply_overrides(cfg, ["--text_encoder.config.d_model", "64"], "sample")
    assert cfg.text_encoder.config == {"d_model": 64}


def test_prompt_flags_replace_then_accumulate(sample_path):
    cfg = parse_args([sample_path, "--prompt", "a cat", "--prompt", "a dog, running"], "sample")
    assert cfg.prompt == ["a cat", "a dog, running"]
    cfg = parse_args([sample_path, "--prompt=one"], "sample")
    assert cfg.prompt == ["one"]


def test_a_prompt_flag_replaces_the_files_other_prompt_key(sample_path, tmp_path):
    assert load_config(sample_path).prompt_path == "./assets/texts/t2v_samples.txt"
    cfg = parse_args([sample_path, "--prompt", "a cat"], "sample")
    assert cfg.prompt == ["a cat"] and cfg.prompt_path is None
    with_prompts = write(tmp_path, SAMPLE + "prompt = ['from the file']\n", "with_prompts.py")
    cfg = parse_args([with_prompts, "--prompt-path", "p.txt"], "sample")
    assert cfg.prompt_path == "p.txt" and cfg.prompt is None
    # both on the command line: both kept (the prompts win, `--prompt none` gives way to the file)
    cfg = parse_args([with_prompts, "--prompt-path", "p.txt", "--prompt", "none"], "sample")
    assert cfg.prompt_path == "p.txt" and cfg.prompt is None
    cfg = parse_args([with_prompts, "--prompt", "x", "--prompt-path", "p.txt"], "sample")
    assert cfg.prompt == ["x"] and cfg.prompt_path == "p.txt"


def test_base_inheritance(tmp_path):
    (tmp_path / "bases").mkdir()
    write(tmp_path, """
        num_frames = 16
        image_size = (256, 256)
        model = dict(type="STDiT-XL/2", space_scale=0.5, enable_flashattn=True)
        scheduler = dict(type="iddpm", num_sampling_steps=100, cfg_scale=7.0)
        text_encoder = dict(type="t5", from_pretrained="t5")
        prompt = ["from the base"]
    """, "bases/base.py")
    write(tmp_path, """
        _base_ = "base.py"
        vae = dict(type="VideoAutoencoderKL", from_pretrained="sd-vae")
        fps = 12
    """, "bases/middle.py")
    child = write(tmp_path, """
        _base_ = ["bases/middle.py"]
        num_frames = 8
        model = dict(space_scale=1.0, from_pretrained="ckpt.pth")
        scheduler = dict(_delete_=True, type="dpm-solver", num_sampling_steps=20)
        text_encoder = dict(model_max_length=60)
    """, "child.py")
    cfg = load_config(child)
    assert cfg == {
        "num_frames": 8,  # child wins
        "image_size": (256, 256),
        "model": {"type": "STDiT-XL/2", "space_scale": 1.0, "enable_flashattn": True, "from_pretrained": "ckpt.pth"},
        "scheduler": {"type": "dpm-solver", "num_sampling_steps": 20},  # _delete_: the base's dict is replaced
        "text_encoder": {"type": "t5", "from_pretrained": "t5", "model_max_length": 60},
        "prompt": ["from the base"],
        "vae": {"type": "VideoAutoencoderKL", "from_pretrained": "sd-vae"},
        "fps": 12,
    }
    validate(cfg, "sample")  # no _base_ or _delete_ left for validation to reject
    assert load_config(tmp_path / "bases/base.py")["model"] == {"type": "STDiT-XL/2", "space_scale": 0.5,
                                                                 "enable_flashattn": True}


@pytest.mark.parametrize("text, message", [
    ('_base_ = "nowhere.py"', r"_base_ file not found: .*nowhere\.py"),
    ("_base_ = 3", "_base_ must be a path or a list of paths, got 3"),
    ('_base_ = "self.py"', "inherits from itself through _base_"),
])
def test_base_errors(tmp_path, text, message):
    path = write(tmp_path, text + "\nnum_frames = 1\n", "self.py")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_config(path)


def test_train_flags_and_defaults(train_path):
    bucket = "{'256': {16: (1.0, 4), 1: (1.0, 32)}}"
    cfg = parse_args(
        [train_path, "--max-steps", "5", "--load", "outputs/000/epoch0-global_step5", "--wandb", "true",
         "--data-path", "data.csv", "--bucket-config", bucket, "--lr", "1e-4", "--plugin", "zero2-seq",
         "--sp-size", "2", "--grad-checkpoint", "no"],
        "train",
    )  # fmt: skip
    assert cfg.max_steps == 5 and cfg.load == "outputs/000/epoch0-global_step5" and cfg.wandb is True
    assert cfg.data_path == "data.csv" and cfg.lr == 1e-4
    assert cfg.bucket_config == {"256": {16: (1.0, 4), 1: (1.0, 32)}}
    assert cfg.plugin == "zero2-seq" and cfg.sp_size == 2 and cfg.grad_checkpoint is False
    assert cfg.ema_decay == 0.9999  # filled-in default
    assert cfg.text_encoder.shardformer is True  # passed on to the encoder, which ignores it


def test_defaults_filled_for_sample(tmp_path):
    path = write(
        tmp_path,
        """
        num_frames = 1
        image_size = [32, 32]
        model = dict(type="DiT-XL/2")
        vae = dict(type="VideoAutoencoderKL")
        text_encoder = dict(type="classes", num_classes=10)
        scheduler = dict(type="dpm-solver")
        prompt = ["3"]
        """,
    )
    cfg = parse_args([path], "sample")
    assert cfg.image_size == (32, 32)
    assert (cfg.fps, cfg.dtype, cfg.batch_size, cfg.seed, cfg.sp_size, cfg.multi_resolution) == (8, "fp16", 1, 42, 1, False)
    assert cfg.prompt_path is None and cfg.save_dir == "./outputs/samples/"


def test_unknown_key_names_closest(sample_path, tmp_path):
    cfg = load_config(sample_path)
    cfg.num_frame = 3
    with pytest.raises(ValueError, match=r"unknown config key 'num_frame' for sample; did you mean 'num_frames'\?"):
        validate(cfg, "sample")
    with pytest.raises(ValueError, match=r"unknown config key 'num_frame' for sample; did you mean 'num_frames'\?"):
        parse_args([sample_path, "--num-frame", "3"], "sample")
    with pytest.raises(ValueError, match=r"unknown config key 'modle'.*did you mean 'model'"):
        parse_args([sample_path, "--modle.enable_flashattn", "true"], "sample")
    # sampling keys are unknown to training
    # nothing close: the known keys are listed instead
    with pytest.raises(ValueError, match=r"unknown config key 'fps' for train; known keys: num_frames, frame_interval, "):
        validate(load_config(sample_path), "train")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_frames", "16", "config key 'num_frames' must be a positive integer, got '16'"),
        ("num_frames", 0, "config key 'num_frames' must be a positive integer, got 0"),
        ("seed", True, "config key 'seed' must be an integer, got True"),
        ("image_size", (256,), r"config key 'image_size' must be \(height, width\): two positive integers, got \(256,\)"),
        ("dtype", "fp64", "config key 'dtype' must be one of fp16, bf16, fp32, got 'fp64'"),
        ("model", dict(space_scale=0.5), "config key 'model' must be a dict with a 'type' string, got"),
        ("prompt_path", 3, "config key 'prompt_path' must be a string or none, got 3"),
        ("multi_resolution", "yes", "config key 'multi_resolution' must be false or 'STDiT2', got 'yes'"),
    ],
)
def test_wrong_type(sample_path, key, value, message):
    cfg = load_config(sample_path)
    cfg[key] = value
    with pytest.raises(ValueError, match=message):
        validate(cfg, "sample")


def test_bad_plugin_and_flag_values(train_path, sample_path):
    with pytest.raises(ValueError, match="config key 'plugin' must be one of zero2, zero2-seq, got 'zero3'"):
        parse_args([train_path, "--plugin", "zero3"], "train")
    with pytest.raises(ValueError, match="config key 'dtype' must be one of fp16, bf16, fp32, got 'half'"):
        parse_args([sample_path, "--dtype", "half"], "sample")
    with pytest.raises(ValueError, match="flag --seed must be an integer, got 'abc'"):
        parse_args([sample_path, "--seed", "abc"], "sample")
    with pytest.raises(ValueError, match="flag --model.enable_flashattn must be true or false or none, got 'maybe'"):
        parse_args([sample_path, "--model.enable_flashattn", "maybe"], "sample")
    with pytest.raises(ValueError, match="flag --num-sampling-steps must be a positive integer, got '2.5'"):
        parse_args([sample_path, "--num-sampling-steps", "2.5"], "sample")
    with pytest.raises(ValueError, match="flag --bucket-config must be a dict or none, got"):
        parse_args([train_path, "--bucket-config", "[1, 2]"], "train")
    with pytest.raises(ValueError, match="flag --seed needs a value"):
        parse_args([sample_path, "--seed"], "sample")
    with pytest.raises(ValueError, match="expected a --key flag, got 'seed'"):
        parse_args([sample_path, "seed", "3"], "sample")
    with pytest.raises(ValueError, match="flag --seed.x: 'seed' is not a dict"):
        parse_args([sample_path, "--seed.x", "3"], "sample")


def test_missing_required_and_prompts(tmp_path):
    path = write(tmp_path, "num_frames = 1\nimage_size = (8, 8)\n")
    with pytest.raises(ValueError, match="config key 'model' is required for sample but not set"):
        parse_args([path], "sample")
    cfg = load_config(write(tmp_path, SAMPLE.replace('prompt_path = "./assets/texts/t2v_samples.txt"', "")))
    with pytest.raises(ValueError, match="sampling needs prompts"):
        validate(cfg, "sample")


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found: .*nope.py"):
        load_config(tmp_path / "nope.py")
    bad = write(tmp_path, "num_frames = 16\nimage_size = (256, 256\nfps = 8\n", "bad.py")
    with pytest.raises(ValueError, match=r"syntax error in config .*bad\.py, line 2"):
        load_config(bad)
    broken = write(tmp_path, "num_frames = 16\nfps = undefined_name\n", "broken.py")
    with pytest.raises(ValueError, match=r"error in config .*broken\.py, line 2: NameError"):
        load_config(broken)
    with pytest.raises(ValueError, match="no config file given"):
        parse_args(["--seed", "1"], "sample")
    with pytest.raises(ValueError, match="unknown mode 'infer'"):
        validate(Config(), "infer")


def test_help_lists_keys(sample_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([sample_path, "--help"], "sample")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--num-frames: a positive integer, required" in out and "--cfg-scale: sets scheduler.cfg_scale" in out


def test_format_config_loads_back(train_path, tmp_path):
    cfg = parse_args([train_path, "--bucket-config", "{'256': {16: (1.0, 4)}}", "--model.space_scale", "0.5"], "train")
    text = format_config(cfg)
    assert 'model = dict(\n    type=\'STDiT-XL/2\',\n    from_pretrained=None,\n    space_scale=0.5,\n)' in text
    assert load_config(write(tmp_path, text, "again.py")) == cfg


def test_build_checks_type_and_options():
    def make(width, depth=2, device="cpu"):
        return (width, depth, device)

    registry = {"net": make}
    assert build(registry, dict(type="net", width=4), "model", device="meta") == (4, 2, "meta")
    with pytest.raises(ValueError, match="unknown model type 'nett'; valid types: net"):
        build(registry, dict(type="nett"), "model")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) dept for model 'net'; valid: width, depth$"):
        build(registry, dict(type="net", width=4, dept=3), "model", device="cpu")
    # a runtime argument may not come from the config
    with pytest.raises(ValueError, match=r"unknown argument\(s\) device"):
        build(registry, dict(type="net", width=4, device="cuda"), "model", device="cpu")
    # a preset is a partial: what it fixes is not an option
    registry["net-wide"] = functools.partial(make, width=64)
    assert build(registry, dict(type="net-wide", depth=3), "model") == (64, 3, "cpu")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) width for model 'net-wide'; valid: depth, device$"):
        build(registry, dict(type="net-wide", width=4), "model")


def test_builders_do_not_import_the_config_module():
    """Models, VAE, text encoders and schedulers build through sora.registry, not the command-line config."""
    code = ("import sys, sora.models, sora.models.vae, sora.models.text_encoder, sora.schedulers; "
            "print('sora.config' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "False", result.stderr


def test_open_soras_multi_value_flags():
    """Open-Sora v1.1's `--image-size H W` and one value per prompt after `--reference-path` / `--mask-strategy`
    (`none` for a prompt without), repeatable like --prompt."""
    cfg = apply_overrides(Config(num_frames=1), ["--image-size", "240", "426", "--reference-path", "a.png;b.mp4",
                                                 "none", "--mask-strategy", "0", "--mask-strategy", "0,0,0,-8,8",
                                                 "--prompt", "x", "y", "--multi-resolution", "STDiT2"], "sample")
    assert cfg.image_size == (240, 426) and cfg.reference_path == ["a.png;b.mp4", None]
    assert cfg.mask_strategy == ["0", "0,0,0,-8,8"] and cfg.prompt == ["x", "y"] and cfg.multi_resolution == "STDiT2"
    with pytest.raises(ValueError, match="expected a --key flag, got '12'"):
        apply_overrides(Config(), ["--image-size", "240", "426", "12"], "sample")
