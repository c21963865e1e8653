"""STDiT: Open-Sora v1's spatial-temporal diffusion transformer, on sora.kernels.

Each block (adaLN-single, as PixArt) runs spatial self-attention over the S tokens of each frame, temporal
self-attention over the T frames of each spatial position, cross-attention to the caption, and an MLP.
Tokens are "B (T S) C" frame-major throughout; the spatial layout "(B T) S C" is a free view. With
enable_layernorm_kernel=True the temporal branch never leaves that layout either: qkv Linear on (B, N, C),
K.temporal_attention (which reads q/k/v of each position's frames with strides), proj Linear, gated residual;
the plain path is Open-Sora's, with rearranges to and from "(B S) T C" around attention.

Parameter and buffer names and shapes are Open-Sora v1's, so its released checkpoints load.
"""

import numpy as np
import torch
import torch.distributed as dist
from einops import rearrange
from torch import nn

import sora.kernels as K
from sora.models.base import ForwardParts, VideoTransformer
from sora.models.layers import (
    Attention,
    CaptionEmbedder,
    DropPath,
    Mlp,
    MultiHeadCrossAttention,
    PatchEmbed3D,
    T2IFinalLayer,
    TimestepEmbedder,
    basic_init,
    modulate,
)
from sora.parallel import gather_frames, split_frames


