"""Loading released checkpoints into our models.

Accepted: a training checkpoint folder (its ema.pt), a `.pt`/`.pth` file holding a state dict, or one under
"ema" (preferred, as Open-Sora's loader does), "model", "state_dict" or "module"; a `.safetensors` file; or a
Hugging Face model folder (config.json + model.safetensors, as Open-Sora v1.1 released STDiT2), also named on
the hub as `hf://ORG/REPO` or `hf://ORG/REPO@REVISION` (`folder_config` reads its config.json).
Any of these files may also be named on the Hugging Face hub as `hf://ORG/REPO/FILE` (or
`hf://ORG/REPO@REVISION/FILE`), e.g. `hf://hpcai-tech/Open-Sora/OpenSora-v1-HQ-16x256x256.pth`: it is fetched
once by huggingface_hub into its cache (HF_HUB_CACHE) and read from there, also offline (HF_HUB_OFFLINE=1). The
prefix keeps hub names apart from relative paths such as `pretrained_models/OpenSora-v1-HQ-16x256x256.pth`.
Files are read with `torch.load(weights_only=True)`: a file holding pickled code, or not a checkpoint at all,
is refused with one line. Adjustments made for the formats the authors released:
- a 2-D patch-embed weight (C, in, ph, pw) from an image model (PixArt-alpha, DiT, Latte) gains a time axis;
- position embeddings (`pos_embed`, `pos_embed_spatial`, `pos_embed_temporal`, Latte's `temp_embed`) are
  dropped: the model recomputes them for its configured size and scales;
- a "module." prefix (DistributedDataParallel) is stripped.
A model may adjust the tensors further (its `adapt_checkpoint(state)`: STDiT2 fits a null caption of another
length). Loading is non-strict (an STDiT may start from PixArt-alpha weights, which have no temporal
attention), but a weight whose shape differs from the model's, or a file that matches none of the model's
weights, is an error naming it.
"""

import argparse
import glob
import json
import logging
import os
import re

import torch

from sora.registry import hub_offline

log = logging.getLogger(__name__)

WRAPPERS = ("ema", "model", "state_dict", "module")
# torch.load(weights_only=True) keeps arbitrary pickled code out; Latte's release also carries its training
# arguments as an argparse Namespace, which is plain data.
torch.serialization.add_safe_globals([argparse.Namespace])
RECOMPUTED = ("pos_embed", "pos_embed_spatial", "pos_embed_temporal", "temp_embed")
HUB_PREFIX = "hf://"
# hf://ORG/REPO[@REVISION]/FILE, FILE possibly in a subfolder of the repository.
_HUB_FILE = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^/]+))?/(?P<filename>[^@]+)$")
# hf://ORG/REPO[@REVISION]: a Hugging Face model folder (config.json + model.safetensors).
_HUB_REPO = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^/]+))?/?$")
HF_FILES = ("config.json", "model.safetensors")
EXPECTED = (
    "expected a PyTorch state dict saved with torch.save (.pt/.pth, possibly under 'ema', 'model', 'state_dict' "
    "or 'module'), a .safetensors file, or a training checkpoint folder with ema.pt"
)


