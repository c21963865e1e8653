"""What `pip install sora-kernels` promises: the kernel library alone needs torch, einops and numpy (the video
stack comes with the extras), the version lives in one place, and the console commands exist."""

import os
import subprocess
import sys
import textwrap

import pytest

import sora

tomllib = pytest.importorskip("tomllib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the [sample]/[train] extras bring; a kernels-only install has none of it. (tqdm is left out of the import
# check: torch's own modules import it when it is installed.)
VIDEO_STACK = ("transformers", "diffusers", "av", "PIL", "huggingface_hub", "safetensors", "tensorboard")
EXTRAS_ONLY = VIDEO_STACK + ("tqdm",)


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        return tomllib.load(file)


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT, **env), timeout=300)


def test_importing_the_kernels_imports_no_video_stack():
    result = run_python(f"""
        import sys
        import sora.kernels
        print(sorted({{name.split(".")[0] for name in sys.modules}} & set({VIDEO_STACK!r})))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_kernels_work_without_the_extras_or_triton():
    """A core install on a CPU machine: the extras and triton cannot be imported; the ops run their eager
    references and give LN(x) * (1 + scale) + shift."""
    blocked = EXTRAS_ONLY + ("triton",)
    result = run_python(f"""
        import importlib.abc, sys

        class Missing(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}")

        sys.meta_path.insert(0, Missing())
        import torch
        import sora.kernels as K

        torch.manual_seed(0)
        x, shift, scale = torch.randn(2, 12, 40), torch.randn(2, 1, 40), torch.randn(2, 1, 40)
        out = K.layernorm_modulate(x, shift, scale)
        expected = torch.nn.functional.layer_norm(x, (40,), eps=1e-6) * (1 + scale) + shift
        print(float((out - expected).abs().max()))
    """, TRITON_INTERPRET="0")
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 1e-5


def test_core_dependencies_and_extras():
    project = pyproject()["project"]
    assert sorted(project["dependencies"]) == ["einops", "numpy", "torch>=2.4"]
    extras = project["optional-dependencies"]
    assert set(extras) == {"sample", "train", "bench", "dev", "all"}
    names = {extra: {requirement.split(";")[0].split(">")[0].split("=")[0].split("[")[0] for requirement in reqs}
             for extra, reqs in extras.items()}
    assert {"transformers", "diffusers", "huggingface_hub", "av", "safetensors", "pillow", "tqdm"} <= names["sample"]
    assert "transformers>=4.56" in extras["sample"] and "diffusers>=0.29" in extras["sample"]
    assert "sora-kernels[sample]" in extras["train"] and "tensorboard" in names["train"]
    assert {"pytest", "pytest-benchmark", "nvidia-ml-py", "matplotlib"} <= names["bench"]
    assert extras["all"] == ["sora-kernels[train,bench]"]
    assert "sora-kernels[all]" in extras["dev"] and {"pytest-timeout", "triton"} <= names["dev"]


def test_version_is_read_from_the_package(tmp_path):
    """setuptools builds the metadata with sora.__version__ and the declared requirements (no other packaging
    file: setup.py is gone)."""
    assert not os.path.exists(os.path.join(ROOT, "setup.py"))
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sora.__version__"}
    result = run_python(f"""
        from setuptools import build_meta
        print(build_meta.prepare_metadata_for_build_wheel({str(tmp_path)!r}))
    """)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / result.stdout.strip().splitlines()[-1] / "METADATA", encoding="utf-8") as file:
        metadata = file.read().splitlines()
    assert f"Version: {sora.__version__}" in metadata
    assert "Name: sora-kernels" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    required = [line.split(": ", 1)[1] for line in metadata if line.startswith("Requires-Dist: ")]
    assert sorted(r for r in required if "extra ==" not in r) == ["einops", "numpy", "torch>=2.4"]
    assert 'transformers>=4.56; extra == "sample"' in required


@pytest.mark.parametrize("command, mode", [("sample", "sample"), ("train", "train"), ("preprocess", "preprocess")])
def test_console_commands_are_the_module_entry_points(command, mode):
    scripts = pyproject()["project"]["scripts"]
    assert scripts[f"sora-{command}"] == f"sora.cli:{command}"
    result = run_python(f"""
        import sys
        from sora import cli
        sys.argv = ["sora-{command}", "no-such-config.py"]
        cli.{command}()
    """)
    module = run_python(f"""
        import runpy, sys
        sys.argv = ["sora.{mode}", "no-such-config.py"]
        runpy.run_module("sora.{mode}", run_name="__main__")
    """)
    assert result.returncode == module.returncode == 2
    assert result.stderr == module.stderr and "no-such-config.py" in result.stderr
    assert result.stderr.count("\n") == 1
