"""sora: fused Triton kernels and a lean STDiT for video diffusion transformers.

`__version__` is the one place the version is set: pyproject.toml reads it when the package is built."""

__version__ = "0.1.0"