class STDiTBlock(nn.Module):
    """temporal=True: STDiT's block (spatial attention within each frame, then temporal attention across the
    frames of each position). temporal=False: PixArt's block, whose one self-attention spans all N tokens of
    a sample and which has no temporal branch (no `attn_temp` parameters)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, drop_path=0.0, enable_flashattn=False,
                 enable_layernorm_kernel=False, temporal=True):
        super().__init__()
        self.enable_layernorm_kernel = enable_layernorm_kernel
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, enable_flashattn=enable_flashattn)
        if temporal:
            self.attn_temp = Attention(hidden_size, num_heads, qkv_bias=True, enable_flashattn=enable_flashattn)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def modulations(self, modulation):
        """Shift, scale and gate of attention and MLP, (B, 1, C) each, from the timestep's (B, 6C)."""
        return (self.scale_shift_table[None] + modulation.reshape(modulation.shape[0], 6, -1)).chunk(6, dim=1)

    def probe(self, x, modulation):
        """The attention branch's input, norm1(x) modulated (the sampling cache's change indicator)."""
        shift_msa, scale_msa = self.modulations(modulation)[:2]
        return modulate(self.norm1(x), shift_msa, scale_msa)

    def forward(self, x, y, modulation, mask, T, tpe=None, sp_group=None):
        """x (B, T*S, C); y (B, L, C) caption; modulation (B, 6C) from the timestep; mask (B, L) bool or None;
        tpe (1, T, C) or None.

        With a sequence-parallel group, x holds T whole frames of each sample out of T * sp; only temporal
        attention needs the other frames, and exchanges for them (see sora.parallel).
        """
        B, N, C = x.shape
        S = N // T
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulations(modulation)
        # The temporal branch is gated by gate_msa, the spatial branch's gate. It looks like a bug, but it is
        # Open-Sora v1's block (there is no temporal gate), and its checkpoints were trained with it.

        if self.enable_layernorm_kernel:
            # Stochastic depth drops a sample's whole branch: dropping its (B, 1, C) gate is the same.
            x_m = K.layernorm_modulate(x, shift_msa, scale_msa, eps=1e-6)
            groups = (B * T, S, C) if self.temporal else (B, N, C)
            x_s = self.attn(x_m.view(groups)).view(B, N, C)
            x = K.gated_residual(x, x_s, self.drop_path(gate_msa))
            if self.temporal:
                x_t = x if tpe is None else (x.view(B, T, S, C) + tpe[:, :, None]).view(B, N, C)
                x_t = self.attn_temp(x_t, sp_group, temporal=T)  # frame-major in and out
                x = K.gated_residual(x, x_t, self.drop_path(gate_msa))
            x = x + self.cross_attn(x, y, mask)
            x_m = K.layernorm_modulate(x, shift_mlp, scale_mlp, eps=1e-6)
            return K.gated_residual(x, self.mlp(x_m), self.drop_path(gate_mlp))

        # The plain PyTorch path: Open-Sora v1's block, op for op.
        x_m = modulate(self.norm1(x), shift_msa, scale_msa)
        if self.temporal:
            x_s = rearrange(self.attn(rearrange(x_m, "B (T S) C -> (B T) S C", T=T)), "(B T) S C -> B (T S) C", T=T)
        else:
            x_s = self.attn(x_m)
        x = x + self.drop_path(gate_msa * x_s)
        if self.temporal:
            x_t = rearrange(x, "B (T S) C -> (B S) T C", T=T)
            if tpe is not None:
                x_t = x_t + tpe
            x_t = self.attn_temp(x_t, sp_group)
            x = x + self.drop_path(gate_msa * rearrange(x_t, "(B S) T C -> B (T S) C", S=S))
        x = x + self.cross_attn(x, y, mask)
        return x + self.drop_path(gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class STDiT(VideoTransformer):
    """Open-Sora v1's STDiT. forward(x (B, C, T, H, W), timestep (B,), y (B, 1, L, caption_channels),
    mask (B, L)) -> (B, 2C or C, T, H, W) float32. no_temporal_pos_emb=True leaves out the temporal position
    embedding (Open-Sora v1's STDiT ignored the flag; the default behaves the same)."""

    temporal_attention = True
    temporal_in_blocks = True  # block 0 adds the temporal embedding to its temporal branch's input

    def __init__(
        self,
        input_size=(1, 32, 32),
        in_channels=4,
        patch_size=(1, 2, 2),
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        pred_sigma=True,
        drop_path=0.0,
        no_temporal_pos_emb=False,
        caption_channels=4096,
        model_max_length=120,
        space_scale=1.0,
        time_scale=1.0,
        enable_flashattn=False,
        enable_layernorm_kernel=False,
        enable_sequence_parallelism=False,
        grad_checkpoint=False,
    ):
        super().__init__()
        if enable_sequence_parallelism and not self.temporal_attention:
            raise ValueError(f"{type(self).__name__} has no temporal attention to split by frames: "
                             "enable_sequence_parallelism is for STDiT")
        self.space_scale = space_scale
        self.time_scale = time_scale
        self.init_geometry(input_size, patch_size, in_channels, in_channels * 2 if pred_sigma else in_channels,
                           hidden_size, num_heads)
        self.caption_channels = caption_channels
        self.no_temporal_pos_emb = no_temporal_pos_emb
        self.enable_layernorm_kernel = enable_layernorm_kernel
        self.enable_sequence_parallelism = enable_sequence_parallelism
        self.grad_checkpoint = grad_checkpoint

        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        rates = np.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            STDiTBlock(hidden_size, num_heads, mlp_ratio, rates[i], enable_flashattn, enable_layernorm_kernel,
                       temporal=self.temporal_attention)
            for i in range(depth)
        )
        self.final_layer = T2IFinalLayer(hidden_size, self.patch_size[0] * self.patch_size[1] * self.patch_size[2],
                                         self.out_channels, enable_layernorm_kernel)
        self.initialize_weights()

    def initialize_weights(self):
        basic_init(self)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        zero = [self.final_layer.linear] + [block.cross_attn.proj for block in self.blocks]
        if self.temporal_attention:
            zero += [block.attn_temp.proj for block in self.blocks]
        for linear in zero:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def check_inputs(self, x, timestep, y, mask):
        self.check_video(x, timestep)
        B = x.shape[0]
        if y.dim() != 4 or y.shape[0] != B or y.shape[1] != 1 or y.shape[3] != self.caption_channels:
            raise ValueError(
                f"y must be (B={B}, 1, L, caption_channels={self.caption_channels}), got {tuple(y.shape)}"
            )
        null_tokens = self.y_embedder.y_embedding.shape[0]
        if self.training and self.y_embedder.uncond_prob > 0 and y.shape[2] != null_tokens:
            raise ValueError(
                f"y has {y.shape[2]} caption tokens but training drops captions for the null caption of "
                f"model_max_length={null_tokens} tokens: pad captions to {null_tokens}"
            )
        if mask is not None:
            if tuple(mask.shape) != (B, y.shape[2]):
                raise ValueError(f"mask must have shape ({B}, {y.shape[2]}) for y {tuple(y.shape)}, got {tuple(mask.shape)}")
            # A value check reads the tensor (a host sync, and a graph break under torch.compile): eager only.
            if not torch.compiler.is_compiling() and not mask.bool().any(dim=1).all():
                raise ValueError("mask marks no caption token at all for some sample; each caption needs at least one")

    def forward(self, x, timestep, y, mask=None, sp_group=None):
        """sp_group: this rank's sequence-parallel group (sora.parallel.init_sequence_parallel), which a model
        built with enable_sequence_parallelism=True needs and any other model refuses. A forward argument,
        not a module attribute: a ProcessGroup cannot be deep-copied, as the EMA copy of the model is."""
        return self.parts(x, timestep, y, mask, sp_group).output()

    def parts(self, x, timestep, y, mask=None, sp_group=None):
        """forward's inputs -> its ForwardParts (sora.models.base)."""
        self.check_inputs(x, timestep, y, mask)
        grid = self.token_grid(x.shape[2:])
        if self.enable_sequence_parallelism:
            self.check_sequence_parallel_group(sp_group, grid[0])
        elif sp_group is not None:
            raise ValueError(f"sp_group was given but this {type(self).__name__} was built with "
                             "enable_sequence_parallelism=False")
        dtype = self.x_embedder.proj.weight.dtype
        x = self.x_embedder(x.to(dtype))  # (B, N, C)
        x, tpe = self.add_pos_embed(x, grid)

        t = self.t_embedder(timestep, dtype=x.dtype)  # (B, C)
        modulation = self.t_block(t)  # (B, 6C): every block's shift, scale and gate, before its own table
        y = self.y_embedder(y.to(dtype), self.training).squeeze(1)  # (B, L, C)
        # A mask of all ones is no mask: leaving it out keeps cross-attention on SDPA's fastest kernels.
        if mask is not None:
            mask = mask.bool()
            if not torch.compiler.is_compiling() and bool(mask.all()):
                mask = None
        T = grid[0]
        local_tpe = None if tpe is None or sp_group is None else split_frames(tpe, T, sp_group)

        def run_blocks(h, start, stop):
            if sp_group is None:
                return self.run_blocks(h, y, modulation, mask, T, tpe, start=start, stop=stop)
            h = split_frames(h, T, sp_group)
            h = self.run_blocks(h, y, modulation, mask, T // dist.get_world_size(sp_group), local_tpe, sp_group,
                                start, stop)
            return gather_frames(h, sp_group)

        def final(h):
            return self.unpatchify(self.final_layer(h, t), grid).float()  # (B, N, pt*ph*pw*C_out) unpatchified

        return ForwardParts(x, run_blocks, final, lambda h: self.blocks[0].probe(h, modulation), len(self.blocks))

    def run_blocks(self, x, y, modulation, mask, T, tpe, sp_group=None, start=0, stop=None):
        """blocks[start:stop] on x; block 0 adds the temporal embedding tpe."""
        for i in range(start, len(self.blocks) if stop is None else stop):
            x = self.run_block(self.blocks[i], x, y, modulation, mask, T, tpe if i == 0 else None, sp_group)
        return x


# The XL/2 preset of Open-Sora v1 (and PixArt-alpha): 28 blocks of width 1152, 16 heads, 2x2 spatial patches.
XL_2 = dict(depth=28, hidden_size=1152, patch_size=(1, 2, 2), num_heads=16)
