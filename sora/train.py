"""`python -m sora.train CONFIG [--key value ...]` (single process, or under torchrun).

Videos and captions are encoded on the fly (VAE micro-batched, text encoder frozen), or read pre-encoded from
a folder written by `python -m sora.preprocess` (then neither encoder is built); the diffusion model is
trained with IDDPM's loss, AdamW (weight decay 0; fused on CUDA, foreach elsewhere), gradient clipping and an
fp32 EMA (one foreach lerp). Under torchrun, plugin="zero2" shards parameters, gradients and optimizer state
over all ranks with FSDP2 (`fully_shard(reshard_after_forward=False)`, bf16 compute with fp32 reduction when
dtype is bf16); plugin="zero2-seq" adds sequence parallelism inside groups of sp_size ranks, which see the
same data.

One step is `train_step`, which the benchmarks time as well; `run` is setup and a loop around it.

Determinism: every step re-seeds the randomness it uses (timesteps, noise, the VAE's posterior sample,
caption dropout) from (seed, global step, data-parallel rank), and the data order is a function of
(seed, epoch), so a run resumed from a checkpoint continues exactly as if never stopped.
"""

import copy
import inspect
import itertools
import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sora.checkpointing import find_checkpoint, load_checkpoint, remove_partial_saves, save_checkpoint
from sora.data.buckets import crop_to
from sora.launch import build_components, build_diffusion_model, check_writable, main, setup
from sora.masks import MaskGenerator, check_mask_ratios
from sora.parallel import init_sequence_parallel, local, shard
from sora.schedulers import IDDPM, build_scheduler

log = logging.getLogger("sora.train")


def experiment_dir(cfg, is_main):
    """A new numbered folder per run: outputs/000-STDiT, outputs/001-STDiT, ..."""
    name = None
    if is_main:
        os.makedirs(cfg.outputs, exist_ok=True)
        numbers = [int(d[:3]) for d in os.listdir(cfg.outputs) if d[:3].isdigit()]
        index = max(numbers, default=-1) + 1
        name = os.path.join(cfg.outputs, f"{index:03d}-{cfg.model['type'].replace('/', '-')}")
        os.makedirs(name)
    if dist.is_initialized():
        holder = [name]
        dist.broadcast_object_list(holder, src=0)
        name = holder[0]
    return name


def build_data(cfg, dp_rank, dp_size, pin_memory):
    """Dataset, sampler, loader, what the sampler counts per step (1 batch or batch_size samples), and the
    index of a pre-encoded set (None for a CSV); ranks of one sequence-parallel group share a data-parallel
    rank."""
    # Imported here: the data package needs PyAV, which importing the trainer's pieces (e.g. train_step) does not.
    from sora.data import StatefulDistributedSampler, VariableVideoBatchSampler, VariableVideoTextDataset, VideoTextDataset
    from sora.data.encoded import EncodedDataset, check_settings, is_encoded

    encoded = None
    if is_encoded(cfg.data_path):
        dataset = EncodedDataset(cfg.data_path)
        check_settings(dataset.index, cfg, cfg.data_path)
        encoded = dataset.index
    if cfg.bucket_config:
        check_bucket_frames(cfg)
        if encoded is None:
            dataset = VariableVideoTextDataset(cfg.data_path, frame_interval=cfg.frame_interval, root=cfg.root,
                                               seed=cfg.seed)
            dataset.check_readable()
        sampler = VariableVideoBatchSampler(dataset, cfg.bucket_config, num_replicas=dp_size, rank=dp_rank,
                                            seed=cfg.seed, drop_last=True)
        if len(sampler.group_by_bucket()) == 0:
            raise ValueError(f"no sample of {cfg.data_path} fits any bucket of bucket_config")
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=pin_memory)
        return loader, sampler, 1, encoded  # the sampler counts batches
    if cfg.batch_size is None:
        raise ValueError("batch_size=None needs bucket_config (whose buckets set the batch sizes); set batch_size")
    if encoded is None:
        dataset = VideoTextDataset(cfg.data_path, num_frames=cfg.num_frames, frame_interval=cfg.frame_interval,
                                   image_size=cfg.image_size, root=cfg.root,
                                   use_image_transform=cfg.use_image_transform, seed=cfg.seed)
        dataset.check_readable()
    if len(dataset) < cfg.batch_size * dp_size:
        raise ValueError(
            f"{cfg.data_path} has {len(dataset)} samples, fewer than one batch of {cfg.batch_size} on each of "
            f"{dp_size} data-parallel ranks"
        )
    sampler = StatefulDistributedSampler(dataset, num_replicas=dp_size, rank=dp_rank, seed=cfg.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=pin_memory, drop_last=True)
    return loader, sampler, cfg.batch_size, encoded  # the sampler counts samples


