"""The whole GPU check in one call, under a hard deadline.

GPU time comes to this project in windows of 15 minutes on one H100/H200, of which starting the machine takes
2-4, and no command may run longer than 10; the pytest suite (bench/NOTES.md) needs several such calls. This
script runs in one process, the sections in order of importance, each checking the clock before every case:

1. environment: GPU name, clocks and memory (nvidia-ml-py), driver, torch, Triton, commit; the copy bandwidth,
   measured now;
2. correctness on this device: every public op of sora.kernels, forward and every gradient, against a float64
   reference (bf16/fp16/fp32; C in 72, 1000, 1152, 4096; shift/scale/gate as chunks of a (B, 6, C) table as
   STDiT passes them; temporal on and off; temporal_attention at 16 heads of 72 over 16 and 64 frames, odd S,
   a strided qkv), a tensor of more than 2**31 elements, all_to_all's pack against torch, and a small STDiT
   with the kernels on == off;
3. the kernel rows that carry targets: layernorm_modulate, gated_residual (plain and temporal) and to_temporal at
   STDiT-XL/2 16x256 (1M rows, C=1152), and temporal_attention at 16x256 (qkv (64, 4096, 3456)), bf16, fwd and
   fwd+bwd; sora, torch eager, torch.compile;
4. the model rows: the STDiT-XL/2 training step (sora.train.train_step: forward, backward, clipping, AdamW,
   EMA) at 16x256 batch 8, its temporal branch, and the 16x256 sampling step, sora vs eager; optimizer_step
   (clipping, AdamW, EMA) over STDiT-XL/2's parameters against the copy bandwidth;
5. while time remains: 16x512 and 64x512 kernel rows (temporal_attention's too), fp32, C=4096; train_step_full
   (STDiT-XL/2 16x256, pre-encoded vs T5 + VAE on the fly) and sample_e2e (one 16x256 video, 100 IDDPM steps, T5
   and the VAE decode), sora only; the 16x512 training step.

    python bench/gpu_check.py --out DIR [--commit SHA] [--deadline 420] [--tiny]

Whatever is done is always written, also on a mismatch, an exception, the deadline or SIGTERM (as `timeout`
sends): summary.json is rewritten after every row and check. On a GPU the run merges into bench/results/<gpu-slug>/summary.json (bench_utils.Results'
schema plus a "gpu_check" entry: sections, checks, failures) and writes README.md and plots beside it
(bench/report.py); DIR gets copies of those and gpu_check.log. Exit code: 0 every check passed and sections 1-4
finished; 1 a mismatch or an error, each named in the log and the summary; 2 bad arguments; 3 the deadline cut a
section before section 5 (nothing failed).

--tiny runs every section on tiny shapes on the CPU under the Triton interpreter, writing to DIR only: CI runs
it, so the script cannot rot before a GPU comes.
"""

import argparse
import copy
import datetime
import importlib
import itertools
import math
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a package at the repository root
    if "--tiny" in sys.argv[1:]:
        # Triton decides when it is imported (below, through sora.kernels) whether kernels are interpreted.
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from einops import rearrange  # noqa: E402

import sora.kernels as K  # noqa: E402
from bench.bench_utils import (  # noqa: E402
    DTYPE_NAMES,
    Results,
    collect_env,
    device_info,
    free_memory,
    git_commit,
    is_oom,
    time_steps,
)
from bench.report import OneLineParser  # noqa: E402
from bench.test_attention import CPU_SHAPES as CPU_ATTENTION_SHAPES  # noqa: E402
from bench.test_attention import GPU_SHAPES as GPU_ATTENTION_SHAPES  # noqa: E402
from bench.test_attention import Case as AttentionCase  # noqa: E402
from bench.test_attention import base_row as attention_base_row  # noqa: E402
from bench.test_attention import measure_attention  # noqa: E402
from bench.test_comm import CPU_SHAPES as CPU_SEQ_SHAPES  # noqa: E402
from bench.test_comm import SeqShape, exchange_layout, swap_view  # noqa: E402
from sora.kernels.layout import swap_leading, swap_leading_reference  # noqa: E402
from bench.test_kernels import (  # noqa: E402
    BENCHES,
    CPU_SHAPES,
    DIRECTIONS,
    EPS,
    GPU_SHAPES,
    Case,
    Shape,
    Unavailable,
    base_row,
    eager_gated_residual,
    eager_layernorm_modulate,
    eager_to_temporal,
    measure_kernel,
)
from bench.test_models import (  # noqa: E402
    CPU_VIDEOS,
    GPU_VIDEOS,
    TINY,
    Video,
    build_dit,
    captions,
    measure_temporal_branch,
    temporal_branch_row,
    tokens_per_sample,
)
from sora.kernels.attention import temporal_attention_reference  # noqa: E402
from bench.test_pipeline import (  # noqa: E402
    EMA_DECAY,
    GRAD_CLIP,
    LR,
    RESIDENT,
    SD_SCALING_FACTOR,
    TrainCase,
    measure_optimizer_step,
    measure_sample_e2e,
    measure_train,
    optimizer_row,
    sample_e2e_row,
    train_row,
)
from sora.models import build_model  # noqa: E402
from sora.schedulers import IDDPM  # noqa: E402
from sora.train import build_optimizer, train_step  # noqa: E402

