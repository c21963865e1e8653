"""STDiT2: Open-Sora v1.1's spatial-temporal diffusion transformer, on sora.kernels.

What it adds to STDiT (sora.models.stdit), as Open-Sora v1.1.0 (their d599fd7 stdit2.py and blocks.py) has it:
- any T, H, W per batch: the latent is right-padded to the patch size and the output cropped back; the spatial
  sin-cos embedding is computed for each size, scaled by sqrt(height * width) / input_sq_size (pixels of
  sample 0) and base_size = round(sqrt(H*W patches));
- no temporal position embedding: RoPE (interleaved pairs, theta 10000, frame index 0 .. T-1) on q and k of
  every temporal attention, and RMSNorm qk-norm (qk_norm=True) on q and k of both self-attentions; the
  released weights were trained with RoPE first, then the norm (qk_norm_legacy=True, the default here);
  qk_norm_legacy=False normalises first (Open-Sora's later order);
- the temporal branch has its own LayerNorm and a 3-row modulation table (shift, scale, gate) driven by
  t_block_temp from the timestep plus the frame-count and fps embeddings; the spatial branch and the MLP are
  driven by t_block from the timestep plus the height, width and aspect-ratio embeddings;
- x_mask (B, T) bool, False for a frame given as a condition: that frame is modulated as at timestep 0, in
  every block and in the final layer. The final layer keeps both of Open-Sora's quirks, which the released
  weights were trained with: noisy frames use the raw timestep embedding, condition frames the timestep-0
  embedding plus the size embedding, and the condition frames' LayerNorm and modulation apply to the
  already-modulated tokens (their issue #719).
Selecting a frame's modulation rows before modulating gives the same numbers as Open-Sora's computing both
versions of every token and selecting after, at half the cost. With enable_layernorm_kernel=True:
- LayerNorm + modulation and the gated residuals run as sora.kernels, reading the selected (B, T, C) rows per
  frame (frames=T; one (B, 1, C) row per sample without x_mask);
- temporal attention is one K.temporal_attention on the qkv Linear's frame-major output, RoPE and the q/k
  RMSNorm done in its prologue (from rope.freqs and the norm weights);
- spatial attention's q/k RMSNorm is K.qk_norm, one read of the qkv output, feeding
  scaled_dot_product_attention (or flash-attn).
The final layer under x_mask still normalises twice: its condition frames are normalised and modulated again
after the first modulation (the #719 quirk above), which no selection of rows expresses; fusing the two would save
about 0.5% of the bytes a forward's blocks move (bench/NOTES.md).

Sequence parallelism (which Open-Sora v1.1 removed) works as for STDiT: each rank keeps T/sp whole frames;
temporal attention trades heads for frames (all-to-all), so RoPE sees the global frame indices.

Parameter and buffer names and shapes are Open-Sora v1.1's (rope.freqs included), so its checkpoints load
strictly; `forward` is theirs: forward(x, timestep, y, mask, x_mask, num_frames, height, width, ar, fps).
"""

import dataclasses

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
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
    PositionEmbedding2D,
    RMSNorm,
    RotaryEmbedding,
    SizeEmbedder,
    T2IFinalLayer,
    TimestepEmbedder,
    attention,
    basic_init,
    modulate,
    rotate,
)
from sora.parallel import gather_frames, split_frames


