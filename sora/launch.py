"""What `python -m sora.sample` and `python -m sora.train` share: process setup under torchrun or alone,
dtypes by their config names, and turning a user's mistake into one line and exit code 2."""

import logging
import os
import sys
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sora.config import format_config, parse_args
from sora.registry import DTYPES


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype

    @property
    def is_main(self):
        return self.rank == 0


def setup_logging(is_main=True):
    """Info lines (the trainer's, the checkpoint loader's "loaded N weights") on stdout on rank 0, warnings
    only on the other ranks; errors stay the entry point's one line on stderr. setup() calls it, so every
    entry point has it (sora.train's Logger adds the run's log.txt)."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)], force=True)


def setup(cfg):
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1), pick the device (this rank's
    GPU, else the CPU) and the compute dtype; seed every generator from cfg.seed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % cfg.sp_size != 0:
        raise ValueError(f"sp_size={cfg.sp_size} does not divide the number of processes {world_size}")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = DTYPES[cfg.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("dtype fp16 needs a GPU; on the CPU use fp32 or bf16")
    torch.manual_seed(cfg.seed)
    rank = dist.get_rank() if dist.is_initialized() else 0
    setup_logging(rank == 0)
    return Runtime(rank, world_size, device, dtype)


def check_writable(folder, key):
    """Create `folder` if needed and write a file into it, so that an unwritable output folder (config key
    `key`) fails in one line before any model is built, not at the first video or checkpoint."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"{key} {folder!r} cannot be written: {error.strerror or error}") from None


def main(run, mode, argv=None):
    """Parse the command line, print the resolved config, run; a ValueError or FileNotFoundError (a bad
    config, flag, path or input, raised with one clear sentence, or one per line for several) becomes that
    sentence on stderr, from rank 0 only under torchrun, and exit code 2 on every rank (SORA_TRACEBACK=1 shows
    the traceback instead)."""
    caller_group = dist.is_available() and dist.is_initialized()
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv, mode)
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_config(cfg), flush=True)
        run(cfg)
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("SORA_TRACEBACK") == "1":
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # every rank meets the same mistake: rank 0 says it
            for line in str(error).splitlines():
                print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if not caller_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # the one setup() created


def build_components(cfg, runtime, sequence_parallel=False, training=False, weights="ema"):
    """The text encoder, VAE and diffusion model a config names, wired together as Open-Sora does: the model
    takes its input size from the VAE's latent of (num_frames, *image_size), its caption width and length
    from the text encoder.

    The model is cast to the compute dtype for sampling; for training it keeps fp32 master weights (the
    compute dtype is applied by autocast or FSDP2's mixed-precision policy). `weights="model"`: with
    `model.from_pretrained` a training checkpoint folder, load its trained weights instead of its EMA."""
    from sora.models import model_patch_size
    from sora.models.text_encoder import build_text_encoder
    from sora.models.vae import build_vae

    check_pretrained(cfg)
    patch = model_patch_size(cfg.model)
    vae = build_vae(cfg.vae).to(runtime.device, runtime.dtype).eval()
    T, H, W = cfg.num_frames, *cfg.image_size
    height_factor, width_factor = vae.patch_size[1] * patch[1], vae.patch_size[2] * patch[2]
    if H % height_factor or W % width_factor:
        raise ValueError(
            f"image_size {(H, W)} must be divisible by {height_factor} (the VAE's {vae.patch_size[1]}x downsampling "
            f"times the model's patch {patch[1]})"
        )
    if T % patch[0]:
        raise ValueError(f"num_frames={T} must be divisible by the model's temporal patch size {patch[0]}")
    latent_size = vae.get_latent_size((T, H, W))

    # T5 overflows in fp16: half-precision runs put it in bf16 (Open-Sora v1 kept it in fp32).
    text_dtype = torch.float32 if runtime.dtype == torch.float32 else torch.bfloat16
    text_encoder = build_text_encoder(cfg.text_encoder, runtime.device, text_dtype)
    model = build_diffusion_model(cfg, runtime, latent_size, vae.out_channels, text_encoder.output_dim,
                                  text_encoder.model_max_length, sequence_parallel, training, weights)
    return model, vae, text_encoder, latent_size


