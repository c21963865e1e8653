"""PixArt: STDiT's block without temporal attention, attending over all T*S tokens of a sample.

This is Open-Sora v1's PixArt, the "DiT (T5 conditioning like PixArt)" row of its acceleration table: the
full-attention baseline. With one frame it is PixArt-alpha, whose released checkpoints load (weights under
"state_dict", a 2-D patch embed that gains a time axis; see sora.models.checkpoint).
"""

import math

from sora.models.layers import get_2d_sincos_pos_embed
from sora.models.stdit import STDiT


class PixArt(STDiT):
    """Same constructor and forward as STDiT (sequence parallelism aside); parameter names are STDiT's
    minus `attn_temp`. Its blocks (STDiTBlock with temporal=False) attend over all T*S tokens of a sample."""

    temporal_attention = False
    temporal_in_blocks = False  # the temporal embedding goes on every token

    def spatial_pos_embed(self, grid_hw):
        # PixArt spans any grid over base_size positions, base_size = floor(sqrt(S)) of the configured size.
        _, h, w = self.token_grid(self.input_size)
        base_size = math.isqrt(h * w)
        return get_2d_sincos_pos_embed(self.hidden_size, grid_hw, scale=self.space_scale, base_size=base_size)[None]