DEFAULT_DEADLINE_S = 420.0
# After the deadline the main thread gets this long to write what it has; then the process exits (exit code 3).
GRACE_S = 45.0
# Section 3 stops this long before the deadline, so the model rows get their turn (two XL/2 builds, ~20 steps);
# section 2 this long, so the kernel rows get theirs too (Triton compiles each new variant, ~1 s each, and
# torch.compile's rows compile for seconds each). Estimates, not measurements: no GPU has run this script yet.
MODEL_RESERVE_S = 120.0
ROWS_RESERVE_S = 240.0


class Deadline(BaseException):
    """The run's time, or a section's share of it, is up. BaseException: no `except Exception` swallows it."""


# ---- the run: clock, log, results, checks ---------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    name: str
    run: object  # run(check)
    required: bool  # the deadline cutting it fails the run (exit code 3)


class Check:
    """One gpu_check run: its device, clock, log and outputs. Rows and checks are saved as they come."""

    def __init__(self, args, device: torch.device):
        self.args, self.device, self.tiny = args, device, args.tiny
        self.out = Path(args.out)
        self.start = time.monotonic()
        self.deadline = args.deadline
        self.log_file = open(self.out / "gpu_check.log", "w")
        self.status = {"deadline_s": self.deadline, "tiny": self.tiny, "elapsed_s": None, "exit_code": None,
                       "sections": {}, "checks": [], "failures": []}
        # --tiny writes to DIR only; a GPU run merges into bench/results/<gpu-slug>/ and copies that to DIR.
        self.results = Results(self.out if self.tiny else None, append=not self.tiny)
        self.results.env = {
            "device": device_info(device), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "commit": git_commit(), "smoke": device.type != "cuda",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "copy_bandwidth_gbps": None, "clocks": None, "gpu_check": self.status,
        }

    # clock
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.deadline - self.elapsed()

    def tick(self, reserve: float = 0.0, why: str = "the deadline") -> None:
        """Before each case: stop the section when fewer than `reserve` seconds are left."""
        if self.remaining() <= reserve:
            raise Deadline(why)

    # log and outputs
    def log(self, message: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def save(self) -> None:
        self.status["elapsed_s"] = round(self.elapsed(), 1)
        path, _ = self.results.save()
        if path.parent != self.out:
            shutil.copy(path, self.out / path.name)

    def add_row(self, row: dict) -> None:
        row.setdefault("skipped", None)
        self.results.rows.append(row)
        self.save()
        self.log(f"row {row_label(row)}: {row_numbers(row)}")

    def add_check(self, op: str, name: str, err: float, tol: float) -> None:
        ok = err <= tol  # NaN compares False: a NaN anywhere fails
        # JSON has no NaN or infinity: an error that is not finite is stored as None.
        self.status["checks"].append({"op": op, "name": name, "err": err if math.isfinite(err) else None,
                                      "tol": tol, "ok": ok})
        if not ok:
            self.fail(f"mismatch: {name}: error {err:.3g} > tolerance {tol:.1g}")

    def fail(self, message: str) -> None:
        self.status["failures"].append(message)
        self.log("FAIL " + message)
        self.save()

    def exit_code(self, sections) -> int:
        if self.status["failures"]:
            return 1
        outcome = self.status["sections"]
        return 3 if any(outcome[section.name]["status"] != "done" for section in sections if section.required) else 0

    def finish(self, sections) -> int:
        for section in sections:
            self.status["sections"].setdefault(section.name, {"status": "not run: the deadline", "seconds": 0.0})
        code = self.exit_code(sections)
        self.status["exit_code"] = code
        self.save()
        try:
            for path in self.results.finish():
                if path.parent != self.out:
                    shutil.copy(path, self.out / path.name)
        except Exception as error:  # the summary is written; a report that cannot be drawn must not hide it
            self.log(f"report not written: {type(error).__name__}: {error}")
        for name, outcome in self.status["sections"].items():
            self.log(f"section {name}: {outcome['status']} ({outcome['seconds']} s)")
        checks = self.status["checks"]
        self.log(f"{len(checks)} checks, {sum(not c['ok'] for c in checks)} failed; {len(self.results.rows)} rows; "
                 f"exit code {code}; wrote {self.out}")
        for line in where_results_come_from(self.tiny):
            self.log(line)
        self.log_file.close()
        return code

    def run_section(self, section: Section) -> None:
        started = time.monotonic()
        if self.remaining() <= 0:
            return
        self.log(f"== {section.name}")
        try:
            section.run(self)
            status = "done"
        except Deadline as why:
            status = f"cut: {why}"
        except Exception as error:
            status = f"error: {type(error).__name__}: {error}"[:300]
            self.log(traceback.format_exc())
            self.fail(f"section {section.name}: {status}")
        self.status["sections"][section.name] = {"status": status, "seconds": round(time.monotonic() - started, 1)}
        self.save()


def row_label(row: dict) -> str:
    encoders = f"with {row['encoders']}" if row.get("encoders") not in (None, "none") else None
    parts = (row.get("bench"), row.get("direction"), row.get("video") or row.get("shape"), encoders, row.get("dtype"),
             row.get("provider"), f"batch {row['batch_size']}" if row.get("batch_size") else None)
    return " ".join(str(part) for part in parts if part)


def row_numbers(row: dict) -> str:
    if row.get("ms") is None:
        return f"skipped: {row.get('skipped')}"
    text = f"{row['ms']:.3f} ms"
    if row.get("gbps") is not None:
        text += f", {row['gbps']:,.0f} GB/s ({100 * row['frac_copy_bw']:.0f}% of copy)"
    if row.get("samples_per_s") is not None:
        text += f", {row['samples_per_s']:.3g} samples/s"
    return text


def measured_row(check: Check, row: dict, measure) -> bool:
    """Fill row with measure() and record it: out of memory and an unavailable provider become a skipped row,
    any other error a skipped row and a failure named by the row. Returns whether it ran out of memory."""
    oom = False
    try:
        row.update(measure())
    except Unavailable as reason:
        row.update(ms=None, skipped=str(reason))
    except Exception as error:
        if not is_oom(error):
            message = (str(error).strip().splitlines() or [""])[0]
            row.update(ms=None, skipped=f"error: {type(error).__name__}: {message}"[:300])
            check.log(traceback.format_exc())
            check.fail(f"row {row_label(row)}: {row['skipped']}")
        else:
            oom = True
            row.update(ms=None, skipped="OOM" if row.get("batch_size") is None else f"OOM at batch {row['batch_size']}")
    # Outside the except blocks: the traceback (and the tensors its frames hold) is gone by now.
    free_memory()
    check.add_row(row)
    return oom


# ---- 1. environment ---------------------------------------------------------------------------------------------
def environment(check: Check) -> None:
    check.results.env.update(collect_env(check.device))
    env = check.results.env
    device, clocks = env["device"], env["clocks"] or {}
    check.log(f"device {device.get('name')}, {device.get('memory_gb', '?')} GB, driver {device.get('driver')}; "
              f"clocks {clocks or 'not read'}")
    check.log(f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']}")
    check.log(f"copy bandwidth {env['copy_bandwidth_gbps']} GB/s (device-to-device, read + write)")
    check.save()


# ---- 2. correctness ---------------------------------------------------------------------------------------------
# Relative error ||out - ref|| / ||ref|| allowed per dtype: the kernels' fp32 arithmetic plus one rounding to the
# output dtype (tests/test_kernels.py's tolerances).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CHECK_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GPU_CHANNELS = (1152, 72, 1000, 4096)  # STDiT-XL/2's first: the checks that matter most, should time run out
TINY_CHANNELS = (72, 1000)
GPU_TOKENS = dict(B=3, T=4, S=40)  # 480 rows: several programs per launch, and per-sample reductions across them
TINY_TOKENS = dict(B=2, T=4, S=8)


@dataclass(frozen=True)
class AttentionShape:
    """qkv = (B, T*S, 3*heads*D) for temporal_attention, optionally a slice of a wider tensor (token stride
    3C + 8, as a projection with more outputs would leave it), read in place."""

    B: int
    T: int
    S: int
    heads: int
    D: int
    scale: float | None = None
    strided: bool = False

    def __str__(self):
        scale = "" if self.scale is None else f" scale={self.scale}"
        strided = " strided qkv" if self.strided else ""
        return f"B={self.B} T={self.T} S={self.S} H={self.heads} D={self.D}{scale}{strided}"


# STDiT-XL/2's 16 heads of 72 (C=1152) at 16 and 64 frames, S never a multiple of the kernel's block of positions;
# few heads of 40 at 3 frames with a scale, its qkv strided. Tiny: the same kinds, fewer heads and positions.
GPU_ATTENTION = (AttentionShape(B=2, T=16, S=37, heads=16, D=72), AttentionShape(B=2, T=64, S=5, heads=16, D=72),
                 AttentionShape(B=2, T=16, S=37, heads=16, D=72, strided=True),
                 AttentionShape(B=3, T=3, S=11, heads=5, D=40, scale=0.3, strided=True))
TINY_ATTENTION = (AttentionShape(B=1, T=64, S=3, heads=1, D=72), AttentionShape(B=2, T=16, S=5, heads=2, D=72),
                  AttentionShape(B=2, T=3, S=5, heads=2, D=40, scale=0.3, strided=True))


@dataclass(frozen=True)
class OpCase:
    op: str
    dtype: torch.dtype
    C: int
    temporal: bool
    attention: AttentionShape | None = None  # temporal_attention's shape; the other ops take B, T, S from the run

    def __str__(self):
        if self.attention is not None:
            return f"{self.op} {DTYPE_NAMES[self.dtype]} {self.attention}"
        return f"{self.op} {DTYPE_NAMES[self.dtype]} C={self.C}{' temporal' if self.temporal else ''}"


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def against_float64(kernel, reference, inputs: dict, dtype: torch.dtype) -> dict:
    """kernel(**inputs rounded to dtype) and reference(**the same values in float64): the forward and the gradient
    of every input for one random output gradient. Returns {what: (kernel's tensor, float64 reference)}."""
    low = {name: t.detach().to(dtype).requires_grad_() for name, t in inputs.items()}
    high = {name: t.detach().double().requires_grad_() for name, t in low.items()}
    out, ref = kernel(**low), reference(**high)
    dout = torch.randn(out.shape, device=out.device, dtype=out.dtype)
    got = torch.autograd.grad(out, list(low.values()), dout)
    want = torch.autograd.grad(ref, list(high.values()), dout.double())
    return {"out": (out, ref), **{f"d{name}": pair for name, pair in zip(low, zip(got, want))}}


def compare_layernorm_modulate(case: OpCase, B, T, S, device) -> dict:
    """STDiT's call: shift and scale are chunks of the (B, 6, C) adaLN table, no affine."""
    temporal = T if case.temporal else None

    def modulated(op):
        def forward(x, table):
            shift, scale = table.chunk(6, dim=1)[:2]
            return op(x, shift, scale)
        return forward

    kernel = modulated(lambda x, shift, scale: K.layernorm_modulate(x, shift, scale, eps=EPS, temporal=temporal))
    inputs = dict(x=torch.randn(B, T * S, case.C, device=device),
                  table=0.5 * torch.randn(B, 6, case.C, device=device))
    return against_float64(kernel, modulated(eager_layernorm_modulate(temporal)), inputs, case.dtype)


def compare_layernorm_affine(case: OpCase, B, T, S, device) -> dict:
    """K.LayerNorm's path with modulation: weight and bias (C,), shift and scale (B, C)."""
    temporal, C = (T if case.temporal else None), case.C

    def kernel(x, shift, scale, weight, bias):
        return K.layernorm_modulate(x, shift, scale, weight, bias, eps=EPS, temporal=temporal)

    def reference(x, shift, scale, weight, bias):
        norm = lambda t: F.layer_norm(t, (C,), weight, bias, eps=EPS)  # noqa: E731
        return eager_layernorm_modulate(temporal, norm)(x, shift[:, None], scale[:, None])

    inputs = dict(x=torch.randn(B, T * S, C, device=device), shift=0.5 * torch.randn(B, C, device=device),
                  scale=0.5 * torch.randn(B, C, device=device), weight=1 + 0.5 * torch.randn(C, device=device),
                  bias=0.5 * torch.randn(C, device=device))
    return against_float64(kernel, reference, inputs, case.dtype)


def compare_gated_residual(case: OpCase, B, T, S, device) -> dict:
    """gate is a chunk of the (B, 6, C) table; with temporal, y comes in "(B S) T C"."""
    temporal = T if case.temporal else None

    def gated(op):
        return lambda x, y, table: op(x, y, table.chunk(6, dim=1)[2])

    y_shape = (B * S, T, case.C) if temporal else (B, T * S, case.C)
    inputs = dict(x=torch.randn(B, T * S, case.C, device=device), y=torch.randn(*y_shape, device=device),
                  table=0.5 * torch.randn(B, 6, case.C, device=device))
    kernel = gated(lambda x, y, gate: K.gated_residual(x, y, gate, temporal=temporal))
    return against_float64(kernel, gated(eager_gated_residual(temporal)), inputs, case.dtype)


def compare_to_temporal(case: OpCase, B, T, S, device) -> dict:
    return against_float64(lambda x: K.to_temporal(x, T), eager_to_temporal(T),
                           dict(x=torch.randn(B, T * S, case.C, device=device)), case.dtype)


def compare_from_temporal(case: OpCase, B, T, S, device) -> dict:
    return against_float64(lambda x: K.from_temporal(x, B), lambda x: rearrange(x, "(B S) T C -> B (T S) C", B=B),
                           dict(x=torch.randn(B * S, T, case.C, device=device)), case.dtype)


def compare_layernorm_module(case: OpCase, B, T, S, device) -> dict:
    module = K.LayerNorm(case.C, eps=EPS).to(device=device, dtype=case.dtype)

    def kernel(x, weight, bias):
        return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,))

    inputs = dict(x=torch.randn(B, T * S, case.C, device=device), weight=1 + 0.5 * torch.randn(case.C, device=device),
                  bias=0.5 * torch.randn(case.C, device=device))
    reference = lambda x, weight, bias: F.layer_norm(x, (case.C,), weight, bias, eps=EPS)  # noqa: E731
    return against_float64(kernel, reference, inputs, case.dtype)


