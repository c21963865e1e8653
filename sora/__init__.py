"""sora: fused Triton kernels and a lean STDiT for video diffusion transformers."""

__version__ = "0.1.0"