def check_bucket_frames(cfg):
    """Every frame count a bucket may draw must split into the model's temporal patches and, under sequence
    parallelism, over the sp group: found now, not mid-run on the one rank that draws the bucket."""
    from sora.models import model_patch_size

    patch_t = model_patch_size(cfg.model)[0]
    for resolution, frames in cfg.bucket_config.items():
        for t, (keep_prob, _) in frames.items():
            if keep_prob and (t % patch_t or (t // patch_t) % cfg.sp_size):
                raise ValueError(
                    f"bucket_config[{resolution!r}][{t}]: {t} frames do not split into temporal patches of "
                    f"{patch_t} over sp_size={cfg.sp_size}"
                )


def data_position(states, cfg, dp_size, sampler_unit):
    """Steps into the current epoch to resume at. The data order of an epoch is one list that the
    data-parallel ranks take turns in, so the same position carries over to another number of ranks or batch
    size, rounded down to a whole step when it does not divide."""
    saved = states.get("data", {})
    consumed = states["step"] * saved.get("per_step", sampler_unit) * saved.get("dp_size", dp_size)
    per_step = sampler_unit * dp_size
    if consumed % per_step:
        log.warning("resuming mid-epoch on %d data-parallel ranks with batch size %s: %d of the epoch's entries "
                    "were seen, not a whole number of steps; %d are seen again", dp_size, cfg.batch_size,
                    consumed, consumed % per_step)
    return consumed // per_step


def build_optimizer(model, lr):
    """AdamW, weight decay 0: fused (one kernel for all parameters) on CUDA, foreach (a few ops over lists
    of tensors) elsewhere; both take FSDP2's DTensor parameters."""
    cuda = next(model.parameters()).device.type == "cuda"
    kernel = {"fused": True} if cuda else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0, **kernel)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema += (1 - decay) * (model - ema) over every parameter in one foreach lerp, in fp32 (the EMA's
    dtype), on each rank's shard under FSDP2."""
    ema_params = [local(p) for p in ema.parameters()]
    torch._foreach_lerp_(ema_params, [local(p).float() for p in model.parameters()], 1 - decay)


def scalar(tensor):
    """A Python float from a (possibly distributed, under FSDP2) 0-d tensor."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).item()


def step_seed(seed, global_step, dp_rank):
    return (seed * 1_000_003 + global_step * 7_919 + dp_rank) % (2**63)


def step_generator(seed, global_step, dp_rank):
    """The step's host generator (timesteps, noise, the posterior sample), the global generators (caption
    dropout and anything else drawing from them) seeded alike."""
    seed = step_seed(seed, global_step, dp_rank)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def epochs_of_batches(loader, sampler, cfg, epoch, step, sampler_unit):
    """(epoch, batch) from `step` steps into `epoch` to the end of the last epoch; each epoch's data order
    and frame choices come from (seed, epoch)."""
    for epoch in range(epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        if step:
            sampler.load_state_dict(dict(seed=cfg.seed, epoch=epoch, index=step * sampler_unit))
            step = 0
        for batch in loader:
            yield epoch, batch


def optimizer_step(model, ema, optimizer, grad_clip, ema_decay):
    """What follows backward: gradients clipped to grad_clip (foreach), the optimizer's step, the EMA update.
    Returns the gradient norm before clipping. Fully memory-bound: at least 52 bytes per fp32 parameter
    (clipping reads the gradient twice and writes it, 12; AdamW reads parameter, gradient and both moments
    and writes three, 28; the EMA reads two and writes one, 12)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    update_ema(ema, model, ema_decay)
    return grad_norm