def hub_file(name):
    """The local path of `hf://ORG/REPO[@REVISION]/FILE`, downloaded by huggingface_hub into its cache on first
    use (offline, HF_HUB_OFFLINE=1, only the cache is read)."""
    if _HUB_FILE.match(name) is None:
        raise ValueError(
            f"hub checkpoint {name!r} is not of the form hf://ORG/REPO/FILE or hf://ORG/REPO@REVISION/FILE, "
            "nor a model folder hf://ORG/REPO[@REVISION]"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    parts = parse_hub_file(name)
    offline = hub_offline()
    try:
        return hf_hub_download(*parts[:2], revision=parts[2], local_files_only=bool(offline))
    except (OSError, ValueError, EntryNotFoundError) as error:
        if offline:
            raise FileNotFoundError(f"checkpoint {name!r}: offline ({offline}) and not in the Hugging Face cache; "
                                    "download it where the hub can be reached, or pass a local file") from None
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise FileNotFoundError(f"could not fetch checkpoint {name!r} from the Hugging Face hub: {reason}") from None


def hub_folder(name):
    """The local folder of `hf://ORG/REPO[@REVISION]`: its config.json and model.safetensors, downloaded by
    huggingface_hub into its cache on first use (both land in the same snapshot folder)."""
    match = _HUB_REPO.match(name)
    revision = f"@{match['revision']}" if match["revision"] else ""
    return os.path.dirname([hub_file(f"hf://{match['repo']}{revision}/{file}") for file in HF_FILES][-1])


def folder_config(path):
    """The config.json of a Hugging Face model folder (local, or `hf://ORG/REPO[@REVISION]`) as a dict; None for
    any other checkpoint."""
    path = os.fspath(path)
    if _HUB_REPO.match(path):
        path = hub_folder(path)
    config = os.path.join(path, HF_FILES[0])
    if not (os.path.isdir(path) and os.path.isfile(config)):
        return None
    try:
        with open(config) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {config}: {error}") from None


def parse_hub_file(name):
    """(repo, filename, revision) of `hf://ORG/REPO[@REVISION]/FILE`, or of a model folder `hf://ORG/REPO[@REVISION]`
    (its weights file), or None for a name of another form."""
    match = _HUB_FILE.match(name)
    if match is not None:
        return match["repo"], match["filename"], match["revision"]
    match = _HUB_REPO.match(name)
    return None if match is None else (match["repo"], HF_FILES[1], match["revision"])


def _load_error(path, error):
    """One line for a file torch.load refuses: pickled objects outside plain data (which weights_only keeps
    out), or bytes that are no checkpoint at all (torch's own message then only advises unsafe loading)."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if refused:
        return ValueError(
            f"cannot read checkpoint {path!r}: it holds a pickled {refused[1].rstrip('.')} object, which sora does "
            f"not load (it reads only tensors and plain data, torch.load(weights_only=True)); {EXPECTED}"
        )
    return ValueError(f"cannot read checkpoint {path!r}: the file is not a checkpoint sora can read; {EXPECTED}")


def _folder_without_checkpoint(path):
    """What a folder that holds no ema.pt is, and what to give instead."""
    checkpoints = sorted(glob.glob(os.path.join(glob.escape(path), "epoch*-global_step*", "ema.pt")),
                         key=lambda p: int(re.search(r"global_step(\d+)", p)[1]))
    if checkpoints:
        return (f"checkpoint {path!r} is a training run folder (what --load takes), not a checkpoint: give one of "
                f"its checkpoint folders, e.g. {os.path.dirname(checkpoints[-1])!r} (the newest)")
    return f"checkpoint {path!r} is a folder without ema.pt, not a training checkpoint folder; {EXPECTED}"


def read_state_dict(path):
    """The raw tensors of a checkpoint file, unwrapped from the known container keys. A training checkpoint
    folder (epoch{E}-global_step{S}/) stands for its ema.pt."""
    path = os.fspath(path)
    if path.startswith(HUB_PREFIX):
        path = hub_folder(path) if _HUB_REPO.match(path) else hub_file(path)
    if os.path.isdir(path):
        for name in ("ema.pt", HF_FILES[1]):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(_folder_without_checkpoint(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint {path!r} does not exist ({EXPECTED}, or hf://ORG/REPO/FILE on the Hugging Face hub)"
        )
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as error:
            raise ValueError(
                f"cannot read checkpoint {path!r}: not a .safetensors file sora can read ({error})"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling arbitrary bytes fails in many ways (KeyError, EOFError, ...)
        raise _load_error(path, error) from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(state).__name__}, not a state dict")
    for key in WRAPPERS:
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def adapt_state_dict(state, own):
    """Rename and reshape a released state dict to the conventions of the model whose state dict is `own`
    (see the module docstring)."""
    adapted = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if name.startswith("module."):
            name = name[len("module."):]
        if name in RECOMPUTED:
            continue
        if name == "x_embedder.proj.weight" and tensor.dim() == 4 and own.get(name, tensor).dim() == 5:
            tensor = tensor.unsqueeze(2)
        adapted[name] = tensor
    return adapted


def load_checkpoint(model, path):
    """Load `path` into `model` (see the module docstring). Returns (missing, unexpected) key lists."""
    own = model.state_dict()
    state = adapt_state_dict(read_state_dict(path), own)
    if hasattr(model, "adapt_checkpoint"):
        state = model.adapt_checkpoint(state)
    mismatched = [
        f"{name} {tuple(tensor.shape)} (model: {tuple(own[name].shape)})"
        for name, tensor in state.items()
        if name in own and own[name].shape != tensor.shape
    ]
    if mismatched:
        raise ValueError(
            f"checkpoint {path!r} does not match the model: {len(mismatched)} weight(s) differ in shape, "
            f"e.g. {'; '.join(mismatched[:3])}"
        )
    matched = [name for name in state if name in own]
    if not matched:
        raise ValueError(
            f"checkpoint {path!r} does not match the model: none of its {len(state)} weights "
            f"(e.g. {next(iter(state), 'none')!r}) is a weight of {type(model).__name__}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if name not in RECOMPUTED]
    log.info("loaded %d weights from %s", len(matched), path)
    if missing:
        log.warning("%d weights not in %s, left as initialised: %s", len(missing), path, _summary(missing))
    if unexpected:
        log.warning("%d weights in %s not used by the model: %s", len(unexpected), path, _summary(unexpected))
    return missing, unexpected


def _summary(names, shown=8):
    more = f" ... and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
