"""Training checkpoints: one folder per save, written atomically, resumable on another number of ranks.

    {exp_dir}/epoch{E}-global_step{S}/
        model/                 torch.distributed.checkpoint of the model (sharded under FSDP2)
        optimizer/             torch.distributed.checkpoint of the optimizer state
        ema.pt                 the EMA weights, full and fp32: what sampling loads (--ckpt-path takes the folder)
        running_states.json    epoch, step in epoch, global step, seed, the EMA's decay, the data sampler's position

Every rank writes into `.tmp-epoch{E}-global_step{S}/`, and rank 0 renames it once all ranks are done, so a
save that is killed midway leaves only a `.tmp-*` folder and the previous checkpoint intact. Randomness in
training is drawn from generators re-seeded from (seed, global step, data-parallel rank) every step (see
sora.train), so seed and global step in running_states.json determine every random draw after a resume.

A save that fails to write (disk full, read-only folder) removes its `.tmp-*` folder and raises
CheckpointWriteError naming the folder and the OS error; the previous checkpoint is untouched. Each save
also removes the `.tmp-*` folders that earlier, killed saves of the run left behind.
"""

import glob
import json
import os
import re
import shutil
import uuid
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
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


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (no space left, read-only, not a folder): a
    ValueError, so that the entry points report it as one line and exit code 2."""


def _describe(error):
    return f"[Errno {error.errno}] {error.strerror}" if error.errno else str(error)


def _os_error(error, folder):
    """The OS error behind a failed write: the exception itself, one it was raised from, or one a rank
    reported to torch.distributed.checkpoint; else (torch.save reports a full disk as a RuntimeError
    "unexpected pos ...") a fresh write of 1 MiB into `folder`, before the partial save is removed, tells."""
    pending = [error]
    while pending:
        error = pending.pop()
        if isinstance(error, OSError):
            return error
        if error is not None:
            pending += [error.__cause__ or error.__context__]
            pending += [failure for failure, _ in getattr(error, "failures", {}).values()]
    probe = os.path.join(folder, f".write-test-{uuid.uuid4().hex}")
    try:
        with open(probe, "wb") as f:
            f.write(bytes(2**20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as probe_error:
        return probe_error
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    return None


def remove_partial_saves(folder):
    """Delete the `.tmp-*` checkpoint folders in a run folder: saves that were killed before their rename."""
    for partial in glob.glob(os.path.join(glob.escape(folder), ".tmp-epoch*-global_step*")):
        shutil.rmtree(partial, ignore_errors=True)


def save_checkpoint(exp_dir, model, ema, optimizer, running_states):
    """Write a checkpoint folder atomically; every rank must call it. Returns the folder's path; raises
    CheckpointWriteError (the partial folder removed) when a write fails."""
    name = f"epoch{running_states['epoch']}-global_step{running_states['global_step']}"
    final, tmp = os.path.join(exp_dir, name), os.path.join(exp_dir, f".tmp-{name}")
    failure = None
    try:
        if _is_main():
            remove_partial_saves(exp_dir)
            os.makedirs(tmp)
        _barrier()
        _dcp(dcp.save, get_model_state_dict(model), os.path.join(tmp, "model"))
        _dcp(dcp.save, get_optimizer_state_dict(model, optimizer), os.path.join(tmp, "optimizer"))
        ema_state = full_state_dict(ema)
        if _is_main():
            torch.save({k: v.float() for k, v in ema_state.items()}, os.path.join(tmp, "ema.pt"))
            with open(os.path.join(tmp, RUNNING_STATES), "w") as f:
                json.dump(running_states, f, indent=2)
    except (Exception, CheckpointException) as error:  # sorted out below: a failed write becomes one line
        failure = error
    if _any_rank(failure is not None):
        os_error = _os_error(failure, exp_dir) if failure is not None else None
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None and os_error is None:
            raise failure
        reason = _describe(os_error) if os_error is not None else "another rank failed to write its part"
        raise CheckpointWriteError(f"could not write checkpoint {final}: {reason}; the previous checkpoint "
                                   "is intact") from failure
    if _is_main():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    _barrier()
    return final


def _any_rank(flag):
    """Whether flag is true on any rank (every rank must call it)."""
    if not dist.is_initialized():
        return flag
    holder = torch.tensor([int(flag)])
    dist.all_reduce(holder, op=dist.ReduceOp.MAX)
    return bool(holder.item())


def find_checkpoint(path):
    """The checkpoint folder `--load` names: the folder itself when it is one, else the newest complete
    checkpoint (highest global step, with its running_states.json) of a run folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load={path!r}: no such checkpoint folder")
    if os.path.isfile(os.path.join(path, RUNNING_STATES)):
        return path
    steps = {}
    for entry in os.listdir(path):
        match = re.fullmatch(r"epoch\d+-global_step(\d+)", entry)
        if match and os.path.isfile(os.path.join(path, entry, RUNNING_STATES)):
            steps[int(match.group(1))] = os.path.join(path, entry)
    if not steps:
        raise FileNotFoundError(f"load={path!r} is neither a checkpoint folder nor a run folder with a complete "
                                f"checkpoint (epoch*-global_step*/ with {RUNNING_STATES}, as python -m sora.train "
                                "writes)")
    return steps[max(steps)]


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


def describe_weights(path, weights):
    """One line saying which weights sampling uses: `weights` ("ema" or "model") of `path` (a model's
    from_pretrained: None, a checkpoint file, or a checkpoint folder this module wrote); ValueError when
    `weights` cannot be had."""
    states = None if path is None else os.path.join(path, RUNNING_STATES)
    if weights == "model" and (states is None or not os.path.isfile(states)):
        raise ValueError(f"weights='model' needs --ckpt-path to be a training checkpoint folder (with "
                         f"{RUNNING_STATES}), got {path!r}; without it, leave weights='ema'")
    if path is None:
        return "weights: random (no checkpoint given: set --ckpt-path), so the videos will be noise"
    if not os.path.isfile(states):
        return f"weights: {path}"
    with open(states, encoding="utf-8") as f:
        running = json.load(f)
    step = running["global_step"]
    if weights == "ema":
        decay = running.get("ema_decay")  # checkpoints saved before it was stored have none
        # Each update keeps `decay` of the EMA: decay**step of it is still the weights training started from.
        remains = "" if decay is None else (f" at decay {decay}: {100 * decay**step:.2g}% of it is still the weights "
                                            "training started from")
        return (f"weights: the EMA of {path}, which has seen {step} updates{remains} (--weights model for the trained "
                "weights)")
    return f"weights: the trained model of {path} at step {step}, not its EMA"
