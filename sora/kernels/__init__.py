"""Fused Triton kernels for video diffusion transformers.

Tokens are (B, N, C) with N = T*S frame-major ("B (T S) C"), as in Open-Sora. CUDA tensors run the Triton
kernels; CPU tensors run them under TRITON_INTERPRET=1, else the eager references. Every single-device op
is a torch.library custom op, so it stays inside one graph under torch.compile(fullgraph=True); all_to_all
(sequence parallelism) is a collective and runs eagerly.
"""

from sora.kernels.attention import temporal_attention
from sora.kernels.qknorm import qk_norm
from sora.kernels.comm import all_to_all
from sora.kernels.residual import gated_residual
from sora.kernels.norm import layernorm_modulate
from sora.kernels.layout import from_temporal, to_temporal
from sora.kernels.modules import LayerNorm
from sora.kernels.diffusers_patch import patch

__all__ = ["layernorm_modulate", "gated_residual", "to_temporal", "from_temporal", "temporal_attention", "qk_norm",
           "all_to_all", "LayerNorm", "patch"]
