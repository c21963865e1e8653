"""bench/gpu_check.py's promises, on a CPU and fast: the deadline cuts a section and everything done is still
written, a failing kernel test is named and makes the exit code non-zero, bad arguments exit 2 with one line; and
its plan: the target rows first, the rest while time remains. (CI runs the whole script with --tiny; these tests
run a section or two of it.)"""

import json
import os
import signal
import time

import pytest
import torch

from bench import gpu_check, measure
from bench.bench_utils import Timer
from bench.cases import Case, by_priority
from bench.gpu_check import Section


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


# The layout kernel's launcher, shared by to_temporal, from_temporal and all_to_all's pack: channels reversed.
PLANTED = """
def pytest_sessionstart(session):
    from sora.kernels import layout
    real = layout._launch
    layout._launch = lambda *args, **kwargs: real(*args, **kwargs).flip(-1)
"""
SELECTION = "round_trip and float32 and shape0 or layernorm_modulate_matches_reference and chunk and float32 and plain"


def kernel_tests(tmp_path, monkeypatch, planted: bool):
    """Section 2 alone on a few of the suite's kernel tests, with the layout bug planted (a pytest plugin) or not."""
    monkeypatch.setattr(gpu_check, "TINY_SELECTION", SELECTION)
    if planted:
        (tmp_path / "planted_bug.py").write_text(PLANTED)
        monkeypatch.setenv("PYTHONPATH", str(tmp_path))
        command = gpu_check.kernel_test_command
        monkeypatch.setattr(gpu_check, "kernel_test_command", lambda check: [*command(check), "-p", "planted_bug"])
    out = tmp_path / "out"
    code = gpu_check.run(tiny_args(out, deadline=300), [Section("2 kernel tests", gpu_check.kernel_tests, True)])
    status = summary_of(out)["gpu_check"]
    return code, status, {check["name"]: check["outcome"] for check in status["checks"]}


def test_a_planted_kernel_bug_is_named_and_fails_the_run(tmp_path, monkeypatch):
    code, status, outcomes = kernel_tests(tmp_path, monkeypatch, planted=True)
    assert code == 1 and status["exit_code"] == 1
    layout = {name: outcome for name, outcome in outcomes.items() if "round_trip" in name}
    norm = {name: outcome for name, outcome in outcomes.items() if "layernorm_modulate" in name}
    assert layout and set(layout.values()) == {"FAILED"}
    assert norm and set(norm.values()) == {"PASSED"}
    assert any(f"kernel test {name} FAILED" in failure for name in layout for failure in status["failures"])
    assert "**Failures:**" in (tmp_path / "out" / "README.md").read_text()


def test_unplanted_kernel_tests_pass(tmp_path, monkeypatch):
    """The same run without the planted bug: every test passes (so the test above fails for the bug alone)."""
    code, status, outcomes = kernel_tests(tmp_path, monkeypatch, planted=False)
    assert code == 0, status["failures"]
    assert len(outcomes) == 3 and set(outcomes.values()) == {"PASSED"}
    assert "tests/test_kernels.py::test_layout_round_trip" in {check["test"] for check in status["checks"]}


def test_the_kernel_tests_stop_at_their_reserve(tmp_path):
    """At a deadline of 6 s the tests get 3 (half) and are stopped there, leaving the rest of the time to the rows."""
    started = time.monotonic()
    code = gpu_check.run(tiny_args(tmp_path, deadline=6), [Section("2 kernel tests", gpu_check.kernel_tests, True)])
    assert time.monotonic() - started < 6
    assert code == 3
    assert summary_of(tmp_path)["gpu_check"]["sections"]["2 kernel tests"]["status"] == "cut: time kept for the rows"


