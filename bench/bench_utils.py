"""What every bench shares: the run's environment (device, versions, commit, copy bandwidth), timing, the
minimum-bytes formulas, random weights, and the rows collector that conftest (and bench/gpu_check.py) write out.

Timing, each case measured once: kernels with `triton.testing.do_bench(..., return_mode="median")` on CUDA
(CUDA events, L2 flushed before each run) after an explicit warm-up that keeps JIT and torch.compile work out of
the numbers; in pytest that one measurement is the test's single pytest-benchmark call (`measured_once`), so
`--benchmark-only` selects the test. Whole steps (training steps, sampling, encoders): CUDA events around each
synchronized call, median (time_steps). On a CPU-only machine: wall clock (smoke only).
"""

import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
CPU_SLUG = "cpu-smoke"

# do_bench budgets (ms of device time): long enough for a stable median of 1-10 ms kernels.
WARMUP_MS = 25
REP_MS = 200
# Working sets below this get several input sets to rotate through (H100's L2 is 50 MB); ours are far over.
L2_FALLBACK_BYTES = 50 * 2**20
# Whole steps (training, sampling, encoders): about this much time of timed calls per case.
STEP_BUDGET_MS = 6000

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def on_cuda() -> bool:
    return torch.cuda.is_available()


def bench_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if on_cuda() else torch.device("cpu")


# ---- environment ------------------------------------------------------------------------------------
def git_commit() -> str:
    """HEAD, with "-dirty" when tracked files changed. SORA_BENCH_COMMIT overrides it (a device machine
    that got a copy of the working tree without .git)."""
    if os.environ.get("SORA_BENCH_COMMIT"):
        return os.environ["SORA_BENCH_COMMIT"]

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True).stdout

    try:
        head = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout here; set SORA_BENCH_COMMIT)"
    return head + ("-dirty" if dirty else "")


