"""Model checkpoints by path or by Hugging Face hub name, and files that are not checkpoints: what a user
passing `--ckpt-path` or `from_pretrained` gets."""

import os
import subprocess
import sys

import pytest
import torch

from sora.models import build_model
from sora.models.checkpoint import RECOMPUTED, read_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(type="STDiT", input_size=(1, 8, 8), hidden_size=64, depth=2, num_heads=4, caption_channels=32,
            model_max_length=6)
HUB_NAME = "hf://hpcai-tech/Open-Sora/OpenSora-v1-HQ-16x256x256.pth"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache, state):
    """huggingface_hub's cache layout for one file of hpcai-tech/Open-Sora at `main`, as a download leaves it:
    models--ORG--NAME/{refs/main, snapshots/COMMIT/FILE}."""
    repo = cache / "models--hpcai-tech--Open-Sora"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    torch.save(state, repo / "snapshots" / COMMIT / "OpenSora-v1-HQ-16x256x256.pth")


def run_offline(cache, code):
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_hub_file_loads_offline_from_the_cache(tmp_path):
    torch.manual_seed(0)
    source = build_model(dict(TINY))
    for tensor in source.state_dict().values():
        tensor.normal_()
    fake_hub_cache(tmp_path / "hub", {"ema": source.state_dict()})
    # position embeddings are recomputed for the configured size, never loaded
    expected = {name: tensor for name, tensor in source.state_dict().items() if name not in RECOMPUTED}
    torch.save(expected, tmp_path / "expected.pt")
    code = (
        "import torch\n"
        "from sora.models import build_model\n"
        f"model = build_model(dict({TINY!r}, from_pretrained={HUB_NAME!r}))\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "same = [name for name, tensor in expected.items() if torch.equal(tensor, model.state_dict()[name])]\n"
        "print(len(same), len(expected))\n"
    )
    result = run_offline(tmp_path / "hub", code)
    assert result.returncode == 0, result.stderr
    same, total = result.stdout.split()
    assert same == total


def test_hub_file_missing_from_the_cache_offline_is_one_line(tmp_path):
    (tmp_path / "hub").mkdir()
    code = (
        "from sora.models.checkpoint import RECOMPUTED, read_state_dict\n"
        "try:\n"
        f"    read_state_dict({HUB_NAME!r})\n"
        "except FileNotFoundError as error:\n"
        "    print(error)\n"
    )
    result = run_offline(tmp_path / "hub", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"checkpoint {HUB_NAME!r}: offline (HF_HUB_OFFLINE is set) and not in the Hugging Face "
                             "cache; download it where the hub can be reached, or pass a local file\n")


def test_no_network_is_said_once_in_one_line_without_retries(tmp_path, capsys, monkeypatch):
    """Without HF_HUB_OFFLINE, a hub that cannot be reached (here: nothing listens on its port) is found once,
    up front: one line and exit code 2, not huggingface_hub's five retries (about 25 s) printed twice."""
    import time

    from sora.launch import main
    from sora.sample import run

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main(run, "sample", ["configs/tiny/sample.py", "--save-dir", str(tmp_path), "--ckpt-path", HUB_NAME])
    assert exit_info.value.code == 2 and time.monotonic() - start < 10
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"error: model.from_pretrained {HUB_NAME!r}: offline (no connection to 127.0.0.1: Connection refused) and "
        "not in the Hugging Face cache"]
    assert "Retrying" not in captured.out


@pytest.mark.parametrize("name", ["hf://hpcai-tech", "hf://Open-Sora.pth", "hf://a/b@/c.pth"])
def test_malformed_hub_name(name):
    with pytest.raises(ValueError, match="is not of the form hf://ORG/REPO/FILE"):
        read_state_dict(name)


def test_garbage_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError) as error:
        read_state_dict(path)
    assert str(error.value) == (
        f"cannot read checkpoint {str(path)!r}: the file is not a checkpoint sora can read; expected a PyTorch state "
        "dict saved with torch.save (.pt/.pth, possibly under 'ema', 'model', 'state_dict' or 'module'), a "
        ".safetensors file, or a training checkpoint folder with ema.pt"
    )
    text = tmp_path / "notes.pth"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match="is not a checkpoint sora can read"):
        read_state_dict(text)
    safetensors = tmp_path / "model.safetensors"
    safetensors.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="not a .safetensors file sora can read"):
        read_state_dict(safetensors)


def test_pickled_code_is_refused_by_name(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"weight": torch.ones(2), "hook": os.path.join}, path)
    with pytest.raises(ValueError, match=r"it holds a pickled posixpath.join object, which sora does not load"):
        read_state_dict(path)


def test_sample_cli_says_garbage_checkpoint_in_one_line(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"\x00\xffnot a checkpoint" * 64)
    result = subprocess.run(
        [sys.executable, "-m", "sora.sample", "configs/tiny/sample.py", "--ckpt-path", str(path),
         "--save-dir", str(tmp_path / "samples")],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot read checkpoint {str(path)!r}: the file is not a checkpoint sora can read; expected a PyTorch "
        "state dict saved with torch.save (.pt/.pth, possibly under 'ema', 'model', 'state_dict' or 'module'), a "
        ".safetensors file, or a training checkpoint folder with ema.pt"
    )
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
    assert not (tmp_path / "samples").exists() or not os.listdir(tmp_path / "samples")
