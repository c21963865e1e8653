"""What every video diffusion transformer here shares (STDiT, PixArt, DiT, Latte): the latent geometry and
its checks, sin-cos position embeddings for any token grid, per-block activation checkpointing, unpatchify, and
the forward split into embedders, block stack and final layer (ForwardParts), which the sampling cache runs
apart."""

import dataclasses
from typing import Callable

import torch
import torch.distributed as dist
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from sora.models.layers import get_1d_sincos_pos_embed, get_2d_sincos_pos_embed


@dataclasses.dataclass
class ForwardParts:
    """One forward, split where the sampling cache (sora.schedulers.cache) needs it, for every model type alike.

    tokens: (B, N, C), the block stack's input (embedders and position embeddings applied); run_blocks(h, start,
    stop): h after blocks[start:stop] (with sequence parallelism each call splits and gathers the frames, so its
    input and output are every frame on every rank); final(h): the block stack's output -> the model's output;
    probe(h): block 0's modulated input (its first norm with its timestep shift and scale) for the tokens h;
    depth: the number of blocks. forward is final(run_blocks(tokens, 0, depth)), op for op (see `output`)."""

    tokens: torch.Tensor
    run_blocks: Callable
    final: Callable
    probe: Callable
    depth: int

    def output(self):
        return self.final(self.run_blocks(self.tokens, 0, self.depth))


class VideoTransformer(nn.Module):
    # Name of the (1, S, C) spatial position-embedding buffer in the authors' checkpoints.
    spatial_buffer = "pos_embed"
    # False: the temporal position embedding is added to every token (PixArt, DiT); True: the model's temporal
    # blocks add it (STDiT in block 0's temporal branch, Latte before block 1).
    temporal_in_blocks = False
    space_scale = 1.0
    time_scale = 1.0

    def init_geometry(self, input_size, patch_size, in_channels, out_channels, hidden_size, num_heads):
        """Check and keep the (T, H, W) latent size, patch size and widths; register the position embeddings."""
        if len(input_size) != 3 or len(patch_size) != 3:
            raise ValueError(f"input_size and patch_size must be (T, H, W), got {input_size} and {patch_size}")
        for size, patch, axis in zip(input_size, patch_size, "THW"):
            if size % patch != 0:
                raise ValueError(
                    f"input_size {tuple(input_size)} is not divisible by patch_size {tuple(patch_size)} along {axis}"
                )
        if hidden_size % num_heads != 0 or hidden_size % 4 != 0:
            raise ValueError(
                f"hidden_size {hidden_size} must be divisible by num_heads={num_heads} and by 4 (2-D sin-cos position embeddings)"
            )
        self.input_size = tuple(input_size)
        self.patch_size = tuple(patch_size)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        grid = self.token_grid(self.input_size)
        self.register_buffer(self.spatial_buffer, self.spatial_pos_embed(grid[1:]))
        self.register_buffer("pos_embed_temporal", self.temporal_pos_embed(grid[0]))
        self._other_pos_embeds = {}  # (grid, device) -> embeddings for sizes other than input_size

    def token_grid(self, size):
        """(T, H, W) latent size -> token grid (T/pt, H/ph, W/pw)."""
        return tuple(s // p for s, p in zip(size, self.patch_size))

    def spatial_pos_embed(self, grid_hw):
        return get_2d_sincos_pos_embed(self.hidden_size, grid_hw, scale=self.space_scale)[None]

    def temporal_pos_embed(self, frames):
        return get_1d_sincos_pos_embed(self.hidden_size, frames, scale=self.time_scale)[None]

    def pos_embeds(self, grid, device):
        """(1, S, C) spatial and (1, T, C) temporal embeddings for a token grid; the buffers when it is the
        configured one, else computed once per (grid, device) and kept apart from the buffers (bucketed training
        meets a few sizes over and over: recomputing them in numpy and copying them over each step would stall
        every step)."""
        if grid == self.token_grid(self.input_size):
            return getattr(self, self.spatial_buffer), self.pos_embed_temporal
        key = (grid, torch.device(device))
        if key not in self._other_pos_embeds:
            self._other_pos_embeds[key] = (self.spatial_pos_embed(grid[1:]).to(device),
                                           self.temporal_pos_embed(grid[0]).to(device))
        return self._other_pos_embeds[key]

    def add_pos_embed(self, x, grid):
        """Add the spatial embedding to every frame, and the temporal one (unless no_temporal_pos_emb) to every
        token, or, for models whose temporal blocks add it (temporal_in_blocks: STDiT, Latte), return it for them.
        Returns (x, the temporal embedding the blocks have to add, or None)."""
        B, N, C = x.shape
        spatial, temporal = self.pos_embeds(grid, x.device)
        x = x.view(B, grid[0], -1, C) + spatial.to(x.dtype)
        temporal = None if self.no_temporal_pos_emb else temporal.to(x.dtype)
        if temporal is not None and not self.temporal_in_blocks:
            x, temporal = x + temporal[:, :, None], None
        return x.view(B, N, C), temporal

    def check_video(self, x, timestep):
        """x (B, in_channels, T, H, W) with T, H, W divisible by the patch size; timestep (B,)."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, T, H, W), got {tuple(x.shape)}")
        for size, patch, axis in zip(x.shape[2:], self.patch_size, "THW"):
            if size % patch != 0:
                raise ValueError(
                    f"x of shape {tuple(x.shape)}: {axis}={size} is not divisible by patch size {patch} "
                    f"(patch_size {self.patch_size})"
                )
        if timestep.shape != (x.shape[0],):
            raise ValueError(
                f"timestep must have shape ({x.shape[0]},) for x {tuple(x.shape)}, got {tuple(timestep.shape)}"
            )

    def check_sequence_parallel_group(self, group, frames):
        """Frames and heads split evenly over the sp group."""
        if group is None:
            raise ValueError(f"{type(self).__name__} was built with enable_sequence_parallelism=True and needs "
                             "sp_group: call it as model(x, t, y, mask, sp_group=group), the group from "
                             "sora.parallel.init_sequence_parallel(sp_size)")
        sp = dist.get_world_size(group)
        if frames % sp != 0:
            raise ValueError(f"sequence parallelism splits frames: {frames} latent frames are not divisible by sp_size={sp}")
        if self.num_heads % sp != 0:
            raise ValueError(f"sequence parallelism splits heads: num_heads={self.num_heads} is not divisible by sp_size={sp}")

    def run_block(self, block, *args):
        """block(*args), with its activations recomputed in backward when grad_checkpoint is on."""
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def unpatchify(self, x, grid):
        """(B, N, pt*ph*pw*C_out) -> (B, C_out, T, H, W)."""
        (nt, nh, nw), (pt, ph, pw) = grid, self.patch_size
        return rearrange(
            x, "B (nt nh nw) (pt ph pw c) -> B c (nt pt) (nh ph) (nw pw)",
            nt=nt, nh=nh, nw=nw, pt=pt, ph=ph, pw=pw, c=self.out_channels,
        )
