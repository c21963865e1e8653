"""Loading released checkpoints into our models.

Accepted: a training checkpoint folder (its ema.pt), a `.pt`/`.pth` file holding a state dict, or one under "ema" (preferred, as Open-Sora's loader
does), "model", "state_dict" or "module"; or a `.safetensors` file. Adjustments made for the formats the
authors released:
- a 2-D patch-embed weight (C, in, ph, pw) from an image model (PixArt-alpha, DiT, Latte) gains a time axis;
- position embeddings (`pos_embed`, `pos_embed_spatial`, `pos_embed_temporal`, Latte's `temp_embed`) are
  dropped: the model recomputes them for its configured size and scales;
- a "module." prefix (DistributedDataParallel) is stripped.
Loading is non-strict (an STDiT may start from PixArt-alpha weights, which have no temporal attention), but
a weight whose shape differs from the model's, or a file that matches none of the model's weights, is an
error naming it.
"""

import argparse
import logging
import os

import torch

log = logging.getLogger(__name__)

WRAPPERS = ("ema", "model", "state_dict", "module")
# torch.load(weights_only=True) keeps arbitrary pickled code out; Latte's release also carries its training
# arguments as an argparse Namespace, which is plain data.
torch.serialization.add_safe_globals([argparse.Namespace])
RECOMPUTED = ("pos_embed", "pos_embed_spatial", "pos_embed_temporal", "temp_embed")


def read_state_dict(path):
    """The raw tensors of a checkpoint file, unwrapped from the known container keys. A training checkpoint
    folder (epoch{E}-global_step{S}/) stands for its ema.pt."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "ema.pt")):
        path = os.path.join(path, "ema.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint {path!r} does not exist (expected a .pt, .pth or .safetensors file, or a training "
            "checkpoint folder with ema.pt)"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not a checkpoint we can read"
        raise ValueError(f"cannot read checkpoint {path!r}: {error}") from None
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
