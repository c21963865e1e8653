"""`python -m sora.train CONFIG [--key value ...]` (single process, or under torchrun).

Videos and captions are encoded on the fly (VAE micro-batched, text encoder frozen), the diffusion model is
trained with IDDPM's loss, AdamW (weight decay 0), gradient clipping and an fp32 EMA. Under torchrun,
plugin="zero2" shards parameters, gradients and optimizer state over all ranks with FSDP2
(`fully_shard(reshard_after_forward=False)`, bf16 compute with fp32 reduction when dtype is bf16);
plugin="zero2-seq" adds sequence parallelism inside groups of sp_size ranks, which see the same data.

Determinism: every step re-seeds the randomness it uses (timesteps, noise, caption dropout) from
(seed, global step, data-parallel rank), and the data order is a function of (seed, epoch), so a run resumed
from a checkpoint continues exactly as if never stopped.
"""

import copy
import json
import logging
import os
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from sora.checkpointing import load_checkpoint, save_checkpoint
from sora.launch import build_components, main, setup
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
    """Dataset, sampler and loader; ranks of one sequence-parallel group share a data-parallel rank."""
    # Imported here: the data package needs PyAV, which importing the trainer's pieces (e.g. update_ema) does not.
    from sora.data import StatefulDistributedSampler, VariableVideoBatchSampler, VariableVideoTextDataset, VideoTextDataset

    if cfg.bucket_config:
        check_bucket_frames(cfg)
        dataset = VariableVideoTextDataset(cfg.data_path, frame_interval=cfg.frame_interval, root=cfg.root,
                                           seed=cfg.seed)
        sampler = VariableVideoBatchSampler(dataset, cfg.bucket_config, num_replicas=dp_size, rank=dp_rank,
                                            seed=cfg.seed, drop_last=True)
        if len(sampler.group_by_bucket()) == 0:
            raise ValueError(f"no sample of {cfg.data_path} fits any bucket of bucket_config")
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=pin_memory)
        return loader, sampler, 1  # the sampler counts batches
    dataset = VideoTextDataset(cfg.data_path, num_frames=cfg.num_frames, frame_interval=cfg.frame_interval,
                               image_size=cfg.image_size, root=cfg.root, use_image_transform=cfg.use_image_transform,
                               seed=cfg.seed)
    if len(dataset) < cfg.batch_size * dp_size:
        raise ValueError(
            f"{cfg.data_path} has {len(dataset)} samples, fewer than one batch of {cfg.batch_size} on each of "
            f"{dp_size} data-parallel ranks"
        )
    sampler = StatefulDistributedSampler(dataset, num_replicas=dp_size, rank=dp_rank, seed=cfg.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=pin_memory, drop_last=True)
    return loader, sampler, cfg.batch_size  # the sampler counts samples


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
        log.warning("resuming mid-epoch on %d data-parallel ranks with batch size %d: %d of the epoch's entries "
                    "were seen, not a whole number of steps; %d are seen again", dp_size, cfg.batch_size,
                    consumed, consumed % per_step)
    return consumed // per_step


@torch.no_grad()
def update_ema(ema, model, decay):
    ema_params = [local(p) for p in ema.parameters()]
    torch._foreach_lerp_(ema_params, [local(p).float() for p in model.parameters()], 1 - decay)


