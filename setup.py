from setuptools import find_packages, setup

setup(
    name="sora-kernels",
    version="0.1.0",
    description="Fused Triton kernels, a lean STDiT and Open-Sora v1 style sampling/training for video diffusion transformers.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sora", "sora.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "einops",
        "numpy",
        "nvidia-ml-py",
        # sampling and training: encoders, the VAE, video files, checkpoints, logs
        "transformers>=4.40",
        "diffusers>=0.29",
        "safetensors",
        "av",
        "pillow",
        "tqdm",
        "tensorboard",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "matplotlib"],
    },
)
