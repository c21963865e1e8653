"""The speed suite's plumbing (bench/), checked on a CPU: the report writer, the byte formulas, the
summary merge, and the `--benchmark` switch. No speed is measured or asserted here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.bench_utils import Results, row_key
from bench.cases import ATTENTION_SHAPES, BENCHES, all_to_all_volume, cases, kernel_bytes
from bench.report import OPEN_SORA_COLUMN, main, render_markdown, write_report

REPO = Path(__file__).resolve().parents[1]

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
        "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "commit": "abc123-dirty",
        "date": "2026-01-01T00:00:00+00:00", "copy_bandwidth_gbps": 3000.0,
        "clocks": {"sm_mhz": 1980, "mem_mhz": 2619, "sm_max_mhz": 1980, "mem_max_mhz": 2619},
        "timing": "do_bench median", "smoke": False,
        "rows": [
            {**kernel_row("sora", ms=1.75), "rel_err": 0.00312},
            kernel_row("torch", ms=4.5),
            kernel_row("torch.compile", ms=2.25),
            kernel_row("apex", skipped="apex not importable"),
            kernel_row("sora", skipped="OOM", dtype="fp32", direction="fwd+bwd"),
            {**model_row("temporal_branch", "sora", 8, skipped="OOM at batch 8"), "direction": "fwd+bwd"},
            {**model_row("temporal_branch", "sora", 8, ms=2.0), "direction": "fwd+bwd"},
            {**model_row("temporal_branch", "eager", 8, ms=3.0), "direction": "fwd+bwd"},
            {**model_row("temporal_branch", "open-sora", 8, ms=5.0), "direction": "fwd+bwd"},
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
    # temporal branch rows: the OOM row, ms, tokens/s, the speedup; its title and target from bench/cases.py
    assert "| 16x256x256 | sora | 8 | skipped: OOM at batch 8 | - | - |" in text
    assert "| 16x256x256 | sora | 8 | 2.00 | 16,384,000 | 1.50x vs eager, 2.50x vs open-sora |" in text
    assert f"### {BENCHES['temporal_branch'].title} (`temporal_branch`)" in text
    assert f"**Target:** {BENCHES['temporal_branch'].target}" in text
    assert f"**Target, layernorm_modulate:** {BENCHES['layernorm_modulate'].target}" in text
    assert "3000 GB/s" in text or "3,000 GB/s" in text
    assert "`abc123-dirty`" in text and "SM 1980 MHz" in text
    for name in ("kernels_gbps.png", "models_samples.png"):
        path = tmp_path / name
        assert path in written and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def pipeline_summary(summary):
    """The run of `summary` with one row of each communication, pipeline and training bench instead."""

    def timed(row, ms, **rates):
        return {**row, "ms": ms, "skipped": None, **rates}

    def train(bench, model, shape, encoders, provider, batch, ms=None, skipped=None, **extra):
        row = {"suite": "train", "bench": bench, "model": model, "provider": provider, "shape": shape,
               "batch_size": batch, "encoders": encoders, "optimizer_step": True, "ms": ms, "skipped": skipped,
               "dtype": "bf16 autocast, fp32 weights", **extra}
        if ms is not None:
            samples = batch / (ms * 1e-3)
            row.update(samples_per_s=samples, tokens_per_s=samples * 4096, peak_mem_gb=70.0)
        return row

    pack = {"suite": "comm", "bench": "all_to_all_pack", "direction": "pack", "exchange": "qkv", "video": "64x512",
            "sp": 2, "shape": [196608, 2, 576], "batch_size": 2, "dtype": "bf16", "bytes": 452984832}
    volume = {"suite": "comm", "bench": "all_to_all_volume", "provider": "computed", "video": "64x512", "sp": 2,
              "batch_size": 1, "depth": 28, "link_gbps_assumed": 450.0, "computed": True, "ms": None, "skipped": None,
              **all_to_all_volume(1024, 64, 1152, 2, elem=2, depth=28)}
    volume.update(step_comm_ms=volume["step_bytes"] / 450e6, step_comm_ms_gc=volume["step_bytes_gc"] / 450e6)
    sampling = {"suite": "pipeline", "bench": "sampling_step", "model": "STDiT-XL/2", "shape": "16x256x256",
                "batch_size": 2, "model_batch": 4, "dtype": "fp16", "steps_per_call": 5}
    e2e = {"suite": "pipeline", "bench": "sample_e2e", "model": "STDiT-XL/2", "shape": "16x256x256", "batch_size": 1,
           "dtype": "fp16", "steps": 100}
    rows = [
        timed({**pack, "provider": "sora"}, 0.2, gbps=2264.9, frac_copy_bw=0.755, exact=True),
        timed({**pack, "provider": "torch"}, 0.4, gbps=1132.5, frac_copy_bw=0.3775),
        {**pack, "direction": "unpack", "shape": [2, 65536, 1728], "provider": "sora", "ms": None, "skipped": "OOM"},
        volume,
        timed({**sampling, "provider": "sora"}, 50.0),
        timed({**sampling, "provider": "eager"}, 60.0),
        timed({"suite": "pipeline", "bench": "t5_encode", "model": "T5-v1.1-XXL encoder", "provider": "transformers",
               "shape": "120 tokens", "batch_size": 32, "dtype": "bf16"}, 64.0, prompts_per_s=500.0,
              tokens_per_s=60000.0, peak_mem_gb=12.5),
        {"suite": "pipeline", "bench": "vae_decode", "model": "SD VAE", "provider": "diffusers", "shape": "512x512",
         "micro_batch_size": 64, "batch_size": 64, "dtype": "fp16", "ms": None, "skipped": "OOM"},
        timed({**e2e, "provider": "sora"}, 4000.0, s_per_video=4.0),
        timed({**e2e, "provider": "eager"}, 5000.0, s_per_video=5.0),
        train("train_step_full", "STDiT-XL/2", "16x256x256", "T5+VAE", "sora", 8, skipped="OOM at batch 8"),
        train("train_step_full", "STDiT-XL/2", "16x256x256", "T5+VAE", "sora", 4, ms=400.0),
        train("train_step_full", "STDiT-XL/2", "16x256x256", "T5+VAE", "eager", 4, ms=500.0),
        train("train_step_full", "PixArt-XL/2", "64x512x512", "none", "sora", 1, grad_checkpoint=True,
              skipped="sora.train not importable here (No module named 'av')"),
        train("dit_image_train", "DiT-XL/2", "1x256x256", "none", "sora", 128, ms=500.0),
        train("latte_train", "Latte-XL/2", "16x256x256", "none", "eager", 4, ms=1000.0),
    ]
    return {**summary, "rows": rows}


def test_report_renders_communication_pipeline_and_training_tables(summary, tmp_path):
    text = render_markdown(pipeline_summary(summary))
    # all_to_all_pack: the kernel cell (2265 GB/s is 76% of 3000), the ratio to torch, the exactness check, an OOM
    assert "| 64x512 | 2 | qkv | pack | 196608 x 2 x 576 | 2 | 226 | 0.200 ms<br>2,265 GB/s (76%) |" in text
    assert "| 2.00x | yes |" in text and "skipped: OOM" in text and "**Target:** sora >= 80% of copy bandwidth" in text
    # the computed volume: 151 MB per layer, 8.46 GB per step (12.7 with GC), at the assumed 450 GB/s
    assert "computed, not timed" in text and "assumed" in text
    assert "| 64x512 | 2 | 32,768 | 113 | 37.7 | 151 | 8.46 | 12.7 | 18.8 | 28.2 |" in text
    # sampling: ms per step and the speedup; T5 throughput; the VAE's OOM; end to end in seconds per video
    assert "| 16x256x256 | sora | 2 | 4 | fp16 | 50.0 | 5 | 1.20x vs eager |" in text
    assert "| T5-v1.1-XXL encoder | 120 tokens | 32 | bf16 | 64.0 | 500 | 60,000 | 12.5 |" in text
    assert "| 512x512 | 64 | 64 | fp16 | skipped: OOM | - | - |" in text
    assert "| 16x256x256 | sora | 100 | fp16 | 4.00 | - | 1.25x vs eager |" in text
    # training: optimizer step included, samples/s 4 / 0.4 s = 10, 1.25x eager, 10 / 7.00 = 1.43x Open-Sora's
    assert "AdamW step (lr 2e-5, weight decay 0) and the fp32 EMA update are all INCLUDED" in text
    assert ("| STDiT-XL/2 | 16x256x256 | T5+VAE | sora | 4 | 400.0 | 10 | 40,960 | 70 | 1.25x vs eager | 1.43x | "
            "7.00 samples/s, 28k tokens/s; encoders: baseline 6.16 / with faster T5 7.00 samples/s |") in text
    assert "skipped: OOM at batch 8" in text
    assert "| PixArt-XL/2 | 64x512x512 (GC) | none | sora | 1 | skipped: sora.train not importable here" in text
    assert "0.08 samples/s (GC), 5k tokens/s" in text
    # images: 128 / 0.5 s = 256 img/s, 1.46x Open-Sora's 175, their three figures beside
    assert "| DiT-XL/2 | 1x256x256 | sora | 128 | 500.0 | 256 |" in text
    assert "| 1.46x | DiT 100 / OpenDiT 175 / Open-Sora 175 img/s (26k / 45k / 45k tokens/s) |" in text
    assert "| Latte-XL/2 | 16x256x256 | eager | 4 | 1000.0 | 4 |" in text
    assert text.count(OPEN_SORA_COLUMN) == 2


def test_report_renders_optimizer_step_rows(summary):
    """The optimizer_step rows: 52 bytes x 724M parameters in 20 ms is 1,882 GB/s, 63% of
    the 3000 GB/s copy bandwidth, short of the 70% target; a skipped row keeps its reason."""
    row = {"suite": "optimizer", "bench": "optimizer_step", "model": "STDiT-XL/2", "provider": "sora",
           "shape": "parameters", "dtype": "fp32", "optimizer": "AdamW fused", "ms": 20.0, "skipped": None,
           "params": 724_000_000, "bytes_per_param": 52, "gbps": 52 * 724e6 / 20e-3 / 1e9}
    row["frac_copy_bw"] = row["gbps"] / 3000.0
    skipped = {**row, "model": "STDiT (tiny)", "ms": None, "gbps": None, "frac_copy_bw": None,
               "skipped": "sora.train not importable here (No module named 'av')"}
    text = render_markdown({**summary, "rows": [row, skipped]})
    assert "### Optimizer step (`optimizer_step`)" in text and "**Target:** at least 70% of the copy bandwidth" in text
    assert "| STDiT-XL/2 | AdamW fused | fp32 | 724 | 52 | 20.00 | 1,882 | 63% | not met |" in text
    assert "| STDiT (tiny) | AdamW fused | fp32 | skipped: sora.train not importable here" in text
    met = render_markdown({**summary, "rows": [{**row, "ms": 15.0, "gbps": 2509.9, "frac_copy_bw": 0.837}]})
    assert "| 15.00 | 2,510 | 84% | met |" in met


def test_report_cli_regenerates_from_summary_json(summary, tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    assert main([str(path)]) == 0
    assert (tmp_path / "README.md").read_text() == render_markdown(summary)


def test_report_cli_help_and_bad_input():
    """`--help` prints the usage; a missing argument or an unreadable file is one line and exit code 2."""
    def report(*args):
        return subprocess.run([sys.executable, "bench/report.py", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=60)

    shown = report("--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: python bench/report.py") and not shown.stderr
    for args, message in (((), "the following arguments are required: summary"),
                          (("missing.json",), "cannot read missing.json as a bench summary.json")):
        failed = report(*args)
        assert failed.returncode == 2 and message in failed.stderr and failed.stderr.count("\n") == 1
        assert "Traceback" not in failed.stderr


@pytest.mark.parametrize("args, message", [
    (["--video", "nope"], "argument --video: invalid choice: 'nope'"),
    (["--batch-size", "0"], "--batch-size and --rows must be at least 1, got 0 and 25"),
])
def test_profile_step_bad_input_is_one_line_and_exit_code_2(args, message, capsys):
    from bench.profile_step import main as profile_step

    with pytest.raises(SystemExit) as exit_:
        profile_step(args)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.startswith(f"python bench/profile_step.py: {message}")
    assert error.count("\n") == 1


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
    assert kernel_bytes("qk_norm", "fwd", B, N, C, e) == 4 * tokens  # q, k read, q', k' written; v is a view
    assert kernel_bytes("qk_norm", "fwd+bwd", B, N, C, e) == 12 * tokens
    with pytest.raises(ValueError, match="no byte formula"):
        kernel_bytes("softmax", "fwd", B, N, C, e)


def test_temporal_attention_minimum_bytes():
    """bench/NOTES.md: forward reads qkv (3 tokens of C) and writes out (1); backward reads qkv and dout, writes
    d(qkv) (7). At STDiT-XL/2 16x256 (B=64, 16 frames of 256 positions, C=1152) in bf16: 2.416 GB forward,
    6.644 GB forward and backward, the floors' bytes in the notes."""
    tokens = 2 * 12 * 8 * 2
    assert kernel_bytes("temporal_attention", "fwd", 2, 12, 8, 2) == 4 * tokens
    assert kernel_bytes("temporal_attention", "fwd+bwd", 2, 12, 8, 2) == 11 * tokens
    for direction, gigabytes in (("fwd", 2.416), ("fwd+bwd", 6.644)):
        assert [round(kernel_bytes("temporal_attention", direction, s.B, s.N, s.C, 2) / 1e9, 3)
                for s, _ in ATTENTION_SHAPES[True]] == [gigabytes] * 3