SIZE_KEYS = ("height", "width", "ar", "fps", "num_frames")  # what VariableVideoTextDataset tells STDiT2


def takes(model, name):
    """Whether the model's forward has a parameter `name` (STDiT2's x_mask, height, ...)."""
    return name in inspect.signature(model.forward).parameters


def size_inputs(model, batch, device):
    """Open-Sora v1.1's size conditioning from the data, for a model that takes it: the batch's height, width,
    ar (width / height, as their dataset gives it), fps (the file's, 120 for images) and num_frames, (B,)
    float32 on the device (Open-Sora casts them to the compute dtype; the model's embedders cast here)."""
    return {key: torch.as_tensor(batch[key]).to(device, torch.float32) for key in SIZE_KEYS
            if key in batch and takes(model, key)}


def train_step(model, ema, optimizer, diffusion, batch, generator, vae=None, text_encoder=None, latent_scale=1.0,
               dtype=torch.float32, autocast_dtype=None, grad_clip=1.0, ema_decay=0.9999, forward=None, sp_group=None,
               mask_generator=None):
    """One optimisation step: the latent and caption of each sample, IDDPM's loss, backward, gradient
    clipping (foreach), the optimizer's step, the EMA update. Returns (loss, grad norm, samples): the loss
    and norm as detached tensors (no host sync), samples the batch size.

    batch: raw `{"video" (B, 3, T, H, W) in [-1, 1], "text"}`, encoded with `vae` (cast to `dtype`, posterior
    sampled from `generator`) and `text_encoder` under no_grad; or pre-encoded `{"mean", "std" (optional),
    "y", "mask" (optional)}` (sora.data.encoded), the latent drawn from (mean, std) with the same generator
    and scaled by `latent_scale`. Timesteps and noise also come from `generator` (a host generator: the same
    draws on any device). autocast_dtype: the compute dtype under torch.autocast (None: no autocast, as
    under FSDP2, whose policy casts). forward: what computes the model's output (default the model; e.g. a
    compiled model). sp_group: the sequence-parallel group the model (built with
    enable_sequence_parallelism=True) splits frames over; None without sequence parallelism.
    mask_generator: a sora.masks.MaskGenerator for Open-Sora v1.1's masked training, its masks drawn from
    `generator` after the latents. A batch of VariableVideoTextDataset (or a bucketed pre-encoded set) gives
    a model that takes them its height, width, ar, fps and num_frames.
    """
    from sora.models.vae import sample_posterior

    device = next(model.parameters()).device
    with torch.no_grad():  # latents drawn from the VAE's posterior, as Open-Sora v1 trains
        if vae is not None:
            video = crop_to(batch["video"], vae.patch_size[1] * model.patch_size[1]).to(device, dtype)
            x = vae.encode(video, generator=generator).float()
            condition = text_encoder.encode(list(batch["text"]))
        else:
            std = batch["std"].to(device) if "std" in batch else None
            x = sample_posterior(batch["mean"].to(device), std, latent_scale, generator).float()
            condition = {"y": batch["y"].to(device), "mask": batch["mask"].to(device) if "mask" in batch else None}
    model_kwargs = dict(y=condition["y"], mask=condition["mask"], **size_inputs(model, batch, device))
    if sp_group is not None:  # only sequence-parallel STDiT takes it
        model_kwargs["sp_group"] = sp_group
    frame_mask = None
    if mask_generator is not None:
        frame_mask = mask_generator.get_masks(x.shape[0], x.shape[2], generator).to(device)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        losses = diffusion.training_losses(forward or model, x, model_kwargs, generator=generator,
                                           frame_mask=frame_mask)
    loss = losses["loss"].mean()
    loss.backward()
    grad_norm = optimizer_step(model, ema, optimizer, grad_clip, ema_decay)
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm, x.shape[0]


