"""Latte: DiT blocks alternating spatial and temporal attention, as Open-Sora v1 runs Vchitect's Latte.

Even blocks attend within each frame ("(B T) S C", a free view of the frame-major "B (T S) C"), odd blocks
across the frames of each spatial position ("(B S) T C"); the condition t + y modulates every token of a
sample (Open-Sora repeats it per frame or per position to match the layout). The temporal position embedding
is added to the tokens before block 1, the first temporal block.

With enable_layernorm_kernel the tokens stay frame-major throughout: since the condition is one row per
sample, LayerNorm + modulation and the gated residuals need no layout, and a temporal block's attention runs
on the frame-major qkv (`K.temporal_attention`); the MLP is per token. See DiTBlock.

Parameter names and shapes are Open-Sora's (those of DiT), so Latte's `Latte-XL-2-256x256-ucf101.pt` loads
(weights under "ema", 2-D patch embed lifted, `pos_embed` and `temp_embed` recomputed).
"""

from sora.models.dit import DiT


class Latte(DiT):
    """Same constructor and forward as DiT. no_temporal_pos_emb leaves out the temporal embedding (Open-Sora's
    Latte ignores the flag and always adds it; the default keeps that behaviour)."""

    temporal_in_blocks = True  # added to the tokens before block 1, the first temporal block

    def run_blocks(self, x, c, T, tpe, start=0, stop=None):
        """blocks[start:stop] on x; the temporal embedding tpe goes on the tokens before block 1."""
        B, N, C = x.shape
        for i in range(start, len(self.blocks) if stop is None else stop):
            if i == 1 and tpe is not None:
                # Open-Sora adds it in the "(B S) T C" layout; the same sum, frame-major.
                x = (x.view(B, T, -1, C) + tpe[:, :, None]).view(B, N, C)
            x = self.run_block(self.blocks[i], x, c, T, i % 2 == 1)
        return x