def compare_temporal_attention(case: OpCase, B, T, S, device) -> dict:
    """Its own (B, T, S), heads and head dim (case.attention); qkv as the qkv Linear writes it, or a slice of a
    wider tensor (dqkv then covers the whole wider tensor: zeros past 3C)."""
    shape = case.attention
    C3 = 3 * shape.heads * shape.D

    def attention(op):
        return lambda qkv: op(qkv[..., :C3], shape.T, shape.heads, shape.scale)

    width = C3 + 8 if shape.strided else C3
    inputs = dict(qkv=torch.randn(shape.B, shape.T * shape.S, width, device=device))
    return against_float64(attention(K.temporal_attention), attention(temporal_attention_reference), inputs, case.dtype)


def channel_sweep(*temporals):
    """The variants of an op of (B, T*S, C) tokens: every C of the run (GPU_CHANNELS or TINY_CHANNELS), temporal
    or not."""
    return lambda tiny: [dict(C=C, temporal=temporal) for C in (TINY_CHANNELS if tiny else GPU_CHANNELS)
                         for temporal in temporals]


def attention_variants(tiny: bool) -> list[dict]:
    return [dict(C=shape.heads * shape.D, temporal=True, attention=shape)
            for shape in (TINY_ATTENTION if tiny else GPU_ATTENTION)]


