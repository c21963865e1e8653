"""The speed suite's plumbing (bench/), checked on a CPU: the report writer, the byte formulas, the
summary merge, and the `--benchmark` switch. No speed is measured or asserted here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is a package at the repository root, not an installed one
    sys.path.insert(0, str(REPO))

from bench.bench_utils import Results, kernel_bytes  # noqa: E402
from bench.report import OPEN_SORA_COLUMN, main, render_markdown, write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def kernel_row(provider, ms=None, skipped=None, dtype="bf16", direction="fwd"):
    row = {"suite": "kernels", "bench": "layernorm_modulate", "direction": direction, "shape": [256, 4096, 1152],
           "video": "16x256", "T": 16, "dtype": dtype, "provider": provider, "ms": ms, "skipped": skipped}
    if ms is not None:
        gbps = 4.833 / (ms * 1e-3)
        row.update(gbps=gbps, frac_copy_bw=gbps / 3000.0)
    return row


def model_row(bench, provider, batch, ms=None, skipped=None, shape="16x256x256"):
    row = {"suite": "models", "bench": bench, "provider": provider, "shape": shape, "batch_size": batch,
           "ms": ms, "skipped": skipped}
    if ms is not None:
        samples = batch / (ms * 1e-3)
        row.update(samples_per_s=samples, tokens_per_s=samples * 4096, peak_mem_gb=61.25)
    return row


@pytest.fixture
def summary():
    return {
        "device": {"name": "Test GPU 80GB", "sm_count": 132, "memory_gb": 85.0, "driver": "580.1"},
        "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "commit": "abc123-dirty", "date": "2026-01-01T00:00:00+00:00",
        "copy_bandwidth_gbps": 3000.0, "clocks": {"sm_mhz": 1980, "mem_mhz": 2619, "sm_max_mhz": 1980, "mem_max_mhz": 2619},
        "timing": "do_bench median", "smoke": False,
        "rows": [
            {**kernel_row("sora", ms=1.75), "rel_err": 0.00312},
            kernel_row("torch", ms=4.5),
            kernel_row("torch.compile", ms=2.25),
            kernel_row("apex", skipped="apex not importable"),
            kernel_row("sora", skipped="OOM", dtype="fp32", direction="fwd+bwd"),
            model_row("stdit_train", "sora", 8, skipped="OOM at batch 8"),
            model_row("stdit_train", "sora", 4, ms=800.0),
            model_row("stdit_train", "eager", 4, ms=1000.0),
            {**model_row("temporal_branch", "sora", 8, ms=2.0), "direction": "fwd+bwd"},
            {**model_row("temporal_branch", "eager", 8, ms=3.0), "direction": "fwd+bwd"},
        ],
    }


def test_report_tables_hold_the_rows_values_and_skip_reasons(summary, tmp_path):
    written = write_report(summary, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text == render_markdown(summary)
    # kernel cells: ms, GB/s (4.833 GB / 1.75 ms = 2762 GB/s) and its share of 3000 GB/s (92%)
    assert "1.750 ms<br>2,762 GB/s (92%)" in text
    assert "4.500 ms<br>1,074 GB/s (36%)" in text
    assert "2.57x" in text  # sora vs torch: 4.5 / 1.75
    assert "1.29x" in text  # sora vs torch.compile: 2.25 / 1.75
    assert "| 3.1e-03 |" in text  # the sora row's error against the reference
    assert "skipped: apex not importable" in text
    assert "### layernorm_modulate, fwd+bwd" in text and "skipped: OOM" in text
    # model rows: samples/s 4 / 0.8 s = 5, tokens/s 5 * 4096, the OOM row, speedup, Open-Sora's figure as theirs
    assert "| 16x256x256 | sora | 4 | 800.0 | 5 | 20,480 | 61.2 | 1.25x vs eager |" in text
    assert "skipped: OOM at batch 8" in text
    assert OPEN_SORA_COLUMN in text and "7.00 samples/s, 28k tokens/s" in text
    assert "AdamW step is EXCLUDED" in text
    assert "| 16x256x256 | sora | 8 | 2.00 | 16,384,000 | 1.50x vs eager |" in text  # temporal branch
    assert "3000 GB/s" in text or "3,000 GB/s" in text
    assert "`abc123-dirty`" in text and "SM 1980 MHz" in text
    for name in ("kernels_gbps.png", "models_samples.png"):
        path = tmp_path / name
        assert path in written and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_report_cli_regenerates_from_summary_json(summary, tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    assert main([str(path)]) == 0
    assert (tmp_path / "README.md").read_text() == render_markdown(summary)


def test_smoke_report_says_gpu_rows_were_skipped(summary, tmp_path):
    write_report({**summary, "smoke": True, "clocks": None}, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "GPU rows skipped" in text and "not results" in text


def test_minimum_bytes():
    B, N, C, e = 2, 12, 8, 2
    tokens, rows = B * N * C * e, B * C * e  # 384 and 32 bytes
    assert kernel_bytes("layernorm_modulate", "fwd", B, N, C, e) == 2 * 384 + 2 * 32
    assert kernel_bytes("layernorm_modulate_temporal", "fwd+bwd", B, N, C, e) == 5 * tokens + 5 * rows
    assert kernel_bytes("gated_residual", "fwd", B, N, C, e) == 3 * tokens + rows
    assert kernel_bytes("gated_residual_temporal", "fwd+bwd", B, N, C, e) == 6 * tokens + 3 * rows
    assert kernel_bytes("to_temporal", "fwd", B, N, C, e) == 2 * tokens
    assert kernel_bytes("to_temporal", "fwd+bwd", B, N, C, e) == 4 * tokens
    with pytest.raises(ValueError, match="no byte formula"):
        kernel_bytes("softmax", "fwd", B, N, C, e)


def test_append_keeps_earlier_rows_and_replaces_remeasured_ones(summary, tmp_path):
    env = {key: value for key, value in summary.items() if key != "rows"}
    first = Results(tmp_path, append=True)
    first.env = env
    first.add(kernel_row("sora", ms=2.0))
    first.add(kernel_row("torch", ms=4.5))
    second = Results(tmp_path, append=True)
    second.env = {**env, "commit": "def456"}
    second.add(kernel_row("sora", ms=1.5))
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [(row["provider"], row["ms"]) for row in saved["rows"]] == [("torch", 4.5), ("sora", 1.5)]
    assert [run["commit"] for run in saved["runs"]] == ["abc123-dirty", "def456"]
    third = Results(tmp_path, append=False)  # without --bench-append a run starts a fresh summary
    third.env = env
    third.add(kernel_row("liger", skipped="liger_kernel not importable"))
    assert [row["provider"] for row in json.loads((tmp_path / "summary.json").read_text())["rows"]] == ["liger"]


def run_pytest(*args):
    return subprocess.run([sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_benchmark_switch():
    """Without --benchmark the suite is collected and skipped with a reason; with it (or --benchmark-only)
    the option is known and the tests are selected (collect-only: nothing runs, nothing is written)."""
    plain = run_pytest("-rs", "-k", "to_temporal")
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "skipped" in plain.stdout and "pytest bench/ --benchmark" in plain.stdout
    assert " passed" not in plain.stdout
    for flag in ("--benchmark", "--benchmark-only"):
        collected = run_pytest(flag, "--co", "-k", "to_temporal")
        assert collected.returncode == 0, collected.stdout + collected.stderr
        assert "test_kernel[to_temporal-fwd-" in collected.stdout
