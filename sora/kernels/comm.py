"""Ulysses-style sequence-parallel exchange: scatter one dim of x across a process group, gather another.

With W ranks, scatter_dim d and gather_dim g, rank r sends its W slices along d (slice w to rank w) and
receives one slice from every rank, which it concatenates along g. Around one
torch.distributed.all_to_all_single the data is permuted twice, each a swap of the two leading axes of a
3-D view, done by layout.swap_leading (to_temporal's row permutation, for one sample):
- pack:   x viewed (P, W, M) -> send buffer (W, P, M), P = prod(shape[:d]), M = the rest after W;
- unpack: receive buffer (W, P', M') -> out viewed (P', W, M'), P' = prod(chunk[:g]), M' = prod(chunk[g:]).
When P (or P') is 1 the view already is the buffer and no copy is made. The backward of an exchange is
the inverse exchange (scatter g, gather d).
"""

import math

import torch
import torch.distributed as dist

from sora.kernels.layout import swap_leading


def _exchange(x, group, scatter_dim, gather_dim):
    world = dist.get_world_size(group)
    shape = list(x.shape)
    x = x.contiguous()
    before = math.prod(shape[:scatter_dim])
    send = swap_leading(x, before, world) if before > 1 else x
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # splits dim 0 (size W for both layouts) evenly

    chunk = shape.copy()
    chunk[scatter_dim] //= world
    before = math.prod(chunk[:gather_dim])
    out = swap_leading(recv, world, before) if before > 1 else recv
    chunk[gather_dim] *= world
    return out.view(chunk)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all(x, group, scatter_dim, gather_dim):
    """Scatter `x` along scatter_dim across the ranks of `group`, gather along gather_dim.

    Differentiable (the backward is the inverse exchange). A group of one rank returns x unchanged.
    Works with NCCL (CUDA tensors) and gloo (CPU tensors).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    ndim = x.dim()
    for name, dim in (("scatter_dim", scatter_dim), ("gather_dim", gather_dim)):
        if not isinstance(dim, int) or not -ndim <= dim < ndim:
            raise ValueError(f"{name}={dim!r} is not a dim of x with shape {tuple(x.shape)}")
    scatter_dim, gather_dim = scatter_dim % ndim, gather_dim % ndim
    if scatter_dim == gather_dim:
        raise ValueError(f"scatter_dim and gather_dim must differ, got {scatter_dim} for both")
    world = dist.get_world_size(group)
    if x.shape[scatter_dim] % world != 0:
        raise ValueError(
            f"x of shape {tuple(x.shape)}: dim {scatter_dim} (size {x.shape[scatter_dim]}) is not divisible "
            f"by the group size {world}"
        )
    if world == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)