# op -> (compare(case, B, T, S, device) -> {what: (kernel's tensor, float64 reference)}, variants(tiny) -> the
# OpCase fields besides op and dtype). A new public op is one compare function and one line here.
OPS = {
    "layernorm_modulate": (compare_layernorm_modulate, channel_sweep(False, True)),
    "layernorm_modulate affine": (compare_layernorm_affine, channel_sweep(False, True)),
    "gated_residual": (compare_gated_residual, channel_sweep(False, True)),
    "to_temporal": (compare_to_temporal, channel_sweep(True)),
    "from_temporal": (compare_from_temporal, channel_sweep(True)),
    "LayerNorm": (compare_layernorm_module, channel_sweep(False)),
    "temporal_attention": (compare_temporal_attention, attention_variants),
}


def correctness_cases(tiny: bool) -> list[OpCase]:
    return [OpCase(op, dtype, **variant)
            for op, (_, variants) in OPS.items()
            for variant in variants(tiny)
            for dtype in CHECK_DTYPES]


def large_tensor_checks(check: Check) -> None:
    """Index arithmetic past 2**31 elements (int32 offsets would wrap): B*T*S*C > 2**31 in bf16, and the float64
    reference on the part of the last sample where the offsets are largest (the last 256 tokens of every frame)."""
    B, T, S, C, keep = (2, 4, 16, 72, 4) if check.tiny else (2, 16, 58368, 1152, 256)
    dtype, device = torch.bfloat16, check.device
    name = "large tensor (tiny stand-in)" if check.tiny else f"large tensor ({B * T * S * C:,} elements)"
    x = torch.randn(B, T * S, C, device=device, dtype=dtype)
    table = (0.5 * torch.randn(B, 6, C, device=device)).to(dtype)
    shift, scale, gate = table.chunk(6, dim=1)[:3]
    # The last sample's last `keep` tokens of each frame, frame-major: (1, T*keep, C), in float64.
    tail = x[-1:].view(1, T, S, C)[:, :, -keep:].reshape(1, T * keep, C).double()
    last = slice(B - 1, B)
    ln = eager_layernorm_modulate(T)(tail, shift[last].double(), scale[last].double())  # (keep, T, C)
    outputs = {
        "layernorm_modulate temporal": (lambda: K.layernorm_modulate(x, shift, scale, eps=EPS, temporal=T)[-keep:], ln),
        "layernorm_modulate": (lambda: K.layernorm_modulate(x, shift, scale, eps=EPS)[-1:].view(1, T, S, C)[:, :, -keep:],
                               rearrange(ln, "S T C -> 1 T S C")),
        "to_temporal": (lambda: K.to_temporal(x, T)[-keep:], eager_to_temporal(T)(tail)),
    }
    for what, (kernel, reference) in outputs.items():
        check.tick()
        check.add_check(name, f"{name}: {what} bf16", rel_error(kernel(), reference), TOLERANCE[dtype])
        free_memory()
    y = torch.randn(B * S, T, C, device=device, dtype=dtype)  # "(B S) T C"
    y_tail = rearrange(y[-keep:].double(), "S T C -> 1 (T S) C")
    reference = tail + gate[last].double() * y_tail
    out = K.gated_residual(x, y, gate, temporal=T)[-1:].view(1, T, S, C)[:, :, -keep:].reshape(1, T * keep, C)
    check.add_check(name, f"{name}: gated_residual temporal bf16", rel_error(out, reference), TOLERANCE[dtype])
    del x, y, out
    free_memory()