def test_all_to_all_volume():
    # S=4 tokens per frame, T=8 frames over sp=2 ranks: 16 tokens per rank; C=16, 2 bytes; half leaves the rank
    volume = all_to_all_volume(S=4, T=8, C=16, sp=2, elem=2, depth=3)
    assert volume["tokens_per_rank"] == 16
    assert volume["qkv_send_bytes"] == 3 * 16 * 16 * 2 // 2 and volume["out_send_bytes"] == 16 * 16 * 2 // 2
    assert volume["layer_fwd_bytes"] == volume["layer_bwd_bytes"] == 1024
    assert volume["step_bytes"] == 3 * 2 * 1024 and volume["step_bytes_gc"] == 3 * 3 * 1024
    assert all_to_all_volume(S=4, T=8, C=16, sp=1, elem=2, depth=3)["step_bytes"] == 0  # nothing to send


def test_row_key_tells_apart_what_new_benches_vary():
    row = {"suite": "comm", "bench": "all_to_all_pack", "shape": [8, 2, 4], "provider": "sora", "sp": 2,
           "exchange": "qkv"}
    assert row_key(row) != row_key({**row, "sp": 4}) and row_key(row) != row_key({**row, "exchange": "out"})
    train = {"suite": "train", "bench": "train_step_full", "shape": "16x256x256", "provider": "sora", "batch_size": 8}
    assert row_key({**train, "encoders": "T5+VAE"}) != row_key({**train, "encoders": "none"})
    assert row_key({**train, "model": "STDiT-XL/2"}) != row_key({**train, "model": "PixArt-XL/2"})


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
        collected = run_pytest(flag, "--co", "-k", "to_temporal or train_step_full or all_to_all_volume")
        assert collected.returncode == 0, collected.stdout + collected.stderr
        assert "test_bench[to_temporal-fwd-" in collected.stdout
        assert "test_bench[train_step_full-STDiT-" in collected.stdout
        assert "test_bench[all_to_all_volume-" in collected.stdout


def test_the_table_of_cases_is_whole():
    """Every case has a unique test id, a bench in BENCHES and a measuring function; every bench has cases on a
    GPU and in the CPU smoke set."""
    from bench.measure import MEASURES

    for cuda in (True, False):
        table = cases(cuda)
        ids = [str(case) for case in table]
        assert len(ids) == len(set(ids))
        assert {case.bench for case in table} == set(BENCHES) == set(MEASURES)
        assert all(case.batches for case in table)
