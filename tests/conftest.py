"""The suite's device, and nothing fetched from a hub.

`--device cpu` (the default): Triton kernels run under the interpreter (TRITON_INTERPRET=1) on CPU tensors.
`--device cuda`: the same tests on the GPU, compiled, with the same tolerances: tensors a test creates without
naming a device land there (torch's default device). TRITON_INTERPRET must be decided before triton decorates a
kernel, i.e. before the first test module imports sora.kernels: pytest_configure runs before collection.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--device", choices=("cpu", "cuda"), default="cpu",
                     help="run the tests' tensors on the CPU (Triton interpreted, the default) or the GPU (compiled)")


def pytest_configure(config):
    if config.getoption("--device") == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        return
    import torch

    if not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError("--device cuda: unset TRITON_INTERPRET=1, it would interpret the kernels on the GPU")
    torch.set_default_device("cuda")