def pack_checks(check: Check) -> None:
    """all_to_all's pack and unpack (the (A, B, M) -> (B, A, M) swaps around all_to_all_single) for every exchange
    of STDiT's temporal attention and sp size: bit for bit against torch."""
    shapes = CPU_SEQ_SHAPES if check.tiny else [SeqShape("check", S=64, T=16)]
    dtype = torch.float32 if check.tiny else torch.bfloat16
    for shape in shapes:
        for sp in ((2, 4) if check.tiny else (2, 4, 8)):
            for exchange in ("qkv", "out"):
                tensor_shape, scatter_dim, gather_dim = exchange_layout(exchange, shape, 2 * sp, sp)
                for direction in ("pack", "unpack"):
                    check.tick()
                    A, B = swap_view(direction, tensor_shape, sp, scatter_dim, gather_dim)
                    x = torch.randn(math.prod(tensor_shape), device=check.device, dtype=dtype)
                    got, want = swap_leading(x, A, B), swap_leading_reference(x, A, B)
                    err = 0.0 if torch.equal(got, want) else (got.double() - want.double()).abs().max().item()
                    check.add_check("all_to_all pack", f"all_to_all {direction} sp={sp} {exchange} {tuple(tensor_shape)}",
                                    err, 0.0)


def kernels_on_off_check(check: Check) -> None:
    """A small STDiT (TINY, fp32) with the kernels on and off, the same weights: output and every parameter
    gradient agree to fp32 rounding. In eval mode: caption dropout would draw different captions for the two."""
    device = check.device
    models = {}
    for kernels in (True, False):
        cfg = dict(type="STDiT", input_size=(4, 8, 8), patch_size=(1, 2, 2), enable_flashattn=True,
                   enable_layernorm_kernel=kernels, **TINY)
        with device:
            models[kernels] = build_model(cfg).to(device).eval()
    for parameter in models[True].parameters():
        torch.nn.init.normal_(parameter, 0, 0.05)
    models[False].load_state_dict(models[True].state_dict())
    generator = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(2, models[True].in_channels, 4, 8, 8, device=device, generator=generator)
    timestep = torch.randint(0, 1000, (2,), device=device, generator=generator)
    y, mask = captions(models[True], 2, device, torch.float32, generator)
    dout = None
    outputs, grads = {}, {}
    for kernels, model in models.items():
        out = model(x, timestep, y, mask.bool())
        dout = torch.randn_like(out) if dout is None else dout
        out.backward(dout)
        outputs[kernels] = out.detach()
        grads[kernels] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    check.add_check("STDiT kernels on/off", "STDiT (tiny, fp32) kernels on vs off: output",
                    rel_error(outputs[True], outputs[False]), 1e-4)
    errors = {name: rel_error(grads[True][name], grads[False][name]) for name in grads[False]}
    worst = max(errors, key=errors.get)
    missing = sorted(set(grads[False]) ^ set(grads[True]))
    check.add_check("STDiT kernels on/off", f"STDiT (tiny, fp32) kernels on vs off: every gradient (worst {worst})",
                    errors[worst] if not missing else math.inf, 1e-4)


