"""Open-Sora-style `.py` configs: load a file, override it from the command line, validate, print.

A config file is plain Python; its module-level assignments are the settings, as in Open-Sora v1:

    num_frames = 16
    image_size = (256, 256)
    model = dict(type="STDiT-XL/2", space_scale=0.5, from_pretrained="PRETRAINED_MODEL")

Names starting with `_`, names bound by `import`, and modules, functions and classes are not
settings, so a config may import constants (`from sora.models.vae import TINY_VAE_CONFIG`).

Command line (`python -m sora.sample CONFIG --key value ...`): every `--key value` (or
`--key=value`) overrides the file. Dashes in a flag are underscores in the key (`--prompt-path`
sets `prompt_path`), dots reach into sub-dicts (`--model.enable_flashattn true`), and Open-Sora
v1's shortcuts keep working: `--ckpt-path` sets `model.from_pretrained`, `--num-sampling-steps`
and `--cfg-scale` set the scheduler's (Open-Sora v1 parsed `--num-sampling-steps` and then
dropped it). Text is parsed by the key's kind in the schema below, or for sub-dict keys by the
value it replaces: bool (true/false/1/0/yes/no), int, float, str, `none` where None is allowed,
(H, W) as `256,256` or `[256,256]`, dicts as Python literals. `--prompt` may be repeated. A flag always
takes effect: `--prompt` replaces the file's `prompt_path`, and `--prompt-path` the file's `prompt`.

Inheritance, as mmengine's: `_base_ = "base.py"` (or a list, merged in order) names config files, relative
to this one, whose settings this file's override: dicts are merged key by key, recursively (the child's
value wins), and a dict with `_delete_=True` replaces the base's dict instead of merging into it.

The schema lists every top-level key of each mode with its kind and default (REQUIRED: the file
must set it); `validate` rejects unknown keys (naming the closest known one) and wrong kinds, and
fills in defaults. The `model`, `vae`, `text_encoder` and `scheduler` dicts need a `type`; their
other keys are checked by the builder of that type (see `sora.registry.build`).
"""

import ast
import difflib
import inspect
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from sora.registry import DTYPES, is_int

MODES = ("sample", "train", "preprocess")
PLUGINS = ("zero2", "zero2-seq")
WEIGHTS = ("ema", "model")
REQUIRED = object()


