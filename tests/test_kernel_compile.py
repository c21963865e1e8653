"""Every kernel launch the public ops make compiles for sm_90 (H100/H200) and spills no registers.

bench/kernel_report.py captures the launches from the public ops on CPU tensors and compiles them ahead of
time with Triton's own ptxas; it runs in a subprocess because this suite's kernels are interpreted
(TRITON_INTERPRET=1 is set by conftest.py before Triton decorates them), and the report needs them compiled.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
# The model's shapes (C=1152 in each dtype, C=4096), the odd widths, the largest C that must not spill, and
# the all-to-all packs, temporal attention at T=16 and T=64 (head dim 72), with STDiT2's RoPE and qk-norm at
# T=16 (bf16, fp32) and T=64 (bf16), and qk_norm at C=1152; the rest of bench/kernel_report.py's cases differ
# only in dtype or size; "C=1152" also selects the per-frame and per-token modulation cases.
CASES = ["C=1152", "C=4096 bf16", "C=72 ", "C=8192 bf16", "all_to_all", "temporal_attention T=",
         "temporal_attention+rope+qk_norm", "qk_norm C=1152"]
KERNELS = {"_layernorm_modulate_fwd_kernel", "_layernorm_modulate_bwd_kernel", "_gated_residual_fwd_kernel",
           "_gated_residual_bwd_kernel", "_temporal_copy_kernel", "_temporal_attention_fwd_kernel",
           "_temporal_attention_bwd_kernel", "_qk_norm_fwd_kernel", "_qk_norm_bwd_kernel"}


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "launches.json"
    args = [sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--json", str(out)]
    for case in CASES:
        args += ["-k", case]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert out.exists(), f"kernel_report.py wrote nothing:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(out.read_text()), done


def test_every_launch_compiles_for_sm90(launches):
    found, done = launches
    failed = [f"{launch['case']}: {launch['kernel']}: {launch['error']}" for launch in found if launch["error"]]
    assert not failed, "\n".join(failed)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {launch["kernel"] for launch in found} >= KERNELS
    cases = {launch["case"] for launch in found}
    for case in CASES:
        assert any(case in name for name in cases), f"no launch captured for {case!r}"


def test_no_spills_up_to_8192_channels(launches):
    found, _ = launches
    spilled = [f"{launch['case']}: {launch['kernel']} spills {launch['spill_bytes']} B"
               for launch in found if launch["ints"].get("C", 0) <= 8192 and launch["spill_bytes"]]
    assert not spilled, "\n".join(spilled)


def test_bulk_accesses_are_128_bit(launches):
    """Row data moves in 16-byte accesses wherever the JIT can prove rows 16-byte aligned (C divisible by 16,
    its int specialisation); narrower ones may only be the per-row statistics."""
    found, _ = launches
    for launch in found:
        if launch["ints"].get("C", 0) % 16 == 0:
            assert launch["loads"].startswith("128x") and launch["stores"].startswith("128x"), launch


def test_reduction_grids_fit_one_wave(launches):
    """The backward reductions size their grid from the programs that fit an SM; at the registers ptxas gives,
    that many must be resident, or the grid runs a second, part-empty wave (an H100's 132 SMs)."""
    found, _ = launches
    for launch in found:
        # One program per sample or frame (grid (B*F, 1, ...)) is the fewest: per-token modulation's B*N.
        if launch["loop_trips"] and launch["grid"][1] > 1:
            assert launch["waves"] <= 1.0, launch


def test_per_frame_modulation_issues_as_per_sample(launches):
    """LayerNorm-modulate with a shift/scale row per frame (frames=T, STDiT2's x_mask select) issues within 10%
    of the per-sample kernel's warp instructions per byte, forward and backward (C=1152 bf16, T=16)."""
    found, _ = launches
    per_byte = {(launch["case"], launch["kernel"]): launch["per_byte"] for launch in found}
    for kernel in ("_layernorm_modulate_fwd_kernel", "_layernorm_modulate_bwd_kernel"):
        per_sample = per_byte[("layernorm_modulate C=1152 bf16 plain", kernel)]
        per_frame = per_byte[("layernorm_modulate C=1152 bf16 per-frame", kernel)]
        assert per_frame <= 1.1 * per_sample, f"{kernel}: {per_frame:.3f} vs {per_sample:.3f} per sample"
