"""`python -m sora.preprocess CONFIG --data-path CSV --save-dir DIR [--shard-size N] [--key value ...]`

Encodes a training set once, so that training needs neither the VAE nor the text encoder (with T5-XXL and
the SD VAE they take more of an STDiT step than the model's own matmuls at 16x256): for each clip of the
CSV, the VAE's posterior (mean and std, in the config's dtype) at the size the config trains it at (with
bucket_config, at every bucket the sample may be drawn into), and its caption's embeddings and mask. The
format is sora.data.encoded's; `python -m sora.train CONFIG --data-path DIR` trains on it.

Every `shard_size` CSV rows make one shard file, written under a temporary name and renamed when complete,
so a run that is stopped and started again skips the shards already done. Under torchrun the shards are
shared out over the ranks (shard k on rank k mod world size), each encoding on its own GPU; rank 0 writes
the index once every shard is there. The config's training settings apply as they would in training:
num_frames, frame_interval, image_size or bucket_config, use_image_transform, seed (which frames epoch 0
takes), dtype, vae, text_encoder, batch_size (clips per encoder call) and num_workers.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from sora.data.buckets import crop_to
from sora.launch import check_writable, main, setup

PLAN = "plan.json"  # the index, written first: a second run into the folder checks it encodes the same thing


def entry_keys(cfg, dataset):
    """Per CSV row, the (index, T, H, W) entries to encode: the config's size, or every candidate bucket."""
    if not cfg.bucket_config:
        return [[(i, cfg.num_frames, *cfg.image_size)] for i in range(len(dataset))]
    from sora.data import Bucket

    bucket = Bucket(cfg.bucket_config)
    return [[(i, *bucket.get_thw(b)) for b in bucket.candidates(*dataset.get_data_info(i), cfg.frame_interval)]
            for i in range(len(dataset))]


def plan_index(cfg, dataset, keys, shard_size, vae, text_encoder, latent_size):
    from sora.data.encoded import FORMAT, encoding_settings

    shards = []
    for first in range(0, len(keys), shard_size):
        rows = keys[first:first + shard_size]
        shards.append({"file": f"shard-{len(shards):05d}.pt", "keys": [list(key) for row in rows for key in row]})
    return {
        "format": FORMAT,
        "settings": encoding_settings(cfg),
        "seed": cfg.seed,
        "data_path": os.path.abspath(cfg.data_path),
        "size": None if cfg.bucket_config else [cfg.num_frames, *cfg.image_size],
        "info": [list(dataset.get_data_info(i)) if cfg.bucket_config else [cfg.num_frames, *cfg.image_size]
                 for i in range(len(dataset))],
        "latent": {"size": list(latent_size), "channels": vae.out_channels, "scaling_factor": vae.scaling_factor},
        "caption": {"channels": text_encoder.output_dim, "length": text_encoder.model_max_length},
        "shards": shards,
    }


