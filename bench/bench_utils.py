"""What every bench shares: the run's environment (device, versions, commit, copy bandwidth), timing (Timer;
bench/NOTES.md), random weights, and the rows collector that bench/conftest.py and bench/gpu_check.py write out."""

import contextlib
import datetime
import functools
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import timeit
from pathlib import Path

import torch

from bench.cases import row_id
from bench.report import write_report

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # a row's dtype field

WARMUP_MS, REP_MS = 25, 200  # do_bench's warm-up and repetition (ms): a stable median of 1-10 ms kernels
L2_FALLBACK_BYTES = 50 * 2**20  # working sets below this rotate through several input sets (an H100's L2: 50 MB)
STEPS_MS = 6000  # whole steps (training, sampling, encoders): about this much of timed calls per case


# ---- environment ------------------------------------------------------------------------------------
def git_commit() -> str:
    """HEAD, "-dirty" when tracked files changed; SORA_BENCH_COMMIT overrides it (a tree copied without .git)."""
    if os.environ.get("SORA_BENCH_COMMIT"):
        return os.environ["SORA_BENCH_COMMIT"]

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True).stdout
    try:
        return git("rev-parse", "HEAD").strip() + ("-dirty" if git("status", "--porcelain", "-uno").strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout here; set SORA_BENCH_COMMIT)"


def nvml(index: int) -> dict:
    """NVML's name, driver, memory and clocks (MHz) of CUDA device `index`, matched by UUID (NVML and CUDA may number
    devices differently); raises where nvidia-ml-py or the driver is missing."""
    import pynvml as nv

    nv.nvmlInit()
    try:
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", ""))
        try:
            handle = nv.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
        except nv.NVMLError:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
        text = lambda value: value.decode() if isinstance(value, bytes) else value  # noqa: E731
        clocks = {f"{name}{kind}_mhz": get(handle, clock)
                  for name, clock in (("sm", nv.NVML_CLOCK_SM), ("mem", nv.NVML_CLOCK_MEM))
                  for kind, get in (("", nv.nvmlDeviceGetClockInfo), ("_max", nv.nvmlDeviceGetMaxClockInfo))}
        return {"name": text(nv.nvmlDeviceGetName(handle)), "driver": text(nv.nvmlSystemGetDriverVersion()),
                "memory_gb": round(nv.nvmlDeviceGetMemoryInfo(handle).total / 1e9, 1), "clocks": clocks}
    finally:
        nv.nvmlShutdown()


def device_info(device: torch.device) -> dict:
    """Name, memory, driver and shape of the device (nvidia-ml-py for what CUDA does not say)."""
    if device.type != "cuda":
        return {"name": f"cpu ({platform.processor() or platform.machine()})", "cpu_count": os.cpu_count()}
    props = torch.cuda.get_device_properties(device)
    info = {"name": props.name, "memory_gb": round(props.total_memory / 1e9, 1),
            "sm_count": props.multi_processor_count, "compute_capability": f"{props.major}.{props.minor}",
            "l2_mb": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None, "driver": None}
    try:
        info.update({key: value for key, value in nvml(device.index).items() if key != "clocks"})
    except Exception as error:  # keep CUDA's view of the device, and say why NVML's is missing
        info["nvml_error"] = f"{type(error).__name__}: {error}"
    return info


def run_facts(device: torch.device) -> dict:
    """What summary.json says about the run before anything is measured: device, versions, commit, date."""
    import triton

    return {"device": device_info(device), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "commit": git_commit(), "smoke": device.type != "cuda",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "copy_bandwidth_gbps": None, "clocks": None}


def collect_env(device: torch.device) -> dict:
    """run_facts, the timing, the copy bandwidth measured now (one large device-to-device copy, bytes read plus bytes
    written, median) and the clocks read right after it, while they are up (an idle H100 reports its SM clock at ~345
    MHz)."""
    env = run_facts(device)
    env["timing"] = (f"triton.testing.do_bench median (warmup={WARMUP_MS} ms, rep={REP_MS} ms, L2 flushed per run) "
                     "for kernels; CUDA events around each step, median, for models" if device.type == "cuda"
                     else "CPU smoke set: wall clock (time.perf_counter) median; not results")
    numel = (2**30 if device.type == "cuda" else 2**26) // 4  # 1 GiB on the GPU (20x L2), 64 MiB on a CPU
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    env["copy_bandwidth_gbps"] = round(2 * numel * 4 / (time_ms(lambda: dst.copy_(src), device) * 1e-3) / 1e9, 1)
    del src, dst
    free_memory()
    with contextlib.suppress(Exception):  # None where NVML is unavailable: the run still measures
        env["clocks"] = nvml(device.index)["clocks"] if device.type == "cuda" else None
    return env


# ---- models ----------------------------------------------------------------------------------------------
def randomize(module: torch.nn.Module, std: float = 0.02) -> None:
    """Random weights everywhere: zero-initialised projections would multiply zeros, faster than real weights."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, std, generator=generator)


# ---- timing ----------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, repeats: int = 3) -> float:
    """Median time of one call of fn in ms: do_bench on CUDA, wall clock on a CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))
    return statistics.median(timeit.repeat(fn, number=1, repeat=repeats)) * 1e3