def scalar(tensor):
    """A Python float from a (possibly distributed, under FSDP2) 0-d tensor."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).item()


def crop_to(x, multiple):
    """Centre-crop (B, C, T, H, W) so H and W are multiples of `multiple` (bucket sizes need not be)."""
    H, W = x.shape[-2:]
    top, left = (H % multiple) // 2, (W % multiple) // 2
    return x[..., top:top + H - H % multiple, left:left + W - W % multiple]


def step_seed(seed, global_step, dp_rank):
    return (seed * 1_000_003 + global_step * 7_919 + dp_rank) % (2**63)


class Logger:
    """On rank 0: stdout + log.txt, metrics.jsonl (one JSON object per log step, full precision), TensorBoard,
    and wandb when asked for."""

    def __init__(self, exp_dir, cfg, is_main):
        self.is_main = is_main
        self.writer = self.wandb = None
        if not is_main:
            return
        self.metrics = os.path.join(exp_dir, "metrics.jsonl")
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S",
                            handlers=[logging.StreamHandler(), logging.FileHandler(os.path.join(exp_dir, "log.txt"))],
                            force=True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(exp_dir, "tensorboard"))
        if cfg.wandb:
            import wandb

            self.wandb = wandb
            wandb.init(project="sora", name=os.path.basename(exp_dir), config=dict(cfg), dir=exp_dir)

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
    if runtime.world_size > 1:
        init_sequence_parallel(sp_size)
    dp_rank, dp_size = runtime.rank // sp_size, runtime.world_size // sp_size
    if cfg.load and not os.path.isdir(cfg.load):
        raise FileNotFoundError(f"load={cfg.load!r}: no such checkpoint folder")
    diffusion = build_scheduler(cfg.scheduler)
    if not isinstance(diffusion, IDDPM):
        raise ValueError(f"training needs scheduler type 'iddpm' (it defines the loss), got {cfg.scheduler['type']!r}")

    loader, sampler, sampler_unit = build_data(cfg, dp_rank, dp_size, pin_memory=runtime.device.type == "cuda")
    model, vae, text_encoder, _ = build_components(cfg, runtime, sequence_parallel=sp_size > 1, training=True)
    model.train()
    if cfg.grad_checkpoint and hasattr(model, "grad_checkpoint"):
        model.grad_checkpoint = True
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    bf16 = runtime.dtype == torch.bfloat16
    if runtime.world_size > 1:
        shard(model, mixed_bf16=bf16)
        shard(ema, mixed_bf16=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0)
    # Single process: autocast for the compute dtype (FSDP2's policy does it under torchrun).
    autocast = torch.autocast(runtime.device.type, dtype=runtime.dtype, enabled=runtime.world_size == 1 and bf16)

    exp_dir = experiment_dir(cfg, runtime.is_main)
    logger = Logger(exp_dir, cfg, runtime.is_main)
    epoch, step, global_step = 0, 0, 0
    if cfg.load:
        states = load_checkpoint(cfg.load, model, ema, optimizer)
        epoch, global_step = states["epoch"], states["global_step"]
        step = data_position(states, cfg, dp_size, sampler_unit)
        for group in optimizer.param_groups:  # the optimizer state came back with the old run's lr: --lr wins
            group["lr"] = cfg.lr
        if states["seed"] != cfg.seed:
            log.warning("the checkpoint was trained with seed %d, this run uses %d: the data order and noise "
                        "differ from the original run's", states["seed"], cfg.seed)
        log.info("resumed from %s: epoch %d, step %d of the epoch, global step %d", cfg.load, epoch, step, global_step)
    multiple = vae.patch_size[1] * model.patch_size[1]
    log.info("experiment folder %s; %d process(es), sp_size %d", exp_dir, runtime.world_size, sp_size)

    def checkpoint():
        states = dict(epoch=epoch, step=step, global_step=global_step, seed=cfg.seed,
                      data=dict(dp_size=dp_size, per_step=sampler_unit),
                      sampler=sampler.state_dict(index=step * sampler_unit))
        log.info("saved %s", save_checkpoint(exp_dir, model, ema, optimizer, states))

    done = cfg.max_steps is not None and global_step >= cfg.max_steps
    last = {"time": time.perf_counter(), "loss": 0.0, "steps": 0, "samples": 0}
    while not done and epoch < cfg.epochs:
        sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)  # frame choices are drawn per (seed, epoch, index)
        if step:
            sampler.load_state_dict(dict(seed=cfg.seed, epoch=epoch, index=step * sampler_unit))
        for batch in loader:
            seed = step_seed(cfg.seed, global_step, dp_rank)
            torch.manual_seed(seed)  # caption dropout and anything else drawing from the global generators
            generator = torch.Generator().manual_seed(seed)  # timesteps and noise
            with torch.no_grad():  # latents drawn from the VAE's posterior, as Open-Sora v1 trains
                video = crop_to(batch["video"], multiple).to(runtime.device, runtime.dtype)
                x = vae.encode(video, generator=generator).float()
                condition = text_encoder.encode(list(batch["text"]))
            with autocast:
                losses = diffusion.training_losses(model, x, dict(y=condition["y"], mask=condition["mask"]),
                                                   generator=generator)
            loss = losses["loss"].mean()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_ema(ema, model, cfg.ema_decay)
            step += 1
            global_step += 1
            last["loss"] += loss.detach().float()
            last["steps"] += 1
            last["samples"] += x.shape[0] * dp_size

            if global_step % cfg.log_every == 0:
                mean_loss = last["loss"] / last["steps"]
                if dist.is_initialized():
                    dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
                elapsed = time.perf_counter() - last["time"]
                logger.scalars({"loss": mean_loss.item(), "lr": optimizer.param_groups[0]["lr"],
                                "grad_norm": scalar(grad_norm), "samples_per_s": last["samples"] / elapsed,
                                "epoch": epoch}, global_step)
                last = {"time": time.perf_counter(), "loss": 0.0, "steps": 0, "samples": 0}
            done = cfg.max_steps is not None and global_step >= cfg.max_steps
            if cfg.ckpt_every > 0 and (global_step % cfg.ckpt_every == 0 or done):
                checkpoint()
            if done:
                break
        else:
            epoch, step = epoch + 1, 0
    if runtime.is_main:
        log.info("finished at global step %d; checkpoints in %s", global_step, exp_dir)


if __name__ == "__main__":
    main(run, "train")