def write_json(obj, path):
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def check_plan(plan, save_dir):
    """A folder that already holds shards of another encoding is not mixed with this one."""
    for name in (PLAN, "index.json"):
        path = os.path.join(save_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                if json.load(f) != plan:
                    raise ValueError(f"{save_dir} holds an encoding of another config or CSV ({name} differs): "
                                     "use an empty --save-dir, or the same config and CSV to resume")


def encode_shard(shard, dataset, cfg, vae, text_encoder, multiple, runtime):
    """The entries of one shard, in its keys' order: clips of one size are encoded batch_size at a time."""
    keys = [tuple(key) for key in shard["keys"]]
    by_size = {}
    for position, key in enumerate(keys):
        by_size.setdefault(key[1:], []).append(position)
    per_call = cfg.batch_size or 1  # None with bucket_config
    batches = [positions[i:i + per_call] for positions in by_size.values() for i in range(0, len(positions), per_call)]
    dataset_key = (lambda key: key) if cfg.bucket_config else (lambda key: key[0])
    loader = DataLoader(dataset, batch_sampler=[[dataset_key(keys[p]) for p in batch] for batch in batches],
                        num_workers=cfg.num_workers)
    entries = [None] * len(keys)
    for positions, batch in zip(batches, loader):
        with torch.no_grad():
            video = crop_to(batch["video"], multiple).to(runtime.device, runtime.dtype)
            mean, std = vae.latent_distribution(video)
            condition = text_encoder.encode(list(batch["text"]))
        for j, position in enumerate(positions):
            # Copies: a view would save the whole batch's storage into every entry.
            entry = {"mean": mean[j].cpu().clone(), "y": condition["y"][j].cpu().clone()}
            if std is not None:
                entry["std"] = std[j].cpu().clone()
            if condition["mask"] is not None:
                entry["mask"] = condition["mask"][j].cpu().clone()
            if "fps" in batch:  # the variable-size dataset's: STDiT2 is conditioned on it
                entry["fps"] = batch["fps"][j].cpu().clone()
            entries[position] = entry
    return entries


def run(cfg):
    from sora.data import VariableVideoTextDataset, VideoTextDataset
    from sora.data.encoded import INDEX, is_encoded, save_atomically
    from sora.models import model_patch_size
    from sora.models.text_encoder import build_text_encoder
    from sora.models.vae import build_vae

    save_dir = cfg.save_dir
    runtime = setup(cfg)
    if is_encoded(cfg.data_path):
        raise ValueError(f"--data-path {cfg.data_path} is already pre-encoded: give the dataset CSV")
    check_writable(save_dir, "save_dir")
    if cfg.bucket_config:
        dataset = VariableVideoTextDataset(cfg.data_path, frame_interval=cfg.frame_interval, root=cfg.root,
                                           seed=cfg.seed)
    else:
        dataset = VideoTextDataset(cfg.data_path, num_frames=cfg.num_frames, frame_interval=cfg.frame_interval,
                                   image_size=cfg.image_size, root=cfg.root,
                                   use_image_transform=cfg.use_image_transform, seed=cfg.seed)
    keys = entry_keys(cfg, dataset)
    if not any(keys):
        raise ValueError(f"no sample of {cfg.data_path} fits any bucket of bucket_config")

    vae = build_vae(cfg.vae).to(runtime.device, runtime.dtype).eval()
    latent_size = vae.get_latent_size((cfg.num_frames, *cfg.image_size))
    # As sora.launch.build_components: T5 overflows in fp16, so half-precision runs put it in bf16.
    text_dtype = torch.float32 if runtime.dtype == torch.float32 else torch.bfloat16
    text_encoder = build_text_encoder(cfg.text_encoder, runtime.device, text_dtype)
    multiple = vae.patch_size[1] * model_patch_size(cfg.model)[1]
    plan = plan_index(cfg, dataset, keys, cfg.shard_size, vae, text_encoder, latent_size)
    check_plan(plan, save_dir)
    if runtime.is_main:
        write_json(plan, os.path.join(save_dir, PLAN))

    shards = plan["shards"][runtime.rank::runtime.world_size]
    todo = [shard for shard in shards if not os.path.isfile(os.path.join(save_dir, shard["file"]))]
    # On rank 0 in a terminal: its own shards' clips.
    desc = f"encoding (rank 0 of {runtime.world_size})" if runtime.world_size > 1 else "encoding"
    bar = tqdm(total=sum(len(shard["keys"]) for shard in shards), unit="clip", desc=desc, file=sys.stdout,
               disable=None if runtime.is_main else True)
    bar.update(sum(len(shard["keys"]) for shard in shards if shard not in todo))
    for shard in todo:
        entries = encode_shard(shard, dataset, cfg, vae, text_encoder, multiple, runtime)
        save_atomically(entries, os.path.join(save_dir, shard["file"]))
        bar.update(len(entries))
    bar.close()
    if dist.is_initialized():
        dist.barrier()
    if runtime.is_main:
        write_json(plan, os.path.join(save_dir, INDEX))
        count = sum(len(shard["keys"]) for shard in plan["shards"])
        size = sum(os.path.getsize(os.path.join(save_dir, shard["file"])) for shard in plan["shards"])
        print(f"encoded {count} entries of {len(dataset)} clips into {save_dir}: {size / 2**20:.2f} MiB, "
              f"{size / count / 2**10:.1f} KiB per entry", flush=True)


def cli(argv=None):
    main(run, "preprocess", argv)


if __name__ == "__main__":
    cli()