class Config(dict):
    """A dict whose keys are also attributes (`cfg.model.type`); nested dicts become Configs."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.update(*args, **kwargs)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __setitem__(self, key, value):
        if isinstance(value, dict) and not isinstance(value, Config):
            value = Config(value)
        super().__setitem__(key, value)

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key '{key}'") from None

    def __setattr__(self, key, value):
        self[key] = value

    def __delattr__(self, key):
        try:
            del self[key]
        except KeyError:
            raise AttributeError(f"config has no key '{key}'") from None


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _parse_bool(text):
    return _BOOLS[text.lower()]


def _parse_size(text):
    return tuple(_literal(item) for item in text.strip("[]() ").split(","))


def _parse_dict(text):
    value = ast.literal_eval(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


class _Kind(NamedTuple):
    check: Callable[[Any], bool]
    text: str  # what a valid value is, for error messages
    parse: Callable[[str], Any]  # command-line text -> value; raises on bad text


_KINDS = {
    "int": _Kind(is_int, "an integer", int),
    "posint": _Kind(lambda v: is_int(v) and v > 0, "a positive integer", int),
    "float": _Kind(lambda v: is_int(v) or isinstance(v, float), "a number", float),
    "bool": _Kind(lambda v: isinstance(v, bool), "true or false", _parse_bool),
    "str": _Kind(lambda v: isinstance(v, str), "a string", str),
    "size": _Kind(
        lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(is_int(s) and s > 0 for s in v),
        "(height, width): two positive integers",
        _parse_size,
    ),
    # A repeated flag of this kind adds an item instead of replacing the list.
    "strs": _Kind(
        lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v),
        "a list of strings",
        lambda text: [text],
    ),
    # Per prompt: a string or None (Open-Sora v1.1's reference_path and mask_strategy lists); as "strs".
    "optstrs": _Kind(
        lambda v: isinstance(v, (list, tuple)) and all(s is None or isinstance(s, str) for s in v),
        "a list of strings or nones (one per prompt)",
        lambda text: [None if text.lower() in ("none", "null") else text],
    ),
    # False, or "STDiT2": pass the size, aspect ratio, frame count and fps to the model (Open-Sora v1.1).
    "multires": _Kind(
        lambda v: isinstance(v, bool) or v == "STDiT2",
        "false or 'STDiT2'",
        lambda text: "STDiT2" if text == "STDiT2" else _parse_bool(text),
    ),
    "dict": _Kind(lambda v: isinstance(v, dict), "a dict", _parse_dict),
    "module": _Kind(
        lambda v: isinstance(v, dict) and isinstance(v.get("type"), str), "a dict with a 'type' string", _parse_dict
    ),
}


@dataclass(frozen=True)
class Field:
    kind: str  # a key of _KINDS; a trailing "?" also allows None
    default: Any = REQUIRED
    choices: tuple = ()

    def describe(self):
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return _KINDS[self.kind.rstrip("?")].text + (" or none" if self.kind.endswith("?") else "")


_MODELS = {name: Field("module") for name in ("model", "vae", "text_encoder", "scheduler")}

SCHEMAS = {
    "sample": {
        "num_frames": Field("posint"),
        # The frame rate the model is conditioned on (STDiT2); videos are saved at fps // frame_interval.
        "fps": Field("posint", 8),
        "frame_interval": Field("posint", 1),
        "image_size": Field("size"),
        # "STDiT2": the model gets height, width, ar, num_frames and fps (Open-Sora v1.1); PixArt-MS's True is
        # not supported.
        "multi_resolution": Field("multires", False),
        # Open-Sora v1.1's conditioning (sora.reference): per prompt, ';'-separated images/videos and where
        # their frames go; `loop` clips, each starting with the last condition_frame_length frames of the last.
        "reference_path": Field("optstrs?", None),
        "mask_strategy": Field("optstrs?", None),
        "loop": Field("posint", 1),
        "condition_frame_length": Field("posint?", None),
        **_MODELS,
        "dtype": Field("str", "fp16", tuple(DTYPES)),
        "batch_size": Field("posint", 1),
        "seed": Field("int", 42),
        "prompt_path": Field("str?", None),  # one prompt per line
        "prompt": Field("strs?", None),  # used instead of prompt_path when set
        "save_dir": Field("str", "./outputs/samples/"),
        "sp_size": Field("posint", 1),
        # Of a training checkpoint folder (model.from_pretrained): its EMA or the trained weights themselves.
        "weights": Field("str", "ema", WEIGHTS),
        "compile": Field("bool", False),  # torch.compile the model call of every denoising step
        # The sampling loop's residual cache (sora.schedulers.cache), e.g. dict(type="residual", threshold=0.4).
        "cache": Field("dict?", None),
    },
    "train": {
        "num_frames": Field("posint"),
        "frame_interval": Field("posint", 1),
        "image_size": Field("size"),
        "data_path": Field("str"),  # CSV of video paths and captions
        "root": Field("str?", None),  # folder the CSV's paths are relative to
        "use_image_transform": Field("bool", False),
        "num_workers": Field("int", 4),
        "bucket_config": Field("dict?", None),  # {resolution: {num_frames: (keep_prob, batch_size)}}
        "mask_ratios": Field("dict?", None),  # {mask type: probability}: Open-Sora v1.1's masks (sora.masks)
        **_MODELS,
        "dtype": Field("str", "bf16", tuple(DTYPES)),
        "grad_checkpoint": Field("bool", False),
        "plugin": Field("str", "zero2", PLUGINS),
        "sp_size": Field("posint", 1),
        "seed": Field("int", 42),
        "outputs": Field("str", "outputs"),
        "wandb": Field("bool", False),
        "epochs": Field("posint", 1000),
        "max_steps": Field("posint?", None),  # stop after this many steps in all (smoke runs)
        "log_every": Field("posint", 10),
        "ckpt_every": Field("int", 1000),  # 0 or less: no checkpoints
        "load": Field("str?", None),  # checkpoint folder to resume from
        "batch_size": Field("posint?"),  # None with bucket_config, whose buckets set their batch sizes
        "lr": Field("float", 2e-5),
        "grad_clip": Field("float", 1.0),
        "ema_decay": Field("float", 0.9999),
    },
}

# sora.preprocess reads a training config and encodes its data once: training's keys, plus where to write.
SCHEMAS["preprocess"] = {
    **SCHEMAS["train"],
    "save_dir": Field("str"),  # the folder the encoded set is written to
    "shard_size": Field("posint", 256),  # CSV rows per shard file
}

# A flag replaces the file's setting of the other key of its pair: prompts given one way on the command line are
# the prompts, whatever the file gives the other way.
REPLACES = {"prompt": "prompt_path", "prompt_path": "prompt"}

# Open-Sora v1's flags whose key lives in a sub-dict, with the kind their text is parsed as.
ALIASES = {
    "ckpt_path": ("model.from_pretrained", "str?"),
    "num_sampling_steps": ("scheduler.num_sampling_steps", "posint"),
    "cfg_scale": ("scheduler.cfg_scale", "float"),
}


def _schema(mode):
    if mode not in SCHEMAS:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    return SCHEMAS[mode]


def _unknown_key(key, mode):
    known = [*SCHEMAS[mode], *ALIASES]
    closest = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{closest[0]}'?" if closest else f"known keys: {', '.join(known)}"
    return ValueError(f"unknown config key '{key}' for {mode}; {hint}")


# ---------------------------------------------------------------------------------------------
# Loading, overriding, validating, printing
# ---------------------------------------------------------------------------------------------


def load_config(path, _children=()):
    """Run an Open-Sora-style `.py` config file and return its settings as a Config, over those of its
    `_base_` files (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        if _children:
            raise FileNotFoundError(f"config {_children[-1]}: _base_ file not found: {path}")
        raise FileNotFoundError(f"config file not found: {path}")
    if os.path.abspath(path) in map(os.path.abspath, _children):
        raise ValueError(f"config {path} inherits from itself through _base_: {' -> '.join([*_children, path])}")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise ValueError(f"syntax error in config {path}, line {e.lineno}: {e.msg}") from None
    namespace = {"__file__": os.path.abspath(path), "__name__": "__config__"}
    try:
        exec(compile(tree, path, "exec"), namespace)
    except Exception as e:
        lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == path]
        raise ValueError(f"error in config {path}, line {lines[-1]}: {type(e).__name__}: {e}") from e
    assigned = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    settings = Config(
        (name, value)
        for name, value in namespace.items()
        if name in assigned and not name.startswith("_") and not (inspect.ismodule(value) or callable(value))
    )
    bases = namespace.get("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, (list, tuple)) or not all(isinstance(base, str) for base in bases):
        raise ValueError(f"config {path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged = Config()
    for base in bases:
        base_path = os.path.join(os.path.dirname(os.path.abspath(path)), base)
        merged = _merge(merged, load_config(base_path, (*_children, path)))
    return _merge(merged, settings)


def _merge(base, child):
    """`child`'s settings over `base`'s: dicts merge key by key, recursively, unless the child's says
    `_delete_=True` (then it replaces the base's); any other value replaces the base's."""
    merged = Config(base)
    for key, value in child.items():
        if isinstance(value, dict):
            value = dict(value)
            reset = value.pop("_delete_", False)
            value = _merge(merged[key] if isinstance(merged.get(key), dict) and not reset else {}, value)
        merged[key] = value
    return merged


def _literal(text):
    """Best guess for text with no declared kind: bool, None, a Python literal, else the string."""
    if text.lower() in ("true", "false", "yes", "no"):
        return _BOOLS[text.lower()]
    if text.lower() in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse(flag, text, kind):
    if kind is None:
        return _literal(text)
    if kind.endswith("?") and kind != "optstrs?" and text.lower() in ("none", "null"):  # optstrs: [None]
        return None
    try:
        return _KINDS[kind.rstrip("?")].parse(text)
    except (ValueError, SyntaxError, KeyError):
        raise ValueError(f"flag {flag} must be {Field(kind).describe()}, got {text!r}") from None


def apply_overrides(cfg, overrides, mode):
    """Apply `--key value` / `--key=value` flags (a list of strings) to `cfg` in place; return it."""
    schema = _schema(mode)
    repeated = set()  # keys of kind "strs" already set by a flag: later flags add to the list
    args = list(overrides)
    i = 0
    while i < len(args):
        flag = args[i]
        if not flag.startswith("--") or flag == "--":
            raise ValueError(f"expected a --key flag, got {flag!r}")
        name, has_value, text = flag[2:].partition("=")
        if not has_value:
            if i + 1 == len(args):
                raise ValueError(f"flag {flag} needs a value")
            text = args[i + 1]
            i += 1
        i += 1
        key = name.replace("-", "_")
        # Open-Sora's multi-value flags: `--image-size 240 426`, `--reference-path a.png "b.mp4;c.png"`.
        extra = []
        if not has_value and key in schema and schema[key].kind.rstrip("?") in ("size", "strs", "optstrs"):
            while i < len(args) and not args[i].startswith("--") and (schema[key].kind != "size" or not extra):
                extra.append(args[i])
                i += 1
        if schema.get(key) is not None and schema[key].kind == "size" and extra:
            text = f"{text},{extra.pop()}"
        top = key.split(".")[0]
        if key in ALIASES:
            key, kind = ALIASES[key]
        elif top not in schema:
            raise _unknown_key(top, mode)
        elif "." not in key:
            kind = schema[key].kind
        else:
            kind = None  # decided below from the value being replaced
        *parents, leaf = key.split(".")
        target = cfg
        for part in parents:
            if not isinstance(target.get(part, {}), dict):
                raise ValueError(f"flag {flag}: '{part}' is not a dict in the config")
            target = target.setdefault(part, Config())
        if kind is None:
            # Sub-dict keys have no schema: a bool stays a bool and a string stays a string
            # ("--scheduler.type dpm-solver", "--model.from_pretrained 123"); else guess.
            old = target.get(leaf)
            kind = "bool?" if isinstance(old, bool) else "str?" if isinstance(old, str) else None
        value = _parse(flag, text, kind)
        for more in extra:
            value = value + _parse(flag, more, kind)
        if key in repeated and kind is not None and kind.rstrip("?") in ("strs", "optstrs"):
            value = target[leaf] + value
        repeated.add(key)
        target[leaf] = value
    for key, other in REPLACES.items():
        if key in repeated and other in schema and other not in repeated:
            cfg[other] = None
    return cfg


def validate(cfg, mode):
    """Check `cfg` against the `mode` schema, fill in defaults, normalise; return it."""
    schema = _schema(mode)
    for key in cfg:
        if key not in schema:
            raise _unknown_key(key, mode)
    for key, field in schema.items():
        if key not in cfg:
            if field.default is REQUIRED:
                raise ValueError(f"config key '{key}' is required for {mode} but not set")
            cfg[key] = field.default
            continue
        value = cfg[key]
        if value is None and field.kind.endswith("?"):
            continue
        ok = value in field.choices if field.choices else _KINDS[field.kind.rstrip("?")].check(value)
        if not ok:
            raise ValueError(f"config key '{key}' must be {field.describe()}, got {value!r}")
    cfg.image_size = tuple(cfg.image_size)
    if mode == "sample" and not cfg.prompt and not cfg.prompt_path:
        raise ValueError("sampling needs prompts: set prompt_path in the config, or pass --prompt-path or --prompt")
    return cfg


def usage(mode):
    lines = [f"usage: python -m sora.{mode} CONFIG [--key value ...]", "keys (flag: kind, default):"]
    for key, field in _schema(mode).items():
        default = "required" if field.default is REQUIRED else repr(field.default)
        lines.append(f"  --{key.replace('_', '-')}: {field.describe()}, {default}")
    lines.append("  --<key>.<subkey>: a key of a sub-dict, e.g. --model.enable_flashattn true")
    lines += [f"  --{flag.replace('_', '-')}: sets {key}" for flag, (key, _) in ALIASES.items()]
    return "\n".join(lines)


def parse_args(argv, mode):
    """`[CONFIG, --key, value, ...]` -> the loaded, overridden and validated Config."""
    if "-h" in argv or "--help" in argv:
        print(usage(mode))
        raise SystemExit(0)
    if not argv or argv[0].startswith("-"):
        raise ValueError(f"no config file given; usage: python -m sora.{mode} CONFIG [--key value ...]")
    cfg = load_config(argv[0])
    apply_overrides(cfg, argv[1:], mode)
    return validate(cfg, mode)


def _format(value, depth):
    if isinstance(value, dict) and value and all(isinstance(k, str) and k.isidentifier() for k in value):
        pad = "    " * (depth + 1)
        items = "".join(f"{pad}{k}={_format(v, depth + 1)},\n" for k, v in value.items())
        return f"dict(\n{items}{'    ' * depth})"
    if isinstance(value, dict):  # keys that are not names (bucket_config): a dict literal
        return "{" + ", ".join(f"{k!r}: {_format(v, depth + 1)}" for k, v in value.items()) + "}"
    return repr(value)


def format_config(cfg):
    """The config as Python source: readable at start-up, and loadable again with load_config."""
    return "\n".join(f"{key} = {_format(value, 0)}" for key, value in cfg.items())
