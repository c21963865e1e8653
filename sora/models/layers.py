"""Building blocks shared by STDiT, STDiT2, PixArt, DiT and Latte.

Module and parameter names follow Open-Sora v1 (and through it PixArt-alpha and DiT), so their released
checkpoints load unchanged. Attention runs on torch's scaled_dot_product_attention, or flash-attn's
flash_attn_func when it is installed and asked for.
"""

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import sora.kernels as K


@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def attention(q, k, v, enable_flashattn=False, mask=None):
    """Softmax attention over (B, N, H, D) tensors, returning (B, N, H, D).

    enable_flashattn: flash-attn when importable (it takes this layout as is), else SDPA restricted to its
    flash and memory-efficient backends. mask: (B, Nk) bool, True where a key may be attended.
    """
    flash = _flash_attn_func() if enable_flashattn and mask is None and q.is_cuda else None
    if flash is not None and q.dtype in (torch.float16, torch.bfloat16):
        return flash(q, k, v)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    attn_mask = None if mask is None else mask[:, None, None, :]
    if enable_flashattn and q.is_cuda:
        backends = [torch.nn.attention.SDPBackend.FLASH_ATTENTION, torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION]
        with torch.nn.attention.sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    Every token of x attends to all N, or with temporal=T x is frame-major "B (T S) C" and each spatial
    position attends over its T frames: K.temporal_attention reads the qkv Linear's output and writes the proj
    Linear's input where they are, so no rearrange copies surround it.
    With a sequence-parallel group (Ulysses), x holds this rank's part of the sequence; heads are traded for
    the sequence around the softmax: (B, N/sp, 3, H, D) -> all-to-all -> (B, N, 3, H/sp, D), and back. With
    temporal=T, x holds T whole frames of each sample; frames are the outer part of the token axis, so the
    gather concatenates them in rank order and the kernel sees all T * sp frames.
    """

    def __init__(self, dim, num_heads, qkv_bias=True, enable_flashattn=False):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.enable_flashattn = enable_flashattn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, sp_group=None, temporal=None):
        """x (B, N, C) -> (B, N, C); temporal: None (attend over all N tokens) or the frame count T of x."""
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        if sp_group is not None:
            qkv = K.all_to_all(qkv, sp_group, scatter_dim=3, gather_dim=1)  # (B, N*sp, 3, H/sp, D)
        if temporal is None:
            q, k, v = qkv.unbind(2)
            out = attention(q, k, v, self.enable_flashattn)
        else:
            frames, heads = temporal * qkv.shape[1] // N, qkv.shape[3]
            out = K.temporal_attention(qkv.flatten(2), frames, heads).view(B, -1, heads, self.head_dim)
        if sp_group is not None:
            out = K.all_to_all(out, sp_group, scatter_dim=1, gather_dim=2)
        return self.proj(out.reshape(B, N, C))


class MultiHeadCrossAttention(nn.Module):
    """Image tokens attend to caption tokens; `mask` (B, L) marks the caption's real (non-padding) tokens.

    Each sample attends to its own caption through SDPA's attention mask, the same result as Open-Sora v1's
    packed sequence with xformers' BlockDiagonalMask, without needing xformers.
    """

    def __init__(self, d_model, num_heads):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"hidden size {d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, d_model * 2)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x, cond, mask=None):
        B, N, C = x.shape
        q = self.q_linear(x).view(B, N, self.num_heads, self.head_dim)
        k, v = self.kv_linear(cond).view(B, -1, 2, self.num_heads, self.head_dim).unbind(2)
        out = attention(q, k, v, mask=mask)
        return self.proj(out.reshape(B, N, C))


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (timm's Mlp, which Open-Sora's checkpoints were saved from)."""

    def __init__(self, in_features, hidden_features, out_features=None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's branch with probability p during training, scaling survivors."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class PatchEmbed3D(nn.Module):
    """(B, C, T, H, W) video latents -> (B, N, D) tokens, frame-major ("B (T S) D")."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        # Channels-last from here on: without the copy, the residual stream would keep the convolution's
        # channel-first strides through every block (elementwise ops keep their input's layout), and each
        # LayerNorm and Linear would pay a hidden transpose. Open-Sora v1 carries that layout.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features ([cos, sin], GLIDE's order) through a two-layer SiLU MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = F.pad(embedding, (0, 1))
        return embedding

    def forward(self, t, dtype):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(dtype))


class SizeEmbedder(TimestepEmbedder):
    """Open-Sora v1.1's embedding of sizes (height, width, aspect ratio, frame count, fps): the timestep features
    of each number (in fp32) through the same MLP, at the parameters' dtype. s (B, k) -> (B, k * hidden_size)."""

    def forward(self, s):
        B = s.shape[0]
        return super().forward(s.reshape(-1), dtype=self.mlp[0].weight.dtype).view(B, -1)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim (LLaMA's; Open-Sora v1.1's qk-norm): in fp32 or wider, back to the
    input dtype, then times the weight."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * (wide * torch.rsqrt(wide.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding of interleaved channel pairs: pair (2i, 2i+1) of a head at position p turns by
    p * freqs[i], freqs[i] = theta^(-2i/dim) (rotary-embedding-torch's default, as Open-Sora v1.1 uses it).
    `freqs` is a parameter that never trains, so that checkpoints carry it (their `rope.freqs`)."""

    def __init__(self, dim, theta=10000):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {dim}")
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def tables(self, length, dtype):
        """cos and sin (length, dim) for positions 0 .. length-1, counted in `dtype` (the queries' dtype) and
        multiplied in the dtype of freqs."""
        positions = torch.arange(length, device=self.freqs.device, dtype=dtype).to(self.freqs.dtype)
        angles = (positions[:, None] * self.freqs[None]).repeat_interleave(2, dim=-1)
        return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """x (..., L, D) rotated by the (L, D) tables of RotaryEmbedding.tables: x * cos + rotate_half(x) * sin, with
    rotate_half turning each adjacent pair (x0, x1) into (-x1, x0)."""
    pairs = x.unflatten(-1, (-1, 2))
    half_turn = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x * cos + half_turn * sin).to(x.dtype)


class PositionEmbedding2D(nn.Module):
    """Open-Sora v1.1's spatial sin-cos embedding, computed for each size: (1, H*W, dim), rows first, the first
    half of the channels encoding the column, the second half the row (as get_2d_sincos_pos_embed). Positions
    are fp32, `arange(n) / scale * (base_size / n)`; the frequencies are a (non-persistent) buffer, so they take
    the model's dtype."""

    def __init__(self, dim):
        super().__init__()
        if dim % 4:
            raise ValueError(f"2-D sin-cos position embeddings need a width divisible by 4, got {dim}")
        half = dim // 2
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, half, 2).float() / half), persistent=False)

    def forward(self, h, w, scale, base_size, dtype):
        device = self.inv_freq.device
        grid_h = torch.arange(h, device=device) / scale * (base_size / h)
        grid_w = torch.arange(w, device=device) / scale * (base_size / w)
        rows = grid_h[:, None].expand(h, w).reshape(-1)
        cols = grid_w[None, :].expand(h, w).reshape(-1)
        embedding = [self._sincos(cols), self._sincos(rows)]
        return torch.cat(embedding, dim=-1)[None].to(dtype)

    def _sincos(self, positions):
        angles = positions[:, None] * self.inv_freq[None]  # fp32 positions times the buffer: the wider dtype
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def drop_mask(n, device, prob, train, force_drop_ids=None):
    """Which of n samples lose their condition to the null one (classifier-free guidance dropout): (n,) bool, or
    None when none can. force_drop_ids (n,): 1 where to drop, whatever train and prob; otherwise each sample is
    dropped with probability prob while training."""
    if force_drop_ids is not None:
        return force_drop_ids == 1
    if train and prob > 0:
        return torch.rand(n, device=device) < prob
    return None


