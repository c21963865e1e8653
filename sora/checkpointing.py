"""Training checkpoints: one folder per save, written atomically, resumable on another number of ranks.

    {exp_dir}/epoch{E}-global_step{S}/
        model/                 torch.distributed.checkpoint of the model (sharded under FSDP2)
        optimizer/             torch.distributed.checkpoint of the optimizer state
        ema.pt                 the EMA weights, full and fp32: what sampling loads (--ckpt-path takes the folder)
        running_states.json    epoch, step in epoch, global step, seed, the data sampler's position

Every rank writes into `.tmp-epoch{E}-global_step{S}/`, and rank 0 renames it once all ranks are done, so a
save that is killed midway leaves only a `.tmp-*` folder and the previous checkpoint intact. Randomness in
training is drawn from generators re-seeded from (seed, global step, data-parallel rank) every step (see
sora.train), so seed and global step in running_states.json determine every random draw after a resume.
"""

import json
import os
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

RUNNING_STATES = "running_states.json"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def _dcp(fn, state, path):
    """dcp.save / dcp.load, without its warning that a run without torch.distributed is a single process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        fn(state, checkpoint_id=path)


def full_state_dict(model):
    """The whole state dict on rank 0 (gathered from the shards under FSDP2), on the CPU."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(exp_dir, model, ema, optimizer, running_states):
    """Write a checkpoint folder atomically; every rank must call it. Returns the folder's path."""
    name = f"epoch{running_states['epoch']}-global_step{running_states['global_step']}"
    final, tmp = os.path.join(exp_dir, name), os.path.join(exp_dir, f".tmp-{name}")
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier save that was killed
        os.makedirs(tmp)
    _barrier()
    _dcp(dcp.save, get_model_state_dict(model), os.path.join(tmp, "model"))
    _dcp(dcp.save, get_optimizer_state_dict(model, optimizer), os.path.join(tmp, "optimizer"))
    ema_state = full_state_dict(ema)
    if _is_main():
        torch.save({k: v.float() for k, v in ema_state.items()}, os.path.join(tmp, "ema.pt"))
        with open(os.path.join(tmp, RUNNING_STATES), "w") as f:
            json.dump(running_states, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    _barrier()
    return final


def load_checkpoint(path, model, ema, optimizer):
    """Restore model, EMA and optimizer from a checkpoint folder (any number of ranks); return its running states."""
    if not os.path.isfile(os.path.join(path, RUNNING_STATES)):
        raise FileNotFoundError(
            f"load={path!r} is not a training checkpoint folder (expected {RUNNING_STATES}, model/, optimizer/ "
            "and ema.pt, as written by python -m sora.train)"
        )
    model_state = get_model_state_dict(model)
    _dcp(dcp.load, model_state, os.path.join(path, "model"))
    set_model_state_dict(model, model_state)
    optimizer_state = get_optimizer_state_dict(model, optimizer)
    _dcp(dcp.load, optimizer_state, os.path.join(path, "optimizer"))
    set_optimizer_state_dict(model, optimizer, optimizer_state)
    ema_state = torch.load(os.path.join(path, "ema.pt"), map_location="cpu", weights_only=True)
    set_model_state_dict(ema, ema_state, options=StateDictOptions(full_state_dict=True))
    with open(os.path.join(path, RUNNING_STATES)) as f:
        return json.load(f)