def check_pretrained(cfg, parts=("model", "vae", "text_encoder")):
    """Every pretrained file or folder the config's `parts` name that cannot be had, one line each in one
    FileNotFoundError, before anything is built (T5-XXL alone takes minutes to load): a local path that does
    not exist, or a hub name that is not in the Hugging Face cache while the hub cannot be reached."""
    missing = []
    for part in parts:
        for key, filename in (("from_pretrained", "config.json"), ("tokenizer", "tokenizer_config.json")):
            name = cfg[part].get(key)
            if isinstance(name, str):
                subfolder = cfg[part].get("subfolder")
                reason = _unavailable(name, f"{subfolder}/{filename}" if subfolder else filename, part == "model")
                if reason:
                    missing.append(f"{part}.{key} {name!r}: {reason}")
    if missing:
        raise FileNotFoundError("\n".join(missing))


def _unavailable(name, filename, is_file):
    """Why `name` (a path, a hub id, or for a model's weights hf://ORG/REPO/FILE) cannot be loaded, or None."""
    from sora.models.checkpoint import HUB_PREFIX, parse_hub_file
    from sora.registry import hub_cached, hub_offline, is_hub_id

    if name.startswith(HUB_PREFIX):
        hub = parse_hub_file(name)
        if hub is None:
            return None  # malformed: loading names the forms allowed
        repo, filename, revision = hub
    elif os.path.exists(os.path.expanduser(name)):
        return None
    elif is_file or not is_hub_id(name):
        return "no such file or folder" if is_file else "no such folder, nor a hub id"
    else:
        repo, revision = name, None
    offline = hub_offline()
    if offline and not hub_cached(repo, filename, revision):
        return f"offline ({offline}) and not in the Hugging Face cache"
    return None


def build_diffusion_model(cfg, runtime, latent_size, in_channels, caption_channels, model_max_length,
                          sequence_parallel=False, training=False, weights="ema"):
    """The diffusion model a config names, for its encoders' latent size and channels and caption width and
    length (from the encoders, or from the index of a pre-encoded training set); training adds the config's
    grad_checkpoint. weights: as in build_components."""
    from sora.models import build_model, model_arguments

    wiring = dict(
        input_size=latent_size,
        in_channels=in_channels,
        caption_channels=caption_channels,
        model_max_length=model_max_length,
        # The process layout decides sequence parallelism (sp_size), whatever the model dict says.
        enable_sequence_parallelism=sequence_parallel,
        grad_checkpoint=(training and cfg.grad_checkpoint) or None,  # True turns it on; else the model dict decides
    )
    accepted = model_arguments(cfg.model["type"])
    if sequence_parallel and "enable_sequence_parallelism" not in accepted:
        raise ValueError(f"sp_size > 1 needs a model with sequence parallelism (STDiT); {cfg.model['type']} has none")
    model_cfg = dict(cfg.model)
    folder = model_cfg.pop("from_pretrained", None) if weights == "model" else None
    model = build_model(model_cfg, **{k: v for k, v in wiring.items() if v is not None and k in accepted})
    if folder is not None:
        load_trained_weights(model, folder)
    return model.to(runtime.device, torch.float32 if training else runtime.dtype)


def load_trained_weights(model, folder):
    """Load the trained (not EMA) weights of a training checkpoint folder, its torch.distributed.checkpoint
    `model/`, with the checks and adjustments of every other checkpoint (sora.models.checkpoint)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from sora.models.checkpoint import load_checkpoint

    saved = os.path.join(folder, "model")
    with tempfile.TemporaryDirectory() as tmp:
        converted = os.path.join(tmp, "model.pt")
        dcp_to_torch_save(saved, converted)
        try:
            load_checkpoint(model, converted)
        except ValueError as error:
            raise ValueError(str(error).replace(converted, saved)) from None