class STDiT2Attention(Attention):
    """Self-attention with optional RMSNorm of each head's q and k (q_norm, k_norm: Open-Sora v1.1's qk-norm).

    The temporal form keeps the frame-major layout of the residual stream; see forward.
    """

    def __init__(self, dim, num_heads, qk_norm=False, qk_norm_legacy=True, enable_flashattn=False,
                 enable_layernorm_kernel=False):
        super().__init__(dim, num_heads, qkv_bias=True, enable_flashattn=enable_flashattn)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.qk_norm_legacy = qk_norm_legacy
        self.enable_layernorm_kernel = enable_layernorm_kernel

    def rope_and_norm(self, q, k, rope):
        """q, k (..., L, D): RoPE then qk-norm (qk_norm_legacy, the order v1.1 was trained in), or the reverse."""
        if rope is None:
            return self.q_norm(q), self.k_norm(k)
        if self.qk_norm_legacy:
            return self.q_norm(rotate(q, *rope)), self.k_norm(rotate(k, *rope))
        return rotate(self.q_norm(q), *rope), rotate(self.k_norm(k), *rope)

    def forward(self, x, sp_group=None, temporal=None, rope=None, rope_freqs=None):
        """x (B, N, C) -> (B, N, C). temporal=None: every token attends to all N. temporal=T: x is frame-major
        "B (T S) C" and each spatial position attends over its frames, q and k rotated by RoPE: rope (the cos,
        sin tables for all frames) in eager PyTorch, rope_freqs (rope.freqs) in K.temporal_attention; with an
        sp group x holds T of the T * sp frames."""
        B, N, C = x.shape
        qkv = self.qkv(x)
        fused_norm = self.enable_layernorm_kernel and isinstance(self.q_norm, RMSNorm)
        if temporal is None and fused_norm:
            q, k, v = K.qk_norm(qkv, self.num_heads, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
            out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.enable_flashattn)
            return self.proj(out.reshape(B, N, C))
        qkv = qkv.view(B, N, 3, self.num_heads, self.head_dim)
        if temporal is None:
            q, k, v = qkv.unbind(2)  # (B, N, H, D) each
            q, k = self.rope_and_norm(q, k, None)
            return self.proj(attention(q, k, v, self.enable_flashattn).reshape(B, N, C))
        S = N // temporal
        if sp_group is not None:
            qkv = K.all_to_all(qkv, sp_group, scatter_dim=3, gather_dim=1)  # (B, N*sp, 3, H/sp, D)
        frames, heads = qkv.shape[1] // S, qkv.shape[3]
        if self.enable_layernorm_kernel:
            # Every rank holds all frames of its heads after the exchange: frame t is global frame t (offset 0).
            norms = {}
            if fused_norm:
                norms = dict(q_norm=self.q_norm.weight, k_norm=self.k_norm.weight, eps=self.q_norm.eps)
            out = K.temporal_attention(qkv.reshape(B, frames * S, -1), frames, heads, rope_freqs=rope_freqs,
                                       rope_first=self.qk_norm_legacy, **norms)
            out = out.view(B, frames * S, heads, self.head_dim)
        else:
            # (B, T, S, 3, H, D) -> 3 x (B*S, H, T, D)
            q, k, v = qkv.view(B, frames, S, 3, heads, self.head_dim).permute(3, 0, 2, 4, 1, 5).flatten(1, 2).unbind(0)
            q, k = self.rope_and_norm(q, k, rope)
            out = F.scaled_dot_product_attention(q, k, v)  # (B*S, H, T, D)
            out = out.view(B, S, heads, frames, self.head_dim).permute(0, 3, 1, 2, 4).reshape(B, frames * S, heads,
                                                                                               self.head_dim)
        if sp_group is not None:
            out = K.all_to_all(out, sp_group, scatter_dim=1, gather_dim=2)
        return self.proj(out.reshape(B, N, C))


def frame_rows(table, modulation, modulation_zero, x_mask):
    """Per-frame modulation rows: table (k, C) + modulation (B, k*C) -> (B, 1, k, C); with x_mask (B, T), frames
    where it is False take table + modulation_zero instead -> (B, T, k, C)."""
    k, C = table.shape
    rows = table[None] + modulation.view(-1, k, C)
    if x_mask is None:
        return rows[:, None]
    rows_zero = table[None] + modulation_zero.view(-1, k, C)
    return torch.where(x_mask[:, :, None, None], rows[:, None], rows_zero[:, None])


