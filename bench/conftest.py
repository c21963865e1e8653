"""The speed suite's switches (--benchmark, --bench-out, --bench-append), run facts and results writer; bench/NOTES.md
says where the rows and the report go, and what the CPU smoke set is."""

import os
from pathlib import Path

import pytest
import torch

from bench.bench_utils import Results, collect_env
from bench.gpu_check import where_results_come_from

RESULTS = pytest.StashKey[Results]()
BENCH_DIR = Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("sora bench", "sora speed suite (bench/)")
    group.addoption("--benchmark", action="store_true", default=False,
                    help="run the speed suite in bench/ and write its report (same as --benchmark-only for bench/)")
    group.addoption("--bench-out", default=None, metavar="DIR",
                    help="write summary.json, README.md and plots to DIR instead of bench/results/<gpu-slug>/")
    group.addoption("--bench-append", action="store_true", default=False,
                    help="merge into an existing summary.json (same device): keep its rows this run did not measure")


def benchmarking(config) -> bool:
    return bool(config.getoption("--benchmark") or config.getoption("benchmark_only", False))


def pytest_configure(config):
    config.stash[RESULTS] = Results(config.getoption("--bench-out", None), config.getoption("--bench-append", False))
    if benchmarking(config) and torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError("TRITON_INTERPRET=1 would time the Triton interpreter on the GPU: unset it for bench/")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="speed suite: run `pytest bench/ --benchmark` (or `--benchmark-only`) to measure")
    for item in [] if benchmarking(config) else items:
        if BENCH_DIR in item.path.parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def results(request, device) -> Results:
    """The run's rows, and its env (device, versions, commit, the measured copy bandwidth) collected once."""
    results = request.config.stash[RESULTS]
    if results.env is None:
        results.env = collect_env(device)
    return results


@pytest.fixture(scope="session")
def device():
    """The GPU, else the CPU with one thread for the smoke set's tiny ops: a thread pool costs more than such an op
    (bench/NOTES.md)."""
    threads, cuda = torch.get_num_threads(), torch.cuda.is_available()
    torch.set_num_threads(threads if cuda else 1)
    yield torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.set_num_threads(threads)


def pytest_sessionfinish(session, exitstatus):
    results = session.config.stash.get(RESULTS, None)
    if benchmarking(session.config) and results is not None and results.rows and results.env is not None:
        results.finish()


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables: the last word is where real numbers come from
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = config.stash.get(RESULTS, None)
    if not benchmarking(config) or config.option.collectonly or results is None:
        return
    write = terminalreporter.write_line
    terminalreporter.section("sora bench")
    if not torch.cuda.is_available():
        write("GPU rows skipped: no CUDA device here (torch.cuda.is_available() is False), so only the CPU smoke set "
              "ran (tiny shapes, wall clock). Its numbers exercise the harness and are not results.")
    skipped = sum(1 for row in results.rows if row.get("skipped"))
    computed = sum(1 for row in results.rows if row.get("computed"))
    write(f"{len(results.rows)} rows ({skipped} skipped, {computed} computed, not timed)"
          + (f", copy bandwidth {results.env['copy_bandwidth_gbps']} GB/s" if results.env else ""))
    for path in results.written:
        write(f"wrote {path}")
    write(where_results_come_from(tiny=False)[-1])
