"""The GPU check: the kernel tests on the GPU, then the bench's cases by priority, under one hard deadline.

    python bench/gpu_check.py --out DIR [--commit SHA] [--deadline 420] [--tiny]

bench/NOTES.md ("The GPU check") says what each of SECTIONS runs, what it writes (summary.json after every row and
test, also on a failure, the deadline or SIGTERM) and its exit codes: 0 passed, 1 a failure, 2 bad arguments, 3
cut by the deadline. --tiny runs every section on the CPU under the Triton interpreter, writing to DIR only (CI).
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import namedtuple
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # bench/ is a package at the repository root
    if "--tiny" in sys.argv[1:]:
        # Triton decides when it is imported (below, through bench.measure) whether kernels are interpreted.
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from bench.bench_utils import Results, Timer, collect_env, row_key, run_facts  # noqa: E402
from bench.cases import by_priority  # noqa: E402
from bench.report import OneLineParser  # noqa: E402

DEFAULT_DEADLINE_S = 420.0  # with GRACE_S and the start-up, the whole check under 8 minutes (bench/NOTES.md)
GRACE_S = 45.0  # after the deadline, the time to write what the run has; then the process exits (exit code 3)
ROWS_RESERVE_S = 260.0  # the kernel tests stop this long before the deadline, leaving it to the rows (bench/NOTES.md)
KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_temporal_attention.py", "tests/test_qk_norm.py",
                "tests/test_models.py::test_kernels_on_equals_off", "tests/test_stdit2.py::test_kernels_on_equals_off"]
GPU_SELECTION = "not triton_kernels_ran"  # every test but those that check the interpreter; --tiny: a selection
TINY_SELECTION = ("(matches_reference and chunk or test_matches_reference or round_trip or swap_leading or strided) "
                  "and not float16 and not bfloat16")
OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


class Deadline(BaseException):
    """The run's time, or a section's share of it, is up. BaseException: no `except Exception` swallows it."""


Section = namedtuple("Section", "name run required")  # run(check); required: cut by the deadline, exit code 3


class Check:
    """One gpu_check run: its device, clock, log and outputs. Rows and tests are saved as they come."""

    def __init__(self, args, device: torch.device):
        self.device, self.tiny, self.out, self.deadline = device, args.tiny, Path(args.out), args.deadline
        self.start = time.monotonic()
        self.log_file = open(self.out / "gpu_check.log", "w")
        self.status = {"deadline_s": self.deadline, "tiny": self.tiny, "elapsed_s": None, "exit_code": None,
                       "sections": {}, "checks": [], "failures": []}
        # --tiny writes to DIR only; a GPU run merges into bench/results/<gpu-slug>/ and copies that to DIR.
        self.results = Results(self.out if self.tiny else None, append=not self.tiny)
        self.results.env = {**run_facts(device), "gpu_check": self.status}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.deadline - self.elapsed()

    def tick(self, reserve: float = 0.0, why: str = "the deadline") -> None:
        """Before each case: stop the section when fewer than `reserve` seconds are left."""
        if self.remaining() <= reserve:
            raise Deadline(why)

    def log(self, message: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {message}"
        print(line, flush=True)
        print(line, file=self.log_file, flush=True)

    def save(self, paths=()) -> None:
        """summary.json (and `paths` written beside it), copied to --out from bench/results/<gpu-slug>/."""
        self.status["elapsed_s"] = round(self.elapsed(), 1)
        for path in [self.results.save()[0], *paths]:
            if path.parent != self.out:
                shutil.copy(path, self.out / path.name)

    def add_row(self, row: dict) -> None:
        self.results.rows.append(row)
        self.save()
        self.log(f"row {row_key(row)}: {row_numbers(row)}")

    def fail(self, message: str) -> None:
        self.status["failures"].append(message)
        self.log("FAIL " + message)
        self.save()

    def finish(self, sections) -> int:
        for section in sections:
            self.status["sections"].setdefault(section.name, {"status": "not run: the deadline", "seconds": 0.0})
        cut = any(self.status["sections"][s.name]["status"] != "done" for s in sections if s.required)
        code = 1 if self.status["failures"] else 3 if cut else 0
        self.status["exit_code"] = code
        self.save()
        try:
            self.save(self.results.finish())
        except Exception as error:  # the summary is written; a report that cannot be drawn must not hide it
            self.log(f"report not written: {type(error).__name__}: {error}")
        for name, outcome in self.status["sections"].items():
            self.log(f"section {name}: {outcome['status']} ({outcome['seconds']} s)")
        checks = self.status["checks"]
        failed = sum(check["outcome"] in ("FAILED", "ERROR") for check in checks)
        self.log(f"{len(checks)} kernel tests, {failed} failed; {len(self.results.rows)} rows; exit code {code}; "
                 f"wrote {self.out}")
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


def row_numbers(row: dict) -> str:
    if row.get("ms") is None:
        return "computed" if row.get("computed") else f"skipped: {row.get('skipped')}"
    gbps = f", {row['gbps']:,.0f} GB/s ({100 * row['frac_copy_bw']:.0f}% of copy)" if row.get("gbps") else ""
    samples = f", {row['samples_per_s']:.3g} samples/s" if row.get("samples_per_s") else ""
    return f"{row['ms']:.3f} ms{gbps}{samples}"


# ---- the sections -----------------------------------------------------------------------------------------------
def environment(check: Check) -> None:
    env = check.results.env
    env.update(collect_env(check.device))
    device, clocks = env["device"], env["clocks"] or {}
    check.log(f"device {device.get('name')}, {device.get('memory_gb', '?')} GB, driver {device.get('driver')}; "
              f"clocks {clocks or 'not read'}")
    check.log(f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']}")
    check.log(f"copy bandwidth {env['copy_bandwidth_gbps']} GB/s (device-to-device, read + write)")
    check.save()


def kernel_test_command(check: Check) -> list[str]:
    device, selection = ("cpu", TINY_SELECTION) if check.tiny else ("cuda", GPU_SELECTION)
    return [sys.executable, "-m", "pytest", *KERNEL_TESTS, "--device", device, "-k", selection, "-v", "-p",
            "no:cacheprovider", "-o", "console_output_style=classic"]


def kernel_tests(check: Check) -> None:
    """The kernel tests in a subprocess, each outcome recorded as printed, killed at the reserve; a failure fails."""
    reserve = min(ROWS_RESERVE_S, check.deadline / 2)
    check.tick(reserve, "time kept for the rows")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(kernel_test_command(check), cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    stopper, tail = threading.Timer(check.remaining() - reserve, process.kill), []
    stopper.start()
    try:
        for line in process.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-30:]
            found = OUTCOME.match(line)
            if found is None:
                continue
            name, outcome = found.groups()
            check.status["checks"].append({"test": name.split("[")[0], "name": name, "outcome": outcome})
            check.log(f"test {name} {outcome}")
            if outcome in ("FAILED", "ERROR"):
                check.fail(f"kernel test {name} {outcome}")
            else:
                check.save()
        code = process.wait()
    finally:
        stopper.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    if code == -signal.SIGKILL:
        raise Deadline("time kept for the rows")
    if code != 0 and not any(c["outcome"] in ("FAILED", "ERROR") for c in check.status["checks"]):
        check.log("\n".join(tail))
        check.fail(f"kernel tests: pytest exited {code}: {tail[-1] if tail else ''}"[:300])


def measure_cases(check: Check, first: int, last: int) -> None:
    """The cases with priority first..last through run_case; an error is a failure named by its row, then the next."""
    from bench.measure import run_case  # it drops the resident T5 before every case that encodes no text

    timer = Timer(check.device, check.results.env["copy_bandwidth_gbps"])
    for case in by_priority(check.device.type == "cuda", first, last):
        check.tick()
        try:
            run_case(case, timer, check.add_row)
        except Exception as error:
            check.log(traceback.format_exc())
            check.fail(f"row {row_key(check.results.rows[-1])}: {type(error).__name__}: {error}"[:300])


SECTIONS = [
    Section("1 environment", environment, required=True),
    Section("2 kernel tests", kernel_tests, required=True),
    Section("3 target rows", lambda check: measure_cases(check, 1, 3), required=True),
    Section("4 more rows while time remains", lambda check: measure_cases(check, 4, 99), required=False),
]


# ---- the command line -------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="python bench/gpu_check.py", allow_abbrev=False,
                           description="The GPU check in one call: environment, the kernel tests on the GPU, the "
                                       "bench's cases by priority, under a hard deadline (bench/NOTES.md).")
    parser.add_argument("--out", required=True, type=Path, help="folder for summary.json, README.md, plots, the log")
    parser.add_argument("--commit", help="the commit measured (a copy of the tree without .git); default: git HEAD")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help=f"seconds for the whole run, writing included (default {DEFAULT_DEADLINE_S:.0f})")
    parser.add_argument("--tiny", action="store_true",
                        help="every section on tiny shapes on the CPU under the Triton interpreter (CI); "
                             "writes to --out only")
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
    torch.set_num_threads(1 if args.tiny else threads)  # tiny ops: a thread pool costs more than the op (NOTES.md)
    check = Check(args, device)
    check.log(f"gpu_check on {check.results.env['device']['name']}, deadline {args.deadline:.0f} s, out {args.out}")
    for line in where_results_come_from(args.tiny)[:-1]:
        check.log(line)

    why = {signal.SIGALRM: "the deadline", signal.SIGTERM: "terminated (SIGTERM)"}  # `timeout` sends SIGTERM first

    def stop(signum, frame):
        raise Deadline(why[signum])

    def hard_stop():
        check.log(f"still running {GRACE_S:.0f} s after the deadline: exiting; summary.json holds what was done")
        os._exit(3)

    previous = {signum: signal.signal(signum, stop) for signum in why}
    signal.setitimer(signal.ITIMER_REAL, max(check.remaining(), 1e-3))
    stopper = threading.Timer(check.remaining() + GRACE_S, hard_stop)
    stopper.daemon = True
    if backstop:
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
        stopper.cancel()
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(run(parse_args(), backstop=True))