class STDiT2Block(nn.Module):
    """Open-Sora v1.1's block: spatial attention, temporal attention (own norm and modulation), cross-attention,
    MLP. Modulation rows are (B, F, C) with F = 1 (every frame alike) or F = T (one row per frame)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, drop_path=0.0, qk_norm=False, qk_norm_legacy=True,
                 enable_flashattn=False, enable_layernorm_kernel=False):
        super().__init__()
        self.enable_layernorm_kernel = enable_layernorm_kernel
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = STDiT2Attention(hidden_size, num_heads, qk_norm, qk_norm_legacy, enable_flashattn,
                                    enable_layernorm_kernel)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.norm_temp = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn_temp = STDiT2Attention(hidden_size, num_heads, qk_norm, qk_norm_legacy, enable_flashattn,
                                         enable_layernorm_kernel)
        self.scale_shift_table_temporal = nn.Parameter(torch.randn(3, hidden_size) / hidden_size**0.5)

    def modulate(self, x, norm, shift, scale):
        """norm(x) * (1 + scale) + shift, x (B, N, C), shift and scale (B, F, C) for F groups of frames."""
        B, N, C = x.shape
        groups = shift.shape[1]
        if self.enable_layernorm_kernel:
            return K.layernorm_modulate(x, shift, scale, eps=norm.eps, frames=groups)
        return modulate(norm(x).view(B, groups, -1, C), shift[:, :, None], scale[:, :, None]).view(B, N, C)

    def gated(self, x, h, gate):
        """x + gate * h, gate (B, F, C); stochastic depth drops a sample's whole branch (its gate)."""
        B, N, C = x.shape
        groups = gate.shape[1]
        gate = self.drop_path(gate)
        if self.enable_layernorm_kernel:
            return K.gated_residual(x, h.reshape(B, N, C), gate, frames=groups)
        return x + (gate[:, :, None] * h.view(B, groups, -1, C)).view(B, N, C)

    def spatial_rows(self, cond):
        """Shift, scale and gate of spatial attention and MLP, (B, F, C) each."""
        return frame_rows(self.scale_shift_table, cond.spatial, cond.spatial_zero, cond.x_mask).unbind(2)

    def probe(self, x, cond):
        """Spatial attention's input, norm1(x) modulated (the sampling cache's change indicator)."""
        shift_msa, scale_msa = self.spatial_rows(cond)[:2]
        return self.modulate(x, self.norm1, shift_msa, scale_msa)

    def temporal(self, x, T, modulation, modulation_zero=None, x_mask=None, sp_group=None, rope=None, rope_freqs=None):
        """The temporal branch: x + gate * temporal attention of norm_temp(x) shifted and scaled, its rows from
        the (B, 3C) modulation (modulation_zero on frames where x_mask is False); forward's arguments otherwise."""
        shift, scale, gate = frame_rows(self.scale_shift_table_temporal, modulation, modulation_zero, x_mask).unbind(2)
        h = self.modulate(x, self.norm_temp, shift, scale)
        return self.gated(x, self.attn_temp(h, sp_group, temporal=T, rope=rope, rope_freqs=rope_freqs), gate)

    def forward(self, x, y, mask, cond, T, sp_group=None):
        """x (B, T*S, C) frame-major; y (B, L, C) caption, mask (B, L) bool or None; cond: the STDiT2Conditioning
        of these frames. With a sequence-parallel group, x holds T whole frames of each sample out of T * sp."""
        B, N, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.spatial_rows(cond)

        h = self.modulate(x, self.norm1, shift_msa, scale_msa)
        h = self.attn(h.view(B * T, N // T, C)).view(B, N, C)
        x = self.gated(x, h, gate_msa)

        x = self.temporal(x, T, cond.temporal, cond.temporal_zero, cond.x_mask, sp_group, cond.rope, cond.rope_freqs)

        x = x + self.cross_attn(x, y, mask)

        h = self.modulate(x, self.norm2, shift_mlp, scale_mlp)
        return self.gated(x, self.mlp(h), gate_mlp)


class STDiT2FinalLayer(T2IFinalLayer):
    """PixArt's final layer with Open-Sora v1.1's x_mask handling (both quirks, see the module docstring)."""

    def forward(self, x, t, x_mask=None, t_zero=None):
        """x (B, T*S, C); t (B, C) the raw timestep embedding; x_mask (B, T); t_zero (B, C)."""
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x = self.modulated(x, shift, scale)
        if x_mask is not None:
            B, N, C = x.shape
            shift_zero, scale_zero = (self.scale_shift_table[None] + t_zero[:, None]).chunk(2, dim=1)
            x_zero = self.modulated(x, shift_zero, scale_zero)
            frames = x_mask.shape[1]
            x = torch.where(x_mask[:, :, None, None], x.view(B, frames, -1, C), x_zero.view(B, frames, -1, C))
            x = x.view(B, N, C)
        return self.linear(x)


@dataclasses.dataclass
class STDiT2Conditioning:
    """What every block and the final layer take besides the tokens, computed once per forward by
    STDiT2.embed: t (B, C) the timestep embedding; spatial (B, 6C) and temporal (B, 3C) the modulation of
    the spatial/MLP and temporal branches (timestep plus size, resp. frame-count and fps embeddings), and
    their timestep-0 versions with x_mask; final_zero (B, C), t0 + the size embedding, for the final layer's
    condition frames; x_mask (B, T) bool or None; rope: the (cos, sin) tables for the T token frames (None
    with the kernels, which take rope_freqs, the (D/2,) frequencies); grid: the token grid (T, H, W); size: the
    latent (T, H, W) to crop the output back to."""

    t: torch.Tensor
    spatial: torch.Tensor
    temporal: torch.Tensor
    spatial_zero: torch.Tensor | None
    temporal_zero: torch.Tensor | None
    final_zero: torch.Tensor | None
    x_mask: torch.Tensor | None
    rope: tuple | None
    rope_freqs: torch.Tensor
    grid: tuple
    size: tuple

    def frames(self, start, stop):
        """The same conditioning for token frames start .. stop-1 (a sequence-parallel rank's share); RoPE
        keeps the global frame indices, since temporal attention sees every frame."""
        x_mask = None if self.x_mask is None else self.x_mask[:, start:stop]
        return dataclasses.replace(self, x_mask=x_mask)


class STDiT2(VideoTransformer):
    """Open-Sora v1.1's STDiT2. forward(x (B, C, T, H, W), timestep (B,), y (B, 1, L, caption_channels),
    mask (B, L), x_mask (B, T), num_frames, height, width, ar, fps) -> (B, 2C or C, T, H, W) float32.

    The size inputs are numbers or tensors of B (or a divisor of B, repeated) values: height, width in pixels,
    ar = height / width (Open-Sora's sampling; its v1.1 training passed width / height), num_frames the latent
    frame count, fps the frame rate (Open-Sora passes 120 for images). The arguments are Open-Sora's
    STDiT2Config keys; the defaults are those of the released v1.1 weights (input_sq_size=512, qk_norm=True,
    200 caption tokens), where Open-Sora's class defaults (32, False, 120) match none of its configs.
    enable_flash_attn (or its old name enable_flashattn, which Open-Sora v1.1 silently ignored): flash
    attention for the spatial self-attention. input_size is accepted and unused (any size runs).
    freeze: None, "not_temporal" (only temporal attention trains) or "text" (cross-attention frozen).
    The timestep is embedded as given, as STDiT's (Open-Sora first casts it to the model dtype, which in bf16
    rounds 999 to 1000).
    """

    def __init__(
        self,
        input_size=(None, None, None),
        input_sq_size=512,
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
        model_max_length=200,
        freeze=None,
        qk_norm=True,
        qk_norm_legacy=True,
        enable_flash_attn=False,
        enable_flashattn=False,
        enable_layernorm_kernel=False,
        enable_sequence_parallelism=False,
        grad_checkpoint=False,
    ):
        super().__init__()
        check_arguments(input_size, patch_size, hidden_size, num_heads, input_sq_size, no_temporal_pos_emb, freeze)
        self.input_size = tuple(input_size)
        self.input_sq_size = input_sq_size
        self.patch_size = tuple(patch_size)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.caption_channels = caption_channels
        self.enable_layernorm_kernel = enable_layernorm_kernel
        self.enable_sequence_parallelism = enable_sequence_parallelism
        self.grad_checkpoint = grad_checkpoint

        self.pos_embed = PositionEmbedding2D(hidden_size)
        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.t_block_temp = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        self.rope = RotaryEmbedding(hidden_size // num_heads)
        rates = np.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            STDiT2Block(hidden_size, num_heads, mlp_ratio, rates[i], qk_norm, qk_norm_legacy,
                        enable_flash_attn or enable_flashattn, enable_layernorm_kernel)
            for i in range(depth)
        )
        self.final_layer = STDiT2FinalLayer(hidden_size, int(np.prod(self.patch_size)), self.out_channels,
                                            enable_layernorm_kernel)
        self.csize_embedder = SizeEmbedder(hidden_size // 3)
        self.ar_embedder = SizeEmbedder(hidden_size // 3)
        self.fl_embedder = SizeEmbedder(hidden_size)
        self.fps_embedder = SizeEmbedder(hidden_size)
        self.initialize_weights()
        for name, p in self.named_parameters():
            if (freeze == "not_temporal" and "attn_temp" not in name) or (freeze == "text" and "cross_attn" in name):
                p.requires_grad_(False)

    def initialize_weights(self):
        basic_init(self)
        for linear in (self.t_block[1], self.t_block_temp[1], self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(linear.weight, std=0.02)
        zero = [self.final_layer.linear]
        zero += [layer for block in self.blocks for layer in (block.cross_attn.proj, block.attn_temp.proj)]
        for linear in zero:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def token_grid(self, size):
        """(T, H, W) latent size -> token grid, each side rounded up: x is padded to the patch size."""
        return tuple(-(-n // p) for n, p in zip(size, self.patch_size))

    def adapt_checkpoint(self, state):
        """A checkpoint's tensors (after sora.models.checkpoint's own adjustments) for this model: a null caption
        (y_embedding) of another length, e.g. PixArt-alpha's or STDiT's 120 tokens, is cut or extended by
        repeating its last row, as Open-Sora v1.1's loader does."""
        name = "y_embedder.y_embedding"
        own = self.y_embedder.y_embedding
        null = state.get(name)
        if null is not None and null.dim() == 2 and null.shape[1] == own.shape[1] and null.shape[0] != own.shape[0]:
            length = own.shape[0]
            extra = null[-1:].expand(max(length - null.shape[0], 0), -1)
            state = {**state, name: torch.cat([null[:length], extra])}
        return state

    # ---- forward, in three parts: embed (tokens and conditioning), blocks, final (output layer, unpatchify).

    def forward(self, x, timestep, y, mask=None, x_mask=None, num_frames=None, height=None, width=None, ar=None,
                fps=None, sp_group=None):
        """sp_group: this rank's sequence-parallel group (sora.parallel.init_sequence_parallel), which a model
        built with enable_sequence_parallelism=True needs and any other model refuses."""
        return self.parts(x, timestep, y, mask, x_mask, num_frames, height, width, ar, fps, sp_group).output()

    def parts(self, x, timestep, y, mask=None, x_mask=None, num_frames=None, height=None, width=None, ar=None,
              fps=None, sp_group=None):
        """forward's inputs -> its ForwardParts (sora.models.base)."""
        x, y, mask, cond = self.embed(x, timestep, y, mask, x_mask, num_frames, height, width, ar, fps)
        return ForwardParts(x, lambda h, start, stop: self.run_blocks(h, y, mask, cond, sp_group, start, stop),
                            lambda h: self.final(h, cond), lambda h: self.blocks[0].probe(h, cond), len(self.blocks))

    def embed(self, x, timestep, y, mask=None, x_mask=None, num_frames=None, height=None, width=None, ar=None,
              fps=None):
        """Check the inputs; patchify x (padded to the patch size) and add the spatial position embedding;
        embed the caption; compute the conditioning. Returns (tokens (B, N, C), caption (B, L, C), caption mask
        (B, L) bool or None, STDiT2Conditioning)."""
        sizes = self.check_inputs(x, timestep, y, mask, x_mask, num_frames, height, width, ar, fps)
        B = x.shape[0]
        dtype = self.x_embedder.proj.weight.dtype
        size = tuple(x.shape[2:])
        grid = self.token_grid(size)
        (Tx, Hx, Wx), (pt, ph, pw) = size, self.patch_size
        x = self.x_embedder(F.pad(x.to(dtype), (0, -Wx % pw, 0, -Hx % ph, 0, -Tx % pt)))  # right-padded; (B, N, C)
        T, S = grid[0], grid[1] * grid[2]
        # Open-Sora scales the grid by the pixel size of sample 0: a batch is one size. Their float64 arithmetic
        # (Python numbers from .item()) rounded to the fp32 the positions are divided in, without a host sync.
        pixels = sizes["height"][0].double() * sizes["width"][0].double()
        scale = (pixels.sqrt() / self.input_sq_size).float()
        pos = self.pos_embed(grid[1], grid[2], scale, round(S**0.5), x.dtype)  # (1, S, C)
        x = (x.view(B, T, S, -1) + pos[:, None]).view(B, T * S, -1)

        size_info = torch.cat([self.csize_embedder(torch.stack([sizes["height"], sizes["width"]], dim=1)),
                               self.ar_embedder(sizes["ar"][:, None])], dim=1)  # (B, C): [h | w | ar]
        frame_info = self.fl_embedder(sizes["num_frames"][:, None]) + self.fps_embedder(sizes["fps"][:, None])
        t = self.t_embedder(timestep, dtype=x.dtype)  # (B, C)
        zero = dict(spatial_zero=None, temporal_zero=None, final_zero=None)
        if x_mask is not None:
            t_zero = self.t_embedder(torch.zeros_like(timestep), dtype=x.dtype)
            zero = dict(spatial_zero=self.t_block(t_zero + size_info),
                        temporal_zero=self.t_block_temp(t_zero + frame_info), final_zero=t_zero + size_info)
            x_mask = x_mask.bool()
        rope = None if self.enable_layernorm_kernel else self.rope.tables(T, x.dtype)
        cond = STDiT2Conditioning(t=t, spatial=self.t_block(t + size_info), temporal=self.t_block_temp(t + frame_info),
                                  x_mask=x_mask, rope=rope, rope_freqs=self.rope.freqs, grid=grid, size=size, **zero)

        y = self.y_embedder(y.to(dtype), self.training).squeeze(1)  # (B, L, C)
        # A mask of all ones is no mask: leaving it out keeps cross-attention on SDPA's fastest kernels.
        if mask is not None:
            mask = mask.bool()
            if not torch.compiler.is_compiling() and bool(mask.all()):
                mask = None
        return x, y, mask, cond

    def run_blocks(self, x, y, mask, cond, sp_group=None, start=0, stop=None):
        """blocks[start:stop] (default: all) on the tokens (B, N, C); with an sp group, each rank runs its share of
        the frames and every rank gets all of them back."""
        blocks = self.blocks[start:stop]
        T = cond.grid[0]
        if self.enable_sequence_parallelism:
            self.check_sequence_parallel_group(sp_group, T)
        elif sp_group is not None:
            raise ValueError(f"sp_group was given but this {type(self).__name__} was built with "
                             "enable_sequence_parallelism=False")
        if sp_group is not None:
            local = T // dist.get_world_size(sp_group)
            start = dist.get_rank(sp_group) * local
            x, cond_local = split_frames(x, T, sp_group), cond.frames(start, start + local)
            for block in blocks:
                x = self.run_block(block, x, y, mask, cond_local, local, sp_group)
            return gather_frames(x, sp_group)
        for block in blocks:
            x = self.run_block(block, x, y, mask, cond, T)
        return x

    def final(self, x, cond):
        """The output layer on the tokens (B, N, C) -> (B, C_out, T, H, W) float32, cropped to the input size."""
        x = self.final_layer(x, cond.t, cond.x_mask, cond.final_zero)
        T, H, W = cond.size
        return self.unpatchify(x, cond.grid)[:, :, :T, :H, :W].float()

    def check_inputs(self, x, timestep, y, mask, x_mask, num_frames, height, width, ar, fps):
        """Validate forward's inputs; returns the size inputs as float32 (B,) tensors by name."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, T, H, W), got {tuple(x.shape)}")
        B = x.shape[0]
        if timestep.shape != (B,):
            raise ValueError(f"timestep must have shape ({B},) for x {tuple(x.shape)}, got {tuple(timestep.shape)}")
        if y.dim() != 4 or y.shape[0] != B or y.shape[1] != 1 or y.shape[3] != self.caption_channels:
            raise ValueError(
                f"y must be (B={B}, 1, L, caption_channels={self.caption_channels}), got {tuple(y.shape)}")
        null_tokens = self.y_embedder.y_embedding.shape[0]
        if self.training and self.y_embedder.uncond_prob > 0 and y.shape[2] != null_tokens:
            raise ValueError(
                f"y has {y.shape[2]} caption tokens but training drops captions for the null caption of "
                f"model_max_length={null_tokens} tokens: pad captions to {null_tokens}"
            )
        if mask is not None:
            if tuple(mask.shape) != (B, y.shape[2]):
                raise ValueError(
                    f"mask must have shape ({B}, {y.shape[2]}) for y {tuple(y.shape)}, got {tuple(mask.shape)}")
            if not torch.compiler.is_compiling() and not mask.bool().any(dim=1).all():
                raise ValueError("mask marks no caption token at all for some sample; each caption needs at least one")
        frames = -(-x.shape[2] // self.patch_size[0])
        if x_mask is not None and (not isinstance(x_mask, torch.Tensor) or tuple(x_mask.shape) != (B, frames)):
            got = tuple(x_mask.shape) if isinstance(x_mask, torch.Tensor) else type(x_mask).__name__
            raise ValueError(
                f"x_mask must be a (B, T) = ({B}, {frames}) tensor, True for frames to generate, got {got}")
        given = dict(num_frames=num_frames, height=height, width=width, ar=ar, fps=fps)
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(f"STDiT2 needs {', '.join(missing)}: pass num_frames, height, width (pixels), ar "
                             "and fps, each a number or a tensor of B values")
        return {name: batch_values(name, value, B, x.device) for name, value in given.items()}


def batch_values(name, value, B, device):
    """A size input as a float32 (B,) tensor: a number, or a tensor of B values or of a divisor of B values
    (repeated, as Open-Sora does for the doubled batch of classifier-free guidance)."""
    value = torch.as_tensor(value, device=device).float().reshape(-1)
    if value.numel() == 0 or B % value.numel() != 0:
        raise ValueError(f"{name} must be a number or hold B={B} values (or a divisor of B), got {value.numel()}")
    return value.repeat(B // value.numel())


def check_arguments(input_size, patch_size, hidden_size, num_heads, input_sq_size, no_temporal_pos_emb, freeze):
    if len(input_size) != 3 or len(patch_size) != 3:
        raise ValueError(f"input_size and patch_size must be (T, H, W), got {input_size} and {patch_size}")
    if hidden_size % num_heads != 0 or hidden_size % 12 != 0:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads={num_heads} and by 12 (a third "
                         "for each of height, width and aspect ratio, and 2-D sin-cos position embeddings)")
    if (hidden_size // num_heads) % 2:
        raise ValueError(f"the head dim hidden_size / num_heads = {hidden_size // num_heads} must be even (RoPE)")
    if not input_sq_size > 0:
        raise ValueError(f"input_sq_size must be a positive number of pixels, got {input_sq_size!r}")
    if no_temporal_pos_emb:
        raise ValueError("no_temporal_pos_emb=True is not supported: STDiT2's temporal position is RoPE in every "
                         "temporal attention (Open-Sora v1.1 ignores the flag)")
    if freeze not in (None, "not_temporal", "text"):
        raise ValueError(f"freeze must be None, 'not_temporal' or 'text', got {freeze!r}")


# Open-Sora's STDiT2Config keys that fix the weights' shapes or the function they compute: a model argument that
# contradicts one of a Hugging Face folder's config.json is an error (sora.models.build_model).
DEFINING = ("input_sq_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio",
            "pred_sigma", "caption_channels", "qk_norm", "qk_norm_legacy")

# The XL/2 preset of Open-Sora v1.1: 28 blocks of width 1152, 16 heads, 2x2 spatial patches.
XL_2 = dict(depth=28, hidden_size=1152, patch_size=(1, 2, 2), num_heads=16)