class Logger:
    """On rank 0: the log lines also into log.txt, metrics.jsonl (one JSON object per log step, full
    precision), TensorBoard, and wandb when asked for."""

    def __init__(self, exp_dir, cfg, is_main):
        self.is_main = is_main
        self.writer = self.wandb = None
        if not is_main:
            return
        self.metrics = os.path.join(exp_dir, "metrics.jsonl")
        self.handler = logging.FileHandler(os.path.join(exp_dir, "log.txt"))
        self.handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        logging.getLogger().addHandler(self.handler)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(exp_dir, "tensorboard"))
        if cfg.wandb:
            import wandb

            self.wandb = wandb
            wandb.init(project="sora", name=os.path.basename(exp_dir), config=dict(cfg), dir=exp_dir)

    def close(self):
        if self.is_main:
            logging.getLogger().removeHandler(self.handler)
            self.handler.close()
            self.writer.close()
        if self.wandb:
            self.wandb.finish()

    def scalars(self, values, step):
        if not self.is_main:
            return
        log.info("step %d  " + "  ".join(f"{k} {v:.4g}" for k, v in values.items()), step)
        with open(self.metrics, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(values, step=step)


class Meter:
    """Loss (summed on the device: no host sync per step), steps and samples since the last log line."""

    def __init__(self):
        self.logged = False  # nothing logged yet in this run: the first step is
        self.reset()

    def reset(self):
        self.time, self.loss, self.steps, self.samples = time.perf_counter(), 0.0, 0, 0

    def add(self, loss, samples):
        self.loss += loss.float()
        self.steps += 1
        self.samples += samples

    def flush(self):
        """(mean loss over the data-parallel ranks, samples per second), and start again."""
        mean_loss = self.loss / self.steps
        if dist.is_initialized():
            dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
        values = mean_loss.item(), self.samples / (time.perf_counter() - self.time)
        self.logged = True
        self.reset()
        return values


def save(exp_dir, model, ema, optimizer, sampler, seed, epoch, step, global_step, dp_size, sampler_unit, ema_decay):
    """A checkpoint of the run at (epoch, step into it, global step); returns its folder. ema_decay is kept so
    that sampling can say how much of the EMA is still the weights training started from."""
    states = dict(epoch=epoch, step=step, global_step=global_step, seed=seed, ema_decay=ema_decay,
                  data=dict(dp_size=dp_size, per_step=sampler_unit),
                  sampler=sampler.state_dict(index=step * sampler_unit))
    return save_checkpoint(exp_dir, model, ema, optimizer, states)


def run(cfg):
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("wandb=True but wandb is not installed: pip install wandb, or set --wandb false") from None
    if cfg.dtype == "fp16":
        raise ValueError("dtype fp16 is not supported for training (no loss scaling): use bf16 or fp32")
    if cfg.plugin == "zero2" and cfg.sp_size > 1:
        raise ValueError(f"sp_size={cfg.sp_size} needs plugin='zero2-seq' (plugin='zero2' has no sequence parallelism)")
    runtime = setup(cfg)  # checks that sp_size divides the number of processes
    sp_size = cfg.sp_size
    sp_group = None
    if runtime.world_size > 1:
        group = init_sequence_parallel(sp_size)
        sp_group = group if sp_size > 1 else None
    dp_rank, dp_size = runtime.rank // sp_size, runtime.world_size // sp_size
    load = find_checkpoint(cfg.load) if cfg.load else None
    check_writable(cfg.outputs, "outputs")
    if cfg.mask_ratios is not None:
        check_mask_ratios(cfg.mask_ratios)
    diffusion = build_scheduler(cfg.scheduler)
    if not isinstance(diffusion, IDDPM):
        raise ValueError(f"training needs scheduler type 'iddpm' (it defines the loss), got {cfg.scheduler['type']!r}")

    loader, sampler, sampler_unit, encoded = build_data(cfg, dp_rank, dp_size, pin_memory=runtime.device.type == "cuda")
    if encoded is None:
        model, vae, text_encoder, _ = build_components(cfg, runtime, sequence_parallel=sp_size > 1, training=True)
        latent_scale = None
    else:  # pre-encoded: the index says what the encoders would have given the model
        vae = text_encoder = None
        latent, caption = encoded["latent"], encoded["caption"]
        model = build_diffusion_model(cfg, runtime, tuple(latent["size"]), latent["channels"], caption["channels"],
                                      caption["length"], sequence_parallel=sp_size > 1, training=True)
        latent_scale = latent["scaling_factor"]
    model.train()
    mask_generator = None
    if cfg.mask_ratios:
        if not takes(model, "x_mask"):
            raise ValueError(f"mask_ratios needs a model that takes x_mask (STDiT2); {cfg.model['type']} does not")
        mask_generator = MaskGenerator(cfg.mask_ratios)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    bf16 = runtime.dtype == torch.bfloat16
    if runtime.world_size > 1:
        shard(model, mixed_bf16=bf16)
        shard(ema, mixed_bf16=False)
    optimizer = build_optimizer(model, cfg.lr)
    # Single process: autocast for the compute dtype (FSDP2's policy does it under torchrun).
    autocast_dtype = runtime.dtype if runtime.world_size == 1 and bf16 else None

    exp_dir = experiment_dir(cfg, runtime.is_main)
    logger = Logger(exp_dir, cfg, runtime.is_main)
    steps_per_epoch = len(loader)
    epoch, step, global_step = 0, 0, 0
    if load:
        states = load_checkpoint(load, model, ema, optimizer)
        epoch, global_step = states["epoch"], states["global_step"]
        step = data_position(states, cfg, dp_size, sampler_unit)
        for group in optimizer.param_groups:  # the optimizer state came back with the old run's lr: --lr wins
            group["lr"] = cfg.lr
        if states["seed"] != cfg.seed:
            log.warning("the checkpoint was trained with seed %d, this run uses %d: the data order and noise "
                        "differ from the original run's", states["seed"], cfg.seed)
        log.info("resumed from %s: epoch %d, step %d of the epoch, global step %d", load, epoch, step, global_step)
        if runtime.is_main:
            remove_partial_saves(os.path.dirname(os.path.abspath(load)))  # the resumed run's killed saves
    log.info("experiment folder %s; %d process(es), sp_size %d; %s", exp_dir, runtime.world_size, sp_size,
             f"pre-encoded data from {cfg.data_path}" if encoded else "VAE and text encoder on the fly")

    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    # On rank 0 in a terminal (redirected to a file, the log lines say the same but the ETA).
    bar = tqdm(total=total, initial=global_step, unit="step", disable=None if runtime.is_main else True,
               file=sys.stdout, dynamic_ncols=True)
    meter = Meter()
    remaining = None if cfg.max_steps is None else max(cfg.max_steps - global_step, 0)
    last_save = load
    try:
        with logging_redirect_tqdm():  # log lines above the bar, not through it
            batches = epochs_of_batches(loader, sampler, cfg, epoch, step, sampler_unit)
            for batch_epoch, batch in itertools.islice(batches, remaining):
                if batch_epoch != epoch:
                    epoch, step = batch_epoch, 0
                loss, grad_norm, samples = train_step(
                    model, ema, optimizer, diffusion, batch, step_generator(cfg.seed, global_step, dp_rank), vae=vae,
                    text_encoder=text_encoder, latent_scale=latent_scale, dtype=runtime.dtype,
                    autocast_dtype=autocast_dtype, grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay,
                    sp_group=sp_group, mask_generator=mask_generator)
                step, global_step = step + 1, global_step + 1
                meter.add(loss, samples * dp_size)
                bar.update()
                if global_step % cfg.log_every == 0 or not meter.logged:
                    mean_loss, samples_per_s = meter.flush()
                    logger.scalars({"loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                                    "grad_norm": scalar(grad_norm), "samples_per_s": samples_per_s, "epoch": epoch},
                                   global_step)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", samples_per_s=f"{samples_per_s:.3g}", refresh=False)
                if cfg.ckpt_every > 0 and (global_step % cfg.ckpt_every == 0 or global_step == cfg.max_steps):
                    last_save = save(exp_dir, model, ema, optimizer, sampler, cfg.seed, epoch, step, global_step,
                                     dp_size, sampler_unit, cfg.ema_decay)
                    log.info("saved %s", last_save)
    except KeyboardInterrupt:
        bar.close()
        if runtime.is_main:
            print(f"interrupted at global step {global_step}; last checkpoint: {last_save or 'none saved'}",
                  file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        bar.close()
        logger.close()
    log.info("finished at global step %d; checkpoints in %s", global_step, exp_dir)


if __name__ == "__main__":
    main(run, "train")
