"""DiT: the adaLN-Zero diffusion transformer (facebookresearch) over all T*S tokens of a video, as in Open-Sora v1.

The condition c = timestep embedding + class or caption embedding is one (B, C) row per sample; each block
turns it into shift/scale/gate for attention and MLP (adaLN-Zero). `condition="label_N"` embeds class ids with
N classes (plus the null class N for classifier-free guidance); `condition="text"` projects a pooled CLIP
embedding. With enable_layernorm_kernel the norms + modulation run in `K.layernorm_modulate` and the gated
residuals in `K.gated_residual`, both taking the per-sample (B, C) rows as they are.

Parameter and buffer names and shapes are Open-Sora v1's DiT, which with label conditioning and one frame are
facebookresearch's (the patch embed aside, which gains a time axis), so `DiT-XL-2-256x256.pt` loads.
"""

import re

import torch
from einops import rearrange, repeat
from torch import nn

import sora.kernels as K
from sora.models.base import ForwardParts, VideoTransformer
from sora.models.layers import (
    Attention,
    CaptionEmbedder,
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed3D,
    TimestepEmbedder,
    basic_init,
    modulate,
)
from sora.models.stdit import XL_2


class DiTBlock(nn.Module):
    """adaLN-Zero block. x is (B, T*S, C) frame-major, c the (B, C) condition.

    Attention runs within each of the T frames, "(B T) S C" (T=1: over all tokens, DiT), or with
    temporal=True across the T frames of each spatial position, "(B S) T C" (Latte's odd blocks).
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, enable_flashattn=False, enable_layernorm_kernel=False):
        super().__init__()
        self.enable_layernorm_kernel = enable_layernorm_kernel
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, enable_flashattn=enable_flashattn)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def probe(self, x, c):
        """The attention branch's input, norm1(x) modulated (the sampling cache's change indicator)."""
        shift_msa, scale_msa = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)[:2]
        return modulate(self.norm1(x), shift_msa, scale_msa)

    def forward(self, x, c, T=1, temporal=False):
        B, N, C = x.shape
        S = N // T
        if self.enable_layernorm_kernel:
            # c is per sample, so its six rows modulate every token of the sample whatever the attention layout:
            # no repeat per frame or position. Temporal attention reads and writes frame-major tokens
            # (K.temporal_attention); the MLP is per token. No layout copies at all.
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            x_m = K.layernorm_modulate(x, shift_msa, scale_msa, eps=1e-6)
            if temporal:
                x_a = self.attn(x_m, temporal=T)
            else:
                x_a = self.attn(x_m.view(B * T, S, C)).view(B, N, C)
            x = K.gated_residual(x, x_a, gate_msa)
            x_m = K.layernorm_modulate(x, shift_mlp, scale_mlp, eps=1e-6)
            return K.gated_residual(x, self.mlp(x_m), gate_mlp)

        # The plain PyTorch path: Open-Sora v1's DiT/Latte block op for op, on the attention layout with the
        # condition repeated per row of it.
        if temporal:
            x = rearrange(x, "B (T S) C -> (B S) T C", T=T)
            c = repeat(c, "B C -> (B S) C", S=S)
        else:
            x = rearrange(x, "B (T S) C -> (B T) S C", T=T)
            c = repeat(c, "B C -> (B T) C", T=T)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if temporal:  # made contiguous here rather than by the next block's rearrange: the same one copy
            return rearrange(x, "(B S) T C -> B (T S) C", S=S).contiguous()
        return rearrange(x, "(B T) S C -> B (T S) C", T=T)


class DiT(VideoTransformer):
    """Open-Sora v1's DiT. forward(x (B, C, T, H, W), timestep (B,), y, mask=None) -> (B, 2C or C, T, H, W) float32.

    y: condition="label_N": (B,) integer class ids in [0, N), or N (the null class, when class_dropout_prob > 0);
    condition="text": (B, 1, 1, caption_channels), a pooled CLIP embedding. mask is unused (neither condition
    has tokens to mask); it is accepted so that every model is called alike. model_max_length is the text
    encoder's token count (77 for CLIP); the pooled embedding is one token whatever it is.
    """

    spatial_buffer = "pos_embed_spatial"

    def __init__(
        self,
        input_size=(16, 32, 32),
        in_channels=4,
        patch_size=(1, 2, 2),
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        learn_sigma=True,
        condition="text",
        no_temporal_pos_emb=False,
        caption_channels=512,
        model_max_length=77,
        enable_flashattn=False,
        enable_layernorm_kernel=False,
        grad_checkpoint=False,
    ):
        super().__init__()
        label = re.fullmatch(r"label_([1-9][0-9]*)", str(condition))
        if condition != "text" and label is None:
            raise ValueError(f"condition must be 'text' or 'label_N' (N classes, e.g. 'label_1000'), got {condition!r}")
        if condition == "text" and not caption_channels:
            raise ValueError(f"condition='text' needs caption_channels (512 for CLIP), got {caption_channels!r}")
        self.init_geometry(input_size, patch_size, in_channels, in_channels * 2 if learn_sigma else in_channels,
                           hidden_size, num_heads)
        self.condition = condition
        self.num_classes = int(label.group(1)) if label else None
        self.caption_channels = caption_channels
        self.model_max_length = model_max_length
        self.no_temporal_pos_emb = no_temporal_pos_emb
        self.enable_layernorm_kernel = enable_layernorm_kernel
        self.grad_checkpoint = grad_checkpoint

        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        if label:
            self.y_embedder = LabelEmbedder(self.num_classes, hidden_size, class_dropout_prob)
        else:
            self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, token_num=1)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, enable_flashattn, enable_layernorm_kernel) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, self.patch_size[0] * self.patch_size[1] * self.patch_size[2],
                                      self.out_channels, enable_layernorm_kernel)
        self.initialize_weights()

    def initialize_weights(self):
        basic_init(self)
        if self.num_classes is None:
            nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
            nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        else:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, and the output at zero.
        zero = [block.adaLN_modulation[-1] for block in self.blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for linear in zero:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    # ---- forward ------------------------------------------------------------------------------------
    def check_inputs(self, x, timestep, y):
        self.check_video(x, timestep)
        B = x.shape[0]
        if self.num_classes is None:
            if tuple(y.shape) != (B, 1, 1, self.caption_channels):
                raise ValueError(
                    f"y must be a pooled caption embedding (B={B}, 1, 1, caption_channels={self.caption_channels}) "
                    f"for condition='text', got {tuple(y.shape)}"
                )
            return
        if tuple(y.shape) != (B,) or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(
                f"y must be (B={B},) integer class ids for condition={self.condition!r}, got {tuple(y.shape)} {y.dtype}"
            )
        limit = self.num_classes + self.y_embedder.has_null_class
        # A value check reads the tensor (a host sync, and a graph break under torch.compile): eager only.
        if not torch.compiler.is_compiling() and ((y < 0).any() or (y >= limit).any()):
            if self.y_embedder.has_null_class:
                null = f", or {self.num_classes} for the null class"
            else:
                null = " (no null class: the model was built with class_dropout_prob=0)"
            raise ValueError(f"class ids must be in [0, {self.num_classes}){null}; got {y.tolist()}")

    def embed_condition(self, y, dtype):
        """(B, C): class embedding, or the projected pooled caption (B, 1, 1, C) -> (B, C)."""
        if self.num_classes is not None:
            return self.y_embedder(y, self.training)
        return self.y_embedder(y.to(dtype), self.training).reshape(y.shape[0], -1)

    def forward(self, x, timestep, y, mask=None):
        return self.parts(x, timestep, y, mask).output()

    def parts(self, x, timestep, y, mask=None):
        """forward's inputs -> its ForwardParts (sora.models.base)."""
        self.check_inputs(x, timestep, y)
        dtype = self.x_embedder.proj.weight.dtype
        grid = self.token_grid(x.shape[2:])
        x = self.x_embedder(x.to(dtype))  # (B, N, C)
        x, tpe = self.add_pos_embed(x, grid)
        c = self.t_embedder(timestep, dtype=x.dtype) + self.embed_condition(y, x.dtype)  # (B, C)

        def final(h):
            return self.unpatchify(self.final_layer(h, c), grid).float()  # (B, N, pt*ph*pw*C_out) unpatchified

        return ForwardParts(x, lambda h, start, stop: self.run_blocks(h, c, grid[0], tpe, start, stop), final,
                            lambda h: self.blocks[0].probe(h, c), len(self.blocks))

    def run_blocks(self, x, c, T, tpe, start=0, stop=None):
        """blocks[start:stop] on x. Full attention: the whole sample is one "frame" of N tokens."""
        for block in self.blocks[start:stop]:
            x = self.run_block(block, x, c)
        return x


# DiT-XL/2 is STDiT's XL/2 (28 blocks of width 1152, 16 heads, 2x2 patches); x2 also patches 2 frames.
XL_2x2 = {**XL_2, "patch_size": (2, 2, 2)}