def op_checks(check: Check, cases) -> None:
    tokens = TINY_TOKENS if check.tiny else GPU_TOKENS
    reserve = 0.0 if check.tiny else ROWS_RESERVE_S
    for case in cases:
        check.tick(reserve, "time kept for the kernel and model rows" if reserve else "the deadline")
        try:
            pairs = OPS[case.op][0](case, device=check.device, **tokens)
        except Exception as error:
            check.log(traceback.format_exc())
            check.fail(f"{case}: {type(error).__name__}: {error}"[:300])
            continue
        for what, (got, want) in pairs.items():
            check.add_check(case.op, f"{case}: {what}", rel_error(got, want), TOLERANCE[case.dtype])


def correctness(check: Check) -> None:
    """Every op at the first C (STDiT-XL/2's on a GPU), the large tensor, the pack, STDiT on/off, then the
    other C's."""
    torch.manual_seed(0)
    cases = correctness_cases(check.tiny)
    op_checks(check, [case for case in cases if case.C == cases[0].C])
    for part in (large_tensor_checks, pack_checks, kernels_on_off_check):
        check.tick()
        try:
            part(check)
        except Exception as error:
            check.log(traceback.format_exc())
            check.fail(f"{part.__name__}: {type(error).__name__}: {error}"[:300])
        free_memory()
    op_checks(check, [case for case in cases if case.C != cases[0].C])


# ---- 3. and 5.: kernel rows -------------------------------------------------------------------------------------
TARGET_SHAPE = GPU_SHAPES[0][0]  # STDiT-XL/2 16x256: B=256, T=16, S=256, C=1152, 1M rows
TARGET_ATTENTION_SHAPE = GPU_ATTENTION_SHAPES[0]  # its temporal attention at 16x256: B=64, 16 heads of 72, qkv 1.8 GB
TINY_EXTRA_SHAPE = Shape("tiny-72", B=2, T=4, S=8, C=72)


def kernel_rows(check: Check, shape_dtypes, providers, reserve: float = 0.0, attention_shape_dtypes=()) -> None:
    """One row per (provider, bench, direction) at each (shape, dtype), in the order given; then temporal_attention's
    (bench/test_attention.py) per (provider, direction) at each of attention_shape_dtypes."""
    cases = [Case(bench, direction, shape, dtype, provider) for shape, dtype in shape_dtypes for provider in providers
             for bench in BENCHES for direction in DIRECTIONS]
    cases += [AttentionCase(direction, shape, dtype, provider) for shape, dtype in attention_shape_dtypes
              for provider in providers for direction in DIRECTIONS]
    for case in cases:
        check.tick(reserve, "time kept for the model rows" if reserve else "the deadline")
        attention = isinstance(case, AttentionCase)
        row, measure = (attention_base_row, measure_attention) if attention else (base_row, measure_kernel)
        measured_row(check, row(case),
                     lambda: measure(case, check.device, check.results.env["copy_bandwidth_gbps"]))


def target_kernel_rows(check: Check) -> None:
    """sora and eager first, torch.compile (minutes of compiling) last, each stopping in time for section 4."""
    shape, dtype = (CPU_SHAPES[0][0], torch.float32) if check.tiny else (TARGET_SHAPE, torch.bfloat16)
    attention = [(CPU_ATTENTION_SHAPES[0], torch.float32) if check.tiny else (TARGET_ATTENTION_SHAPE, torch.bfloat16)]
    reserve = 0.0 if check.tiny else MODEL_RESERVE_S
    kernel_rows(check, [(shape, dtype)], ("sora", "torch"), reserve, attention)
    kernel_rows(check, [(shape, dtype)], ("torch.compile",), reserve, attention)


def more_kernel_rows(check: Check) -> None:
    """16x512 and 64x512 (temporal_attention's too), then fp32 and C=4096; tiny: one bf16 shape of the BENCHES (the
    tiny attention row of section 3 already runs this path)."""
    if check.tiny:
        kernel_rows(check, [(TINY_EXTRA_SHAPE, torch.bfloat16)], ("sora", "torch"))
        return
    larger = [(shape, torch.bfloat16) for shape, _ in GPU_SHAPES[1:3]]
    kernel_rows(check, larger, ("sora", "torch"),
                attention_shape_dtypes=[(shape, torch.bfloat16) for shape in GPU_ATTENTION_SHAPES[1:]])
    fp32 = [(shape, torch.float32) for shape, dtypes in GPU_SHAPES if torch.float32 in dtypes]
    kernel_rows(check, fp32 + [(GPU_SHAPES[3][0], torch.bfloat16)], ("sora", "torch"))


# ---- 4. and 5.: model rows --------------------------------------------------------------------------------------
SAMPLE_PROMPTS = 2  # Open-Sora's inference batch; classifier-free guidance doubles it
SAMPLE_STEPS = 5  # IDDPM steps per timed call (2 on a CPU)
CFG = dict(cfg_scale=7.0, cfg_channel=3)


def model_name(device) -> str:
    return "STDiT-XL/2" if device.type == "cuda" else "STDiT (tiny)"