class CaptionEmbedder(nn.Module):
    """Projects text-encoder features to the hidden size; during training drops captions for CFG.

    `y_embedding` is the learned-free null caption (a buffer, as in PixArt/Open-Sora: saved, never trained)
    that replaces a dropped caption, and that samplers use as the unconditional input.
    """

    def __init__(self, in_channels, hidden_size, uncond_prob, token_num=120):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def forward(self, caption, train, force_drop_ids=None):
        """caption (B, 1, L, in_channels) -> (B, 1, L, hidden)."""
        drop = drop_mask(caption.shape[0], caption.device, self.uncond_prob, train, force_drop_ids)
        if drop is not None:
            caption = torch.where(drop[:, None, None, None], self.y_embedding.to(caption.dtype), caption)
        return self.y_proj(caption)

    def null(self, n):
        """The unconditional input of classifier-free guidance for n samples: the null caption, (n, 1, L, C)."""
        return self.y_embedding[None, None].expand(n, 1, -1, -1)


class LabelEmbedder(nn.Module):
    """Class ids (B,) -> (B, hidden) rows of a learned table (DiT, Latte).

    With dropout_prob > 0 the table has one more row, the null class `num_classes`: it replaces a dropped label
    during training and is the unconditional input for classifier-free guidance. Without dropout there is no
    null row (the table has num_classes rows), as in DiT's and Latte's checkpoints.
    """

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    @property
    def has_null_class(self):
        return self.embedding_table.num_embeddings > self.num_classes

    def forward(self, labels, train, force_drop_ids=None):
        """labels (B,) int64; force_drop_ids (B,): 1 where the null class replaces the label."""
        drop = drop_mask(labels.shape[0], labels.device, self.dropout_prob, train, force_drop_ids)
        if drop is not None:
            if not self.has_null_class:
                raise ValueError("dropping labels needs the null class, but this embedder has none (dropout_prob=0)")
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)

    def null(self, n):
        """The unconditional input of classifier-free guidance for n samples: the null class, (n,) int64."""
        if not self.has_null_class:
            raise ValueError("guidance needs the null class, but this model has none (built with class_dropout_prob=0)")
        return torch.full((n,), self.num_classes, dtype=torch.long, device=self.embedding_table.weight.device)