def slug(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3": the results folder of a device."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-device"


def _nvml_handle(pynvml, index: int):
    """NVML's handle for CUDA device `index` (matched by UUID: NVML and CUDA may number devices differently)."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        try:
            text = str(uuid)
            return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else "GPU-" + text)
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def read_clocks(index: int) -> dict | None:
    """Current and maximum SM and memory clocks (MHz) via nvidia-ml-py; None where NVML is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no pynvml, or no driver: the run still measures, it just cannot say the clocks
        return None
    try:
        handle = _nvml_handle(pynvml, index)
        return {
            "sm_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "sm_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM),
        }
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def device_info(device: torch.device) -> dict:
    """Name, memory, driver and shape of the device (nvidia-ml-py for what CUDA does not say)."""
    if device.type != "cuda":
        return {"name": f"cpu ({platform.processor() or platform.machine()})", "cpu_count": os.cpu_count()}
    props = torch.cuda.get_device_properties(device)
    info = {
        "name": props.name,
        "memory_gb": round(props.total_memory / 1e9, 1),
        "sm_count": props.multi_processor_count,
        "compute_capability": f"{props.major}.{props.minor}",
        "l2_mb": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
        "driver": None,
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = _nvml_handle(pynvml, device.index)
            info["name"] = _text(pynvml.nvmlDeviceGetName(handle))
            info["memory_gb"] = round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / 1e9, 1)
            info["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
        finally:
            pynvml.nvmlShutdown()
    except Exception as error:  # keep CUDA's view of the device, and say why NVML's is missing
        info["nvml_error"] = f"{type(error).__name__}: {error}"
    return info


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return L2_FALLBACK_BYTES
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or L2_FALLBACK_BYTES


def measure_copy_bandwidth(device: torch.device) -> float:
    """GB/s of one large device-to-device copy, counting bytes read plus bytes written (median)."""
    numel = (2**30 if device.type == "cuda" else 2**26) // 4  # 1 GiB on the GPU (20x L2), 64 MiB on a CPU
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    bandwidth = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    del src, dst
    free_memory()
    return bandwidth


def collect_env(device: torch.device) -> dict:
    """Everything summary.json says about the run besides its rows."""
    import triton

    env = {
        "device": device_info(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": device.type != "cuda",
        "timing": (
            f"triton.testing.do_bench median (warmup={WARMUP_MS} ms, rep={REP_MS} ms, L2 flushed per run) for kernels; "
            "CUDA events around each step, median, for models"
            if device.type == "cuda"
            else "CPU smoke set: wall clock (time.perf_counter) median; not results"
        ),
        "compile_mode": compile_mode(),
    }
    env["copy_bandwidth_gbps"] = round(measure_copy_bandwidth(device), 1)
    # Read right after the copies, while the clocks are up (an idle H100 reports its SM clock at ~345 MHz).
    env["clocks"] = read_clocks(device.index) if device.type == "cuda" else None
    return env


def compile_mode() -> str:
    """How the model benches apply torch.compile: "blocks" (default: each transformer block, the regional
    compile PyTorch recommends; 28 identical blocks compile once) or "model" (torch.compile(model))."""
    mode = os.environ.get("SORA_BENCH_COMPILE", "blocks")
    if mode not in ("blocks", "model"):
        raise pytest.UsageError(f"SORA_BENCH_COMPILE must be 'blocks' or 'model', got {mode!r}")
    return mode


# ---- models ----------------------------------------------------------------------------------------------
def randomize(module: torch.nn.Module, std: float = 0.02) -> None:
    """Random weights everywhere: the zero-initialised projections would multiply zeros, which can run
    faster than real weights do."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, std, generator=generator)


# ---- timing ----------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, repeats: int = 5) -> float:
    """Median time of one call of fn in ms: do_bench on CUDA, wall clock on a CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measured_once(benchmark, measure):
    """Run measure() exactly once, as the test's one pytest-benchmark call (so `--benchmark-only` selects the
    test); returns what it returns. The row's numbers come from inside measure (do_bench, CUDA events):
    pytest-benchmark's own table shows how long the whole measurement took, not a kernel's time."""
    if benchmark.disabled:
        return measure()
    return benchmark.pedantic(measure, rounds=1, iterations=1)


def pedantic_ms(benchmark, fn, device: torch.device, rounds: int, warmup_rounds: int = 1) -> float | None:
    """Run fn through pytest-benchmark (synchronized after each call); its median wall time in ms."""

    def call_and_sync():
        fn()
        synchronize(device)

    if benchmark.disabled:  # --benchmark-disable runs the function once: keep the rounds the caller asked for
        for _ in range(warmup_rounds + rounds):
            call_and_sync()
        return None
    benchmark.pedantic(call_and_sync, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    return benchmark.stats.stats.median * 1e3


def time_steps(benchmark, step, device: torch.device, warmup: int = 2, budget_ms: float = STEP_BUDGET_MS) -> dict:
    """Time a whole step (a training step, a sampling run, an encoder call: tens of ms to seconds, host work
    included): `warmup` untimed calls (JIT, compile, handles, optimizer state), then 3-10 calls (about
    budget_ms of them), each timed with CUDA events and synchronized; through pytest-benchmark when `benchmark`
    is a fixture, plainly when it is None (bench/gpu_check.py).

    Returns ms (median of the events), wall_ms (pytest-benchmark's median, None without it), rounds, peak_mem_gb
    (over the timed calls; None on a CPU). On a CPU: wall clock, 3 rounds.
    """
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (its time sets the rounds), got {warmup}")
    times = []

    def timed_step():
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append(time_ms(step, device, repeats=1))

    for _ in range(warmup):
        timed_step()
    rounds = max(3, min(10, int(budget_ms / times[-1]))) if device.type == "cuda" else 3
    times.clear()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    if benchmark is None:
        for _ in range(rounds):
            timed_step()
        wall_ms = None
    else:
        wall_ms = pedantic_ms(benchmark, timed_step, device, rounds=rounds, warmup_rounds=0)
    return {
        "ms": statistics.median(times),
        "wall_ms": wall_ms,
        "rounds": rounds,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    }


class Rotation:
    """Calls step(inputs) on each of several input sets in turn, so that a working set that fits in L2
    is not served from it on every repetition."""

    def __init__(self, make_inputs, step, set_bytes: int, device: torch.device):
        count = 1 if set_bytes > l2_bytes(device) else min(8, 2 * l2_bytes(device) // max(set_bytes, 1) + 1)
        self.sets = [make_inputs() for _ in range(count)]
        self.step = step
        self.calls = 0

    def __call__(self):
        inputs = self.sets[self.calls % len(self.sets)]
        self.calls += 1
        return self.step(inputs)


def free_memory() -> None:
    """Drop compiled graphs and cached device memory (between cases, and after an OOM before a retry)."""
    torch.compiler.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    """CUDA out of memory, however the library that hit it reports it."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# ---- bytes ---------------------------------------------------------------------------------------------
def kernel_bytes(bench: str, direction: str, B: int, N: int, C: int, elem: int) -> int:
    """The fewest bytes an op must move through device memory (each input read once, each output written
    once); formulas in bench/NOTES.md. The temporal variants move the same bytes (the layout is free)."""
    tokens = B * N * C * elem  # one (B, N, C) tensor
    rows = B * C * elem  # one per-sample (B, 1, C) vector: shift, scale, gate or their gradients
    if bench.startswith("layernorm_modulate"):
        fwd = 2 * tokens + 2 * rows  # read x, shift, scale; write y
        bwd = 3 * tokens + 3 * rows  # read dy, x, scale; write dx, dshift, dscale
    elif bench.startswith("gated_residual"):
        fwd = 3 * tokens + rows  # read x, y, gate; write out
        bwd = 3 * tokens + 2 * rows  # dx = dout (no bytes); read dout, y, gate; write dy, dgate
    elif bench == "to_temporal":
        fwd = 2 * tokens  # read x, write the permuted copy
        bwd = 2 * tokens  # read dout, write dx
    else:
        raise ValueError(f"no byte formula for bench {bench!r}")
    return fwd if direction == "fwd" else fwd + bwd


def all_to_all_volume(S: int, T: int, C: int, sp: int, elem: int, depth: int) -> dict:
    """Bytes one rank sends to the others in STDiT's sequence-parallel temporal attention, per sample.

    Each rank holds T/sp frames: n = S*T/sp tokens. Forward, per layer: qkv (n, 3C) scatters heads and gathers
    frames, the attention output (n, C) goes back; all_to_all_single keeps 1/sp of each tensor on the rank, so
    (sp-1)/sp of it crosses the links. Backward runs the inverse exchanges on the gradients: the same bytes.
    Gradient checkpointing recomputes the forward in backward, exchanges included. Formulas in bench/NOTES.md.
    """
    tokens = S * T // sp
    share = (sp - 1) / sp
    qkv = round(3 * tokens * C * elem * share)
    out = round(tokens * C * elem * share)
    layer_fwd = qkv + out
    return {
        "tokens_per_rank": tokens,
        "qkv_send_bytes": qkv,
        "out_send_bytes": out,
        "layer_fwd_bytes": layer_fwd,
        "layer_bwd_bytes": layer_fwd,
        "step_bytes": depth * 2 * layer_fwd,  # forward + backward
        "step_bytes_gc": depth * 3 * layer_fwd,  # + the forward recomputed under gradient checkpointing
    }


# ---- rows ----------------------------------------------------------------------------------------------
# What tells two rows apart; a field a bench does not use is None in its rows.
ROW_KEY_FIELDS = ("suite", "bench", "direction", "shape", "dtype", "provider", "batch_size",
                  "model", "video", "exchange", "sp", "micro_batch_size", "encoders")


def row_key(row: dict) -> str:
    """Rows of two runs with this key measure the same thing (a later run replaces the earlier row)."""
    return json.dumps([row.get(field) for field in ROW_KEY_FIELDS])


class Results:
    """The session's rows and environment, saved to summary.json after every row (a run cut off by a time
    limit keeps what it measured) and written out with the report when the session ends.

    out_dir: where to write (default bench/results/<gpu-slug>/, or cpu-smoke/ without CUDA). append: keep the
    rows of an earlier summary.json there (same device) that this run does not measure again, so a suite
    split over several calls of a time-limited machine ends in one summary.
    """

    def __init__(self, out_dir: Path | None = None, append: bool = False):
        self.rows: list[dict] = []
        self.env: dict | None = None
        self.written: list[Path] = []
        self.out_override = out_dir
        self.append = append
        self._earlier: dict | None = None

    @property
    def out_dir(self) -> Path:
        if self.out_override is not None:
            return Path(self.out_override)
        return RESULTS_DIR / (CPU_SLUG if self.env["smoke"] else slug(self.env["device"]["name"]))

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.env is not None:
            self.save()

    def earlier(self) -> dict:
        """The summary.json this run appends to (read once, before this run first writes there)."""
        if self._earlier is None:
            self._earlier = {}
            path = self.out_dir / "summary.json"
            if self.append and path.exists():
                earlier = json.loads(path.read_text())
                if earlier.get("device", {}).get("name") == self.env["device"]["name"]:
                    self._earlier = earlier
        return self._earlier

    def summary(self) -> dict:
        run = {key: self.env.get(key) for key in ("commit", "date", "copy_bandwidth_gbps", "clocks", "torch", "triton")}
        run["rows"] = len(self.rows)
        earlier = self.earlier()
        measured = {row_key(row) for row in self.rows}
        kept = [row for row in earlier.get("rows", []) if row_key(row) not in measured]
        return {**self.env, "rows": kept + self.rows, "runs": earlier.get("runs", []) + [run]}

    def save(self) -> tuple[Path, dict]:
        """Write summary.json (atomically); returns its path and what it holds."""
        path = self.out_dir / "summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        partial = path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(summary, indent=1) + "\n")
        partial.replace(path)
        return path, summary

    def finish(self) -> list[Path]:
        """summary.json, then the report (README.md, plots) beside it."""
        from bench.report import write_report

        path, summary = self.save()
        self.written = [path, *write_report(summary, path.parent)]
        return self.written


def record(results: Results, benchmark, row: dict, measure) -> None:
    """Run measure(row), which fills the row's numbers, and record the row.

    Out of memory becomes a skipped row ("OOM") and a skipped test; any other error is recorded as
    "error: ..." and raised, so the test fails. Either way the row is in the report.
    """
    reason = None
    try:
        measure(row)
    except Exception as error:
        if not is_oom(error):
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            row.update(ms=None, skipped=f"error: {type(error).__name__}: {message}"[:300])
            results.add(row)
            raise
        reason = "OOM" if row.get("batch_size") is None else f"OOM at batch {row['batch_size']}"
    # Outside the except block: the traceback (and the tensors its frames hold) is gone by now.
    free_memory()
    if reason is not None:
        skip(results, benchmark, row, reason)
    row.setdefault("skipped", None)
    benchmark.extra_info.update(row)
    results.add(row)


def record_largest_batch(results: Results, benchmark, make_row, measure, batches) -> None:
    """record() at the first of `batches` that fits: a batch that runs out of memory is recorded as a skipped
    row ("OOM at batch 8") and the next one is tried; the last one's OOM skips the test.

    make_row(batch) -> the row; measure(row, batch) fills it (see record)."""
    for batch in batches:
        row = make_row(batch)
        try:
            record(results, benchmark, row, lambda row: measure(row, batch))
            return
        except pytest.skip.Exception:
            # Out of memory: the next batch size gets the fixture, unless pytest-benchmark already ran it.
            oom = str(row.get("skipped") or "").startswith("OOM")
            if not oom or batch == batches[-1] or getattr(benchmark, "_mode", None):
                raise
            benchmark.skipped = False


def record_computed(results: Results, benchmark, row: dict, compute) -> None:
    """Record a row whose numbers are computed, not timed (bytes a collective must send): compute(row) fills
    it, run once through pytest-benchmark so that --benchmark-only selects the test (the time pytest-benchmark
    shows is the arithmetic's). The row says computed=True and has no ms."""
    benchmark.pedantic(compute, args=(row,), rounds=1, iterations=1)
    row.update(computed=True, ms=None, skipped=None)
    benchmark.extra_info.update(row)
    results.add(row)


def skip(results: Results, benchmark, row: dict, reason: str):
    """Record a provider that cannot run as a row with ms None and the reason, then skip the test."""
    row.update(ms=None, skipped=reason)
    results.add(row)
    benchmark.skipped = True  # tells pytest-benchmark the fixture was left unused on purpose
    pytest.skip(reason)