def test_the_gpu_plan_puts_the_targets_first():
    """Priority 1-3 (required): the kernel rows at STDiT-XL/2 16x256 in bf16 (temporal_attention's too) for sora
    and torch, the 16x256 training step, temporal branch and sampling step for sora and eager, the optimizer
    step, torch.compile's 16x256 kernel rows, STDiT2's target rows (qk_norm, temporal branch, training step); then,
    while time remains, STDiT2's kernels-off step and 100-step sampling, the sampling cache, 16x512 and 64x512, the
    step with T5 + VAE and end-to-end sampling (sora, 100 IDDPM steps, fp16), the 16x512 step, the diffusers
    blocks."""
    required = [(case.bench, case.fields.get("video") or case.fields.get("shape"), case.provider)
                for case in by_priority(True, 1, 3)]
    for provider in ("sora", "torch", "torch.compile"):
        assert required.count(("temporal_attention", "16x256", provider)) == 2  # fwd, fwd+bwd
        assert required.count(("layernorm_modulate", "16x256", provider)) == 2
    for bench in ("train_step_full", "temporal_branch", "sampling_step"):
        assert {(b, p) for b, shape, p in required if b == bench and shape != "16x240x426"} == {(bench, "sora"),
                                                                                               (bench, "eager")}
    assert ("optimizer_step", "parameters", "sora") in required
    stdit2 = [(b, p) for b, shape, p in required[required.index(("optimizer_step", "parameters", "sora")) + 1:]
              if shape == "16x240x426"]
    assert stdit2 == [("qk_norm", "sora"), ("qk_norm", "torch"), ("qk_norm", "torch.compile")] * 2 + [
        ("temporal_branch", "sora"), ("temporal_branch", "open-sora"), ("temporal_branch", "open-sora+compile"),
        ("train_step_full", "sora"), ("train_step_full", "open-sora")]
    assert required.index(("train_step_full", "16x256x256", "sora")) < required.index(
        ("layernorm_modulate", "16x256", "torch.compile"))
    later = by_priority(True, 4, 99)
    attention = [case.fields["video"] for case in later if case.bench == "temporal_attention"]
    assert set(attention) == {"16x512", "64x512"}
    blocks = [case for case in later if case.bench == "diffusers_block"]  # Wan2.1 and PixArt-sigma, after the rest
    assert len(blocks) == 12 and later[-12:] == blocks
    pipeline = [case.row(case.batches[0]) for case in later[:-12] if case.suite != "kernels"]
    planned = [(r["bench"], r["model"], r["shape"], r.get("encoders"), r["provider"], r["batch_size"])
               for r in pipeline]
    assert planned[:5] == [("train_step_full", "STDiT2-XL/2", "16x240x426", "none", "eager", 4),
                           ("sampling_step", "STDiT2-XL/2", "16x240x426", None, "sora", 2),
                           ("sampling_step", "STDiT2-XL/2", "16x240x426", None, "open-sora", 2),
                           ("sampling_cache", "STDiT-XL/2", "16x256x256", None, "sora", 2),
                           ("sampling_cache", "STDiT-XL/2", "16x256x256", None, "sora+cache", 2)]
    assert later[:5] == by_priority(True, 4, 4)  # before the 16x512 kernel rows
    assert all(case.fields["steps_per_call"] == 100 for case in later[1:5])
    assert planned[5:] == [("train_step_full", "STDiT-XL/2", "16x256x256", "T5+VAE", "sora", 8),
                           ("sample_e2e", "STDiT-XL/2", "16x256x256", None, "sora", 1),
                           ("train_step_full", "STDiT-XL/2", "16x512x512", "none", "sora", 2),
                           ("train_step_full", "STDiT-XL/2", "16x512x512", "none", "eager", 2)]
    assert pipeline[6]["steps"] == 100 and pipeline[6]["dtype"] == "fp16"


def test_run_case_tries_the_next_batch_after_oom_and_skips_what_cannot_run(monkeypatch):
    """The one measuring function: OOM at batch 8 is a skipped row and batch 4 is measured; a missing package
    (Unavailable) is a skipped row with the reason; any other error is an error row, and raised."""
    def fake(case, batch, timer):
        if batch == 8:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"ms": 2.0}

    monkeypatch.setitem(measure.MEASURES, "latte_train", fake)
    timer = Timer(torch.device("cpu"), 1.0)
    rows = []
    measure.run_case(Case("latte_train", "sora", None, {"shape": "16x256x256"}, (8, 4)), timer, rows.append)
    assert [(r["batch_size"], r["ms"], r["skipped"]) for r in rows] == [(8, None, "OOM at batch 8"), (4, 2.0, None)]
    monkeypatch.setitem(measure.MEASURES, "latte_train",
                        lambda case, batch, timer: measure.importable("sora.no_such_module", "x"))
    skipped = measure.run_case(Case("latte_train", "sora", None), timer, rows.append)
    assert skipped["ms"] is None and skipped["skipped"].startswith("sora.no_such_module not importable here")
    monkeypatch.setitem(measure.MEASURES, "latte_train", lambda case, batch, timer: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        measure.run_case(Case("latte_train", "sora", None), timer, rows.append)
    assert rows[-1]["skipped"] == "error: ZeroDivisionError: division by zero"


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


def test_tiny_says_its_numbers_are_the_interpreters_and_how_to_measure_on_a_gpu(tmp_path, capsys):
    code = gpu_check.run(tiny_args(tmp_path), [Section("one row", lambda check: check.add_row(row("x")), True)])
    assert code == 0
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert lines[1].startswith("on a CPU under the Triton interpreter: these numbers check the harness, they are "
                               "not results")
    assert lines[-1].startswith("on a GPU: python bench/gpu_check.py --out DIR (the whole check, within its 420 s "
                                "deadline) or pytest bench/ --benchmark")
