"""bench/gpu_check.py's promises, on a CPU and fast: the deadline cuts a section and everything done is still
written, a mismatch is named and makes the exit code non-zero, bad arguments exit 2 with one line.
(CI runs the whole script with --tiny; these tests run a section or two of it.)"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is a package at the repository root, not an installed one
    sys.path.insert(0, str(REPO))

import sora.kernels as K  # noqa: E402
from sora.kernels import layout  # noqa: E402
from bench import gpu_check  # noqa: E402
from bench.gpu_check import OpCase, Section  # noqa: E402


def tiny_args(out, deadline=60.0):
    return gpu_check.parse_args(["--tiny", "--out", str(out), "--deadline", str(deadline)])


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


def row(label):
    return {"suite": "models", "bench": "temporal_branch", "provider": "sora", "shape": label, "batch_size": 1,
            "ms": 1.0, "samples_per_s": 1000.0, "tokens_per_s": 1000.0}


def test_deadline_cuts_a_section_and_the_output_is_still_written(tmp_path):
    def stuck_in_one_call(check):  # the alarm must interrupt a call that never returns to check the clock
        check.add_row(row("before the long call"))
        time.sleep(30)
        check.add_row(row("never reached"))

    def never_started(check):
        check.add_row(row("never reached either"))

    sections = [Section("stuck", stuck_in_one_call, required=True), Section("later", never_started, required=False)]
    started = time.monotonic()
    code = gpu_check.run(tiny_args(tmp_path, deadline=1.5), sections)
    assert time.monotonic() - started < 10
    assert code == 3  # a required section was cut; nothing failed
    summary = summary_of(tmp_path)
    outcome = summary["gpu_check"]["sections"]
    assert outcome["stuck"]["status"] == "cut: the deadline"
    assert outcome["later"]["status"] == "not run: the deadline"
    assert summary["gpu_check"]["exit_code"] == 3
    assert [r["shape"] for r in summary["rows"]] == ["before the long call"]
    assert "cut: the deadline" in (tmp_path / "README.md").read_text()
    assert "section stuck: cut: the deadline" in (tmp_path / "gpu_check.log").read_text()


def test_a_section_that_checks_the_clock_stops_at_its_reserve(tmp_path):
    def loop(check):
        while True:
            check.tick(reserve=check.deadline - 0.3, why="time kept for the next section")
            check.add_row(row(f"step {len(check.results.rows)}"))
            time.sleep(0.05)

    def optional(check):
        check.add_row(row("optional"))

    code = gpu_check.run(tiny_args(tmp_path, deadline=30), [Section("loop", loop, required=True),
                                                               Section("optional", optional, required=False)])
    summary = summary_of(tmp_path)
    assert summary["gpu_check"]["sections"]["loop"]["status"] == "cut: time kept for the next section"
    assert summary["gpu_check"]["sections"]["optional"]["status"] == "done"  # the reserve left it its time
    assert summary["rows"][-1]["shape"] == "optional" and len(summary["rows"]) >= 2
    assert code == 3


def test_sigterm_stops_the_run_and_the_output_is_still_written(tmp_path):
    def terminated_midway(check):
        check.add_row(row("before SIGTERM"))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    before = signal.getsignal(signal.SIGTERM)
    code = gpu_check.run(tiny_args(tmp_path), [Section("terminated", terminated_midway, required=True)])
    assert code == 3
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone again
    summary = summary_of(tmp_path)
    assert summary["gpu_check"]["sections"]["terminated"]["status"] == "cut: terminated (SIGTERM)"
    assert [r["shape"] for r in summary["rows"]] == ["before SIGTERM"]


def test_a_planted_mismatch_is_named_and_fails_the_run(tmp_path, monkeypatch):
    # The layout kernel's launcher, shared by to_temporal, from_temporal and all_to_all's pack: channels reversed.
    real = layout._launch
    monkeypatch.setattr(layout, "_launch", lambda *args, **kwargs: real(*args, **kwargs).flip(-1))
    cases = [OpCase("to_temporal", torch.float32, 72, True), OpCase("gated_residual", torch.float32, 72, False)]
    monkeypatch.setattr(gpu_check, "correctness_cases", lambda tiny: cases)
    monkeypatch.setattr(gpu_check, "kernels_on_off_check", lambda check: None)
    code = gpu_check.run(tiny_args(tmp_path), [Section("2 correctness", gpu_check.correctness, required=True)])
    assert code == 1
    status = summary_of(tmp_path)["gpu_check"]
    failed = {check["name"] for check in status["checks"] if not check["ok"]}
    assert {"to_temporal fp32 C=72 temporal: out", "to_temporal fp32 C=72 temporal: dx"} <= failed
    assert any(name.startswith("all_to_all pack") for name in failed)  # the pack launches the same kernel
    assert not any(name.startswith("gated_residual") for name in failed)
    passed = [check for check in status["checks"] if check["name"].startswith("gated_residual")]
    assert len(passed) == 4 and all(check["err"] < 1e-6 for check in passed)  # out, dx, dy, dtable
    assert any("to_temporal fp32 C=72 temporal: out" in failure for failure in status["failures"])
    assert status["exit_code"] == 1 and "**Failures:**" in (tmp_path / "README.md").read_text()


def test_a_planted_attention_bug_is_named_and_fails_the_run(tmp_path, monkeypatch):
    """temporal_attention ignoring its scale: the case with a scale fails (out and dqkv), the one without passes."""
    real = K.temporal_attention
    monkeypatch.setattr(K, "temporal_attention", lambda qkv, T, heads, scale=None: real(qkv, T, heads))
    plain, scaled = gpu_check.TINY_ATTENTION[1], gpu_check.TINY_ATTENTION[2]
    assert plain.scale is None and scaled.scale is not None and scaled.strided
    cases = [OpCase("temporal_attention", torch.float32, shape.heads * shape.D, True, shape)
             for shape in (plain, scaled)]
    code = gpu_check.run(tiny_args(tmp_path), [Section("2 correctness", lambda check: gpu_check.op_checks(check, cases),
                                                       required=True)])
    assert code == 1
    status = summary_of(tmp_path)["gpu_check"]
    verdicts = {check["name"]: check["ok"] for check in status["checks"]}
    assert verdicts == {
        "temporal_attention fp32 B=2 T=16 S=5 H=2 D=72: out": True,
        "temporal_attention fp32 B=2 T=16 S=5 H=2 D=72: dqkv": True,
        "temporal_attention fp32 B=2 T=3 S=5 H=2 D=40 scale=0.3 strided qkv: out": False,
        "temporal_attention fp32 B=2 T=3 S=5 H=2 D=40 scale=0.3 strided qkv: dqkv": False,
    }


def test_the_gpu_plan_checks_and_times_temporal_attention(monkeypatch):
    """Without a GPU the GPU plan still runs as far as its lists: STDiT-XL/2's 16 heads of 72 at T=16 and 64 in
    every dtype, odd S and a strided qkv in the correctness cases; its 16x256 row in section 3 for sora, torch
    and torch.compile, 16x512 and 64x512 in section 5."""
    cases = [case for case in gpu_check.correctness_cases(tiny=False) if case.op == "temporal_attention"]
    stdit = {(case.attention.T, case.dtype) for case in cases if (case.attention.heads, case.attention.D) == (16, 72)}
    assert stdit == {(T, dtype) for T in (16, 64) for dtype in gpu_check.CHECK_DTYPES}
    assert any(case.attention.S % 2 for case in cases) and any(case.attention.strided for case in cases)
    assert all(case.C == case.attention.heads * case.attention.D for case in cases)
    calls = []
    monkeypatch.setattr(gpu_check, "kernel_rows", lambda check, shape_dtypes, providers, reserve=0.0,
                        attention_shape_dtypes=(): calls.append((providers, attention_shape_dtypes)))
    check = type("GpuCheck", (), {"tiny": False})()
    gpu_check.target_kernel_rows(check)
    timed = [(provider, shape.video, shape.B, shape.T, shape.heads, shape.C, dtype)
             for providers, attention in calls for shape, dtype in attention for provider in providers]
    assert timed == [(provider, "16x256", 64, 16, 16, 1152, torch.bfloat16)
                     for provider in ("sora", "torch", "torch.compile")]
    calls.clear()
    gpu_check.more_kernel_rows(check)
    larger = [(shape.video, shape.T) for _, attention in calls for shape, _ in attention]
    assert larger == [("16x512", 16), ("64x512", 64)]


def test_unplanted_checks_pass(tmp_path, monkeypatch):
    """The same run without the planted bug: every check passes (so the test above fails for the bug alone)."""
    cases = [OpCase("to_temporal", torch.float32, 72, True), OpCase("layernorm_modulate", torch.bfloat16, 1000, True),
             OpCase("temporal_attention", torch.bfloat16, 80, True, gpu_check.TINY_ATTENTION[2])]
    monkeypatch.setattr(gpu_check, "correctness_cases", lambda tiny: cases)
    code = gpu_check.run(tiny_args(tmp_path), [Section("2 correctness", gpu_check.correctness, required=True)])
    status = summary_of(tmp_path)["gpu_check"]
    assert code == 0, status["failures"]
    names = [check["name"] for check in status["checks"]]
    assert "layernorm_modulate bf16 C=1000 temporal: dtable" in names
    assert "temporal_attention bf16 B=2 T=3 S=5 H=2 D=40 scale=0.3 strided qkv: dqkv" in names
    assert any(name.startswith("STDiT (tiny, fp32) kernels on vs off") for name in names)


@pytest.mark.parametrize("argv,message", [
    (["--tiny"], "the following arguments are required: --out"),
    (["--tiny", "--out", "x", "--deadline", "0"], "--deadline must be a number of seconds in (0, 86400], got 0.0"),
    (["--tiny", "--out", "x", "--deadline", "soon"], "argument --deadline: invalid float value: 'soon'"),
    (["--ti", "--out", "x"], "unrecognized arguments: --ti"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        gpu_check.parse_args(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_without_cuda_only_tiny_runs(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.run(gpu_check.parse_args(["--out", str(tmp_path)])) == 2
    assert "no CUDA device here" in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()


def test_the_gpu_plan_times_the_pipeline_targets(monkeypatch):
    """Section 5 runs issue 12's pipeline rows as bench/test_pipeline.py records them: train_step_full for
    STDiT-XL/2 at 16x256 pre-encoded, then with T5 + VAE, then sample_e2e at 16x256 with 100 IDDPM steps."""
    rows = []
    monkeypatch.setattr(gpu_check, "measured_row", lambda check, row, measure: rows.append(row) or False)
    check = type("GpuCheck", (), {"tiny": False, "device": torch.device("cuda"), "tick": lambda self: None})()
    gpu_check.pipeline_rows(check)
    planned = [(row["suite"], row["bench"], row["model"], row["shape"], row.get("encoders"), row["provider"],
                row["batch_size"]) for row in rows]
    assert planned == [("train", "train_step_full", "STDiT-XL/2", "16x256x256", "none", "sora", 8),
                       ("train", "train_step_full", "STDiT-XL/2", "16x256x256", "T5+VAE", "sora", 8),
                       ("pipeline", "sample_e2e", "STDiT-XL/2", "16x256x256", None, "sora", 1)]
    assert rows[-1]["steps"] == 100 and rows[-1]["dtype"] == "fp16"


def test_a_missing_pipeline_package_skips_the_row(monkeypatch):
    """Without diffusers or transformers on the device the T5 + VAE rows are skipped with the reason, not failed."""
    monkeypatch.setattr(gpu_check, "PIPELINE_MODULES", ("sora.no_such_module",))
    with pytest.raises(gpu_check.Unavailable, match="sora.no_such_module not importable here"):
        gpu_check.pipeline_modules()


def test_tiny_says_its_numbers_are_the_interpreters_and_how_to_measure_on_a_gpu(tmp_path, capsys):
    code = gpu_check.run(tiny_args(tmp_path), [Section("one row", lambda check: check.add_row(row("x")), True)])
    assert code == 0
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert lines[1].startswith("on a CPU under the Triton interpreter: these numbers check the harness, they are "
                               "not results")
    assert lines[-1].startswith("on a GPU: python bench/gpu_check.py --out DIR (the whole check, within its 420 s "
                                "deadline) or pytest bench/ --benchmark")