def train_step_rows(check: Check, video: Video) -> None:
    """sora.train.train_step (the step `python -m sora.train` runs on pre-encoded data: IDDPM's loss under bf16
    autocast with fp32 master weights, backward, clipping, AdamW, the fp32 EMA) at the first of video.batches
    that fits, sora then eager."""
    device = check.device
    cuda = device.type == "cuda"
    dtype, autocast_dtype = (torch.bfloat16, torch.bfloat16) if cuda else (torch.float32, None)
    for provider in ("sora", "eager"):
        for batch in video.batches:
            check.tick()
            row = {"suite": "train", "bench": "train_step", "model": model_name(device), "provider": provider,
                   "shape": video.label, "batch_size": batch, "encoders": "none", "optimizer_step": True,
                   "grad_checkpoint": video.grad_checkpoint,
                   "dtype": "bf16 autocast, fp32 weights" if cuda else "fp32"}

            def measure():
                model = build_dit("STDiT-XL/2", video.latent, provider, device, torch.float32,
                                  grad_checkpoint=video.grad_checkpoint).train()
                ema = copy.deepcopy(model).eval().requires_grad_(False)
                optimizer = build_optimizer(model, LR)
                generator = torch.Generator(device=device).manual_seed(1)
                # What sora.preprocess stores: the posterior's (mean, std) in the compute dtype, captions.
                mean = torch.randn(batch, model.in_channels, *video.latent, device=device, generator=generator)
                y, mask = captions(model, batch, device, dtype, generator)
                encoded = {"mean": (mean / SD_SCALING_FACTOR).to(dtype),
                           "std": torch.full_like(mean, 0.1, dtype=dtype), "y": y, "mask": mask}
                diffusion, seeds = IDDPM(), itertools.count()
                timing = time_steps(None, lambda: train_step(
                    model, ema, optimizer, diffusion, encoded, torch.Generator().manual_seed(next(seeds)),
                    latent_scale=SD_SCALING_FACTOR, dtype=dtype, autocast_dtype=autocast_dtype,
                    grad_clip=GRAD_CLIP, ema_decay=EMA_DECAY), device)
                samples_per_s = batch / (timing["ms"] * 1e-3)
                return dict(timing, samples_per_s=samples_per_s,
                            tokens_per_s=samples_per_s * tokens_per_sample(model, video))

            if not measured_row(check, row, measure):
                break


def temporal_branch_rows(check: Check, video: Video) -> None:
    for provider in ("sora", "eager"):
        check.tick()
        measured_row(check, temporal_branch_row(video, provider),
                     lambda: measure_temporal_branch(video, provider, check.device))


def sampling_step_rows(check: Check, video: Video) -> None:
    """IDDPM.sample with classifier-free guidance, a few steps per timed call; ms per step."""
    device = check.device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    steps = SAMPLE_STEPS if device.type == "cuda" else 2
    for provider in ("sora", "eager"):
        check.tick()
        row = {"suite": "pipeline", "bench": "sampling_step", "model": model_name(device), "provider": provider,
               "shape": video.label, "batch_size": SAMPLE_PROMPTS, "model_batch": 2 * SAMPLE_PROMPTS,
               "dtype": DTYPE_NAMES[dtype], "steps_per_call": steps, **CFG}

        def measure():
            model = build_dit("STDiT-XL/2", video.latent, provider, device, dtype).eval()
            generator = torch.Generator(device=device).manual_seed(1)
            y, mask = captions(model, SAMPLE_PROMPTS, device, dtype, generator)
            null = model.y_embedder.y_embedding[None].repeat(SAMPLE_PROMPTS, 1, 1)[:, None].to(dtype)
            z = torch.randn(SAMPLE_PROMPTS, model.in_channels, *video.latent, device=device, dtype=dtype,
                            generator=generator)
            scheduler = IDDPM(num_sampling_steps=steps, **CFG)
            timing = time_steps(None, lambda: scheduler.sample(model, z, y, null, mask, progress=False,
                                                               generator=generator), device, warmup=1)
            return dict(timing, ms=timing["ms"] / steps, ms_call=timing["ms"])

        measured_row(check, row, measure)


def optimizer_step_row(check: Check) -> None:
    """sora.train.optimizer_step over STDiT-XL/2's parameters: its target is >= 70% of the copy bandwidth."""
    check.tick()
    measured_row(check, optimizer_row(check.device),
                 lambda: measure_optimizer_step(None, check.device, check.results.env["copy_bandwidth_gbps"]))


def model_rows(check: Check) -> None:
    video = CPU_VIDEOS[0] if check.tiny else GPU_VIDEOS[0]  # 16x256x256, batch 8 (else 4)
    train_step_rows(check, video)
    temporal_branch_rows(check, video)
    sampling_step_rows(check, video)
    optimizer_step_row(check)


PIPELINE_MODULES = ("sora.models.text_encoder", "sora.models.vae", "sora.sample")  # transformers, diffusers


def pipeline_modules() -> None:
    """A row that needs T5 and the VAE is skipped, not failed, where their packages are not installed."""
    for module in PIPELINE_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise Unavailable(f"{module} not importable here ({error}); carry the wheel, see bench/NOTES.md")


TINY_TRAIN_VIDEO = Video("4x32x32", 4, 32, 32, batches=(2,))  # section 5's training rows with --tiny


