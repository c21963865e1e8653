"""nn.Module wrappers over the kernels."""

import torch
from torch import nn

from sora.kernels.norm import layernorm_modulate


class LayerNorm(nn.Module):
    """Drop-in for torch.nn.LayerNorm / apex FusedLayerNorm over the last dim, on the fused kernel.

    Parameters are named `weight` and `bias` as in torch.nn.LayerNorm, so state dicts load unchanged.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6, elementwise_affine: bool = True, device=None, dtype=None):
        super().__init__()
        if isinstance(normalized_shape, (tuple, list)):
            if len(normalized_shape) != 1:
                raise ValueError(f"LayerNorm normalizes the last dim only, got normalized_shape={normalized_shape}")
            normalized_shape = normalized_shape[0]
        self.normalized_shape = (int(normalized_shape),)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(normalized_shape, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = self.normalized_shape[0]
        if x.shape[-1] != C:
            raise ValueError(f"LayerNorm({C}) got input of shape {tuple(x.shape)}: last dim must be {C}")
        y = layernorm_modulate(x.reshape(1, -1, C), weight=self.weight, bias=self.bias, eps=self.eps)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