class _ModulatedOutput(nn.Module):
    """What both final layers share: LN(x) * (1 + scale) + shift, fused or not, then the linear projection."""

    def __init__(self, hidden_size, num_patch, out_channels, enable_layernorm_kernel=False):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.enable_layernorm_kernel = enable_layernorm_kernel

    def modulated(self, x, shift, scale):
        """LN(x) * (1 + scale) + shift; x (B, N, C), shift and scale (B, 1, C)."""
        if self.enable_layernorm_kernel:
            return K.layernorm_modulate(x, shift, scale, eps=self.norm_final.eps)
        return modulate(self.norm_final(x), shift, scale)

    def project(self, x, shift, scale):
        """x (B, N, C); shift, scale (B, 1, C)."""
        return self.linear(self.modulated(x, shift, scale))


class T2IFinalLayer(_ModulatedOutput):
    """PixArt's final layer: LN + modulate by a learned (2, C) table plus the timestep embedding, then linear."""

    def __init__(self, hidden_size, num_patch, out_channels, enable_layernorm_kernel=False):
        super().__init__(hidden_size, num_patch, out_channels, enable_layernorm_kernel)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x, t):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # (B, 1, C) each
        return self.project(x, shift, scale)


class FinalLayer(_ModulatedOutput):
    """DiT's final layer: LN + modulate by shift/scale computed from the condition c (B, C), then linear."""

    def __init__(self, hidden_size, num_patch, out_channels, enable_layernorm_kernel=False):
        super().__init__(hidden_size, num_patch, out_channels, enable_layernorm_kernel)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)  # (B, 1, C) each
        return self.project(x, shift, scale)


def modulate(x, shift, scale):
    """adaLN modulation as Open-Sora's t2i_modulate: x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


def get_1d_sincos_pos_embed(embed_dim, length, scale=1.0):
    """(length, embed_dim) float32: [sin, cos] of positions / scale (MAE's embedding, as Open-Sora uses it)."""
    return torch.from_numpy(_sincos(embed_dim, np.arange(length, dtype=np.float64) / scale)).float()


def get_2d_sincos_pos_embed(embed_dim, grid_size, scale=1.0, base_size=None):
    """(H*W, embed_dim) float32 for an (H, W) grid, rows first: the first half of the channels encodes the
    column (w) coordinate, the second half the row (h), as in MAE/PixArt. base_size rescales the grid so that
    a grid of another size spans the same range of positions (PixArt)."""
    h, w = grid_size
    grid_h = np.arange(h, dtype=np.float32) / scale
    grid_w = np.arange(w, dtype=np.float32) / scale
    if base_size is not None:
        grid_h *= base_size / h
        grid_w *= base_size / w
    coord_w, coord_h = np.meshgrid(grid_w, grid_h)  # each (h, w)
    emb = np.concatenate([_sincos(embed_dim // 2, coord_w), _sincos(embed_dim // 2, coord_h)], axis=1)
    return torch.from_numpy(emb).float()


def _sincos(embed_dim, positions):
    if embed_dim % 2:
        raise ValueError(f"sin-cos position embeddings need an even width, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def basic_init(model):
    """Open-Sora's initialisation: xavier-uniform linears with zero bias, the patch embed like a linear,
    N(0, 0.02) timestep and caption MLPs. The zero-initialised output projections are set by each model."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    w = model.x_embedder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