class Timer:
    """Times a case on `device`: through pytest-benchmark when a test hands its fixture (its first use only: a
    batch retried after running out of memory times plainly), else plainly (bench/gpu_check.py)."""

    def __init__(self, device: torch.device, copy_bandwidth_gbps: float, benchmark=None):
        self.device, self.copy_bandwidth_gbps, self.benchmark = device, copy_bandwidth_gbps, benchmark

    def fixture(self):
        b = self.benchmark
        return None if b is None or b.disabled or getattr(b, "_mode", None) else b

    def once(self, measure):
        """measure() once, as the test's one pytest-benchmark call (so `--benchmark-only` selects the test)."""
        benchmark = self.fixture()
        return measure() if benchmark is None else benchmark.pedantic(measure, rounds=1, iterations=1)

    def kernel(self, fn) -> float:
        """fn's median time in ms after two warm-up calls (Triton JIT, torch.compile's graphs), measured once."""
        def measure():
            for _ in range(2 if self.device.type == "cuda" else 1):
                fn()
            return time_ms(fn, self.device)  # do_bench calls fn and synchronizes before it times
        return self.once(measure)

    def steps(self, step, warmup: int = 2) -> dict:
        """A whole step, as bench/NOTES.md says: `warmup` untimed calls, then 3-10 (about STEPS_MS; 2 on a CPU)
        timed with CUDA events. Returns ms (their median), wall_ms (pytest-benchmark's), rounds, peak_mem_gb."""
        cuda, times = self.device.type == "cuda", []

        def timed_step():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                times.append(time_ms(step, self.device, repeats=1))
        for _ in range(max(warmup, 1) if cuda else 1):
            timed_step()
        rounds = max(3, min(10, int(STEPS_MS / times[-1]))) if cuda else 2
        times.clear()
        if cuda:
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        benchmark = self.fixture()
        if benchmark is None:
            for _ in range(rounds):
                timed_step()
        else:
            benchmark.pedantic(timed_step, rounds=rounds, warmup_rounds=0, iterations=1)
        wall_ms = benchmark.stats.stats.median * 1e3 if benchmark else None
        return {"ms": statistics.median(times), "wall_ms": wall_ms, "rounds": rounds,
                "peak_mem_gb": torch.cuda.max_memory_allocated(self.device) / 1e9 if cuda else None}


class Rotation:
    """Calls step(inputs) on several input sets in turn, so that a working set fitting in L2 is not served from it."""

    def __init__(self, make_inputs, step, set_bytes: int, device: torch.device):
        l2 = ((device.type == "cuda" and getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
              or L2_FALLBACK_BYTES)
        count = 1 if set_bytes > l2 else min(8, 2 * l2 // max(set_bytes, 1) + 1)
        self.sets, self.step, self.calls = [make_inputs() for _ in range(count)], step, 0

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


# ---- rows ----------------------------------------------------------------------------------------------
def row_key(row: dict) -> str:
    """The row's case by its pytest id (`pytest bench/ --benchmark -k ID` measures it again), and its batch: rows of
    two runs with one key measure the same thing (a later run replaces the earlier row)."""
    return row_id(row) + (f" batch {row['batch_size']}" if row.get("batch_size") else "")


class Results:
    """A run's rows and environment, saved to out_dir/summary.json after every row, the report at the end; append:
    keep an earlier summary.json's rows (same device) not measured again, so a suite run in parts ends in one."""

    def __init__(self, out_dir: str | Path | None = None, append: bool = False):
        self.rows, self.env, self.written = [], None, []
        self.out_override, self.append = out_dir, append

    @property
    def out_dir(self) -> Path:
        if self.out_override is not None:
            return Path(self.out_override)
        # "NVIDIA H100 80GB HBM3" -> bench/results/nvidia-h100-80gb-hbm3
        name = "cpu-smoke" if self.env["smoke"] else re.sub(r"[^a-z0-9]+", "-", self.env["device"]["name"].lower())
        return REPO / "bench" / "results" / (name.strip("-") or "unknown-device")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()

    @functools.cached_property
    def earlier(self) -> dict:
        """The summary.json (same device) this run appends to, read once, before this run first writes there."""
        path = self.out_dir / "summary.json"
        earlier = json.loads(path.read_text()) if self.append and path.exists() else {}
        return earlier if earlier.get("device", {}).get("name") == self.env["device"]["name"] else {}

    def summary(self) -> dict:
        run = {key: self.env.get(key) for key in ("commit", "date", "copy_bandwidth_gbps", "clocks", "torch",
                                                  "triton")}
        earlier, measured = self.earlier, {row_key(row) for row in self.rows}
        kept = [row for row in earlier.get("rows", []) if row_key(row) not in measured]
        runs = earlier.get("runs", []) + [{**run, "rows": len(self.rows)}]
        return {**self.env, "rows": kept + self.rows, "runs": runs}

    def save(self) -> tuple[Path, dict]:
        """Write summary.json (atomically); returns its path and what it holds."""
        path, summary = self.out_dir / "summary.json", self.summary()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(summary, indent=1) + "\n")
        partial.replace(path)
        return path, summary

    def finish(self) -> list[Path]:
        """summary.json, then the report (README.md, plots) beside it."""
        path, summary = self.save()
        self.written = [path, *write_report(summary, path.parent)]
        return self.written