def pipeline_rows(check: Check) -> None:
    """Issue 12's pipeline targets, sora only (bench/test_pipeline.py's rows): train_step_full for STDiT-XL/2 at
    16x256 on pre-encoded data, then with T5 + VAE on the fly (pre-encoded >= 1.3x), each at the first batch that
    fits; then sample_e2e, one 16x256 video in 100 IDDPM steps with T5 and the VAE decode (< 5 s)."""
    device = check.device
    video = TINY_TRAIN_VIDEO if check.tiny else GPU_VIDEOS[0]
    try:
        for encoders in (False, True):  # T5 is built for the second and kept for sample_e2e
            case = TrainCase("train_step_full", "STDiT-XL/2", video, encoders, "sora")
            for batch in video.batches:
                check.tick()

                def measure():
                    if case.encoders:
                        pipeline_modules()
                    return measure_train(None, case, batch, device)

                if not measured_row(check, train_row(case, batch, device), measure):
                    break
        check.tick()
        measured_row(check, sample_e2e_row("sora", device),
                     lambda: pipeline_modules() or measure_sample_e2e(None, "sora", device))
    finally:
        RESIDENT.drop()


def more_rows(check: Check) -> None:
    more_kernel_rows(check)
    pipeline_rows(check)
    train_step_rows(check, TINY_TRAIN_VIDEO if check.tiny else GPU_VIDEOS[1])


SECTIONS = [
    Section("1 environment", environment, required=True),
    Section("2 correctness", correctness, required=True),
    Section("3 kernel rows", target_kernel_rows, required=True),
    Section("4 model rows", model_rows, required=True),
    Section("5 more rows while time remains", more_rows, required=False),
]


# ---- the command line -------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="python bench/gpu_check.py", allow_abbrev=False,
                     description="The whole GPU check in one call: environment, kernel correctness, kernel and model "
                                 "rows, under a hard deadline (bench/NOTES.md).")
    parser.add_argument("--out", required=True, type=Path, help="folder for summary.json, README.md, plots and the log")
    parser.add_argument("--commit", help="the commit measured (a device machine's copy has no .git); default: git HEAD")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help=f"seconds for the whole run, writing included (default {DEFAULT_DEADLINE_S:.0f})")
    parser.add_argument("--tiny", action="store_true",
                        help="every section on tiny shapes on the CPU under the Triton interpreter (CI); writes to --out only")
    args = parser.parse_args(argv)
    if not 0 < args.deadline <= 86400:
        parser.error(f"--deadline must be a number of seconds in (0, 86400], got {args.deadline}")
    return args


def where_results_come_from(tiny: bool) -> list[str]:
    """The console's word on what the numbers are: under --tiny the Triton interpreter's, and which command
    measures on a GPU (pytest bench/'s terminal summary ends with the same line)."""
    lines = ["on a CPU under the Triton interpreter: these numbers check the harness, they are not results "
             "(the interpreter runs a kernel one program at a time, far slower than eager torch)"] if tiny else []
    return lines + [f"on a GPU: python bench/gpu_check.py --out DIR (the whole check, within its "
                    f"{DEFAULT_DEADLINE_S:.0f} s deadline) or pytest bench/ --benchmark (the whole suite, longer: "
                    "not yet timed on a GPU)"]


def usage_error(message: str) -> int:
    print(f"python bench/gpu_check.py: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace, sections=SECTIONS, backstop: bool = False) -> int:
    """Run the sections under the deadline, write everything, return the exit code."""
    if args.tiny and os.environ.get("TRITON_INTERPRET") != "1":
        return usage_error("--tiny needs TRITON_INTERPRET=1 set before triton is imported (the script sets it itself "
                           "when run as `python bench/gpu_check.py --tiny`)")
    if not args.tiny and not torch.cuda.is_available():
        return usage_error("no CUDA device here (torch.cuda.is_available() is False): on a CPU run --tiny")
    if not args.tiny and os.environ.get("TRITON_INTERPRET") == "1":
        return usage_error("TRITON_INTERPRET=1 would time the Triton interpreter: unset it, or pass --tiny")
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return usage_error(f"cannot create --out {args.out}: {error.strerror}")
    if args.commit:
        os.environ["SORA_BENCH_COMMIT"] = args.commit
    device = torch.device("cpu") if args.tiny else torch.device("cuda", torch.cuda.current_device())
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # tiny ops: a thread pool costs more than the op (bench/conftest.py)
    check = Check(args, device)
    check.log(f"gpu_check on {check.results.env['device']['name']}, deadline {args.deadline:.0f} s, out {args.out}")
    for line in where_results_come_from(args.tiny)[:-1]:
        check.log(line)

    def alarm(signum, frame):
        raise Deadline("the deadline")

    def terminated(signum, frame):  # `timeout` and a device machine's time limit send SIGTERM before SIGKILL
        raise Deadline("terminated (SIGTERM)")

    def hard_stop():
        check.log(f"still running {GRACE_S:.0f} s after the deadline: exiting; summary.json holds what was done")
        os._exit(3)

    previous = {signal.SIGALRM: signal.signal(signal.SIGALRM, alarm),
                signal.SIGTERM: signal.signal(signal.SIGTERM, terminated)}
    signal.setitimer(signal.ITIMER_REAL, max(check.remaining(), 1e-3))
    stopper = threading.Timer(check.remaining() + GRACE_S, hard_stop) if backstop else None
    if stopper is not None:
        stopper.daemon = True
        stopper.start()
    try:
        try:
            for section in sections:
                check.run_section(section)
        except Deadline as why:
            check.log(f"stopped between sections: {why}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return check.finish(sections)
    finally:
        if stopper is not None:
            stopper.cancel()
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    return run(parse_args(argv), backstop=True)


if __name__ == "__main__":
    sys.exit(main())
