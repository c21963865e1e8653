"""Process groups for data and sequence parallelism, the frame split/gather of sequence-parallel STDiT, and
the FSDP2 (ZeRO-2) wrapping of a model over all ranks.

Layout of ranks: the world is a (dp, sp) mesh; ranks k*sp ... k*sp + sp - 1 form sequence-parallel group k
(consecutive ranks share a node, where the all-to-all traffic goes), and ranks with the same index inside
their sp group form a data-parallel group.

Sequence parallelism convention (STDiT, `enable_sequence_parallelism=True`):
- every rank of an sp group gets the same full input; the model embeds it in full on every rank, then each
  rank keeps T/sp whole frames of every sample (`split_frames`, a slice);
- inside the blocks only temporal attention communicates (an all-to-all before and after it, trading heads
  for frames); spatial attention and cross-attention are local because each rank holds whole frames and the
  full caption;
- `gather_frames` all-gathers the frames so every rank computes the same full output and the same loss.
Gradients: backward through `gather_frames` takes this rank's slice of the (identical) output gradient and
multiplies it by sp. Everything computed on the local frames therefore gets sp times its share of the
gradient, and everything computed in full on every rank (after the gather) gets the full gradient. Averaged
over the sp group - which the usual data-parallel mean over all dp*sp ranks does - every parameter's
gradient equals that of one process running the whole model on the whole sample.
"""

import torch
import torch.distributed as dist

def init_sequence_parallel(sp_size: int):
    """Create the sequence- and data-parallel groups (after torch.distributed is initialised) and return this
    rank's sequence-parallel group. Every rank must call it."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "init_sequence_parallel needs torch.distributed initialised: launch with torchrun and call "
            "torch.distributed.init_process_group first"
        )
    world = dist.get_world_size()
    if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1 or world % sp_size != 0:
        raise ValueError(f"sp_size={sp_size!r} must be a positive int dividing the world size {world}")
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (world // sp_size, sp_size), mesh_dim_names=("dp", "sp"))
    return mesh.get_group("sp")


def split_frames(x, T, group):
    """(B, T*S, C) -> (B, T/sp*S, C): this rank's whole frames. A slice, so its backward places the gradient
    of the local frames into zeros, with no communication."""
    sp, rank = dist.get_world_size(group), dist.get_rank(group)
    B, N, C = x.shape
    local = T // sp
    return x.view(B, T, N // T, C)[:, rank * local:(rank + 1) * local].reshape(B, local * (N // T), C)


class _GatherFrames(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        sp = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(sp)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)  # ranks hold consecutive frames: concatenating tokens restores order

    @staticmethod
    def backward(ctx, grad):
        sp, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        local = grad.shape[1] // sp
        return grad[:, rank * local:(rank + 1) * local] * sp, None


def gather_frames(x, group):
    """(B, T/sp*S, C) on each rank -> (B, T*S, C) on every rank; see the module docstring for the gradient."""
    if dist.get_world_size(group) == 1:
        return x
    return _GatherFrames.apply(x, group)


def shard(model, mixed_bf16):
    """ZeRO-2 with FSDP2: each block, then the rest, sharded over all ranks; parameters stay gathered from
    forward to backward (reshard_after_forward=False), gradients are reduce-scattered (averaged)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else None
    kwargs = dict(reshard_after_forward=False, **({"mp_policy": policy} if policy else {}))
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def local(tensor):
    """The shard this rank holds (a DTensor under FSDP2), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
