"""The speed suite's switches, session facts and results writer.

`pytest bench/ --benchmark` (or pytest-benchmark's own `--benchmark-only`) runs the suite; without either,
every bench test is skipped with a reason. Rows go to bench/results/<gpu-slug>/summary.json (or --bench-out)
as they are measured; at the end of the session README.md (tables) and plots are written beside it. On a machine without CUDA only the CPU smoke
set runs (tiny shapes, wall clock), written to bench/results/cpu-smoke/, which git ignores.
"""

import os
from pathlib import Path

import pytest
import torch

from bench.bench_utils import Results, bench_device, collect_env, free_memory, on_cuda

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
    out = config.getoption("--bench-out", None)
    config.stash[RESULTS] = Results(Path(out) if out else None, config.getoption("--bench-append", False))
    if benchmarking(config) and on_cuda() and os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError("TRITON_INTERPRET=1 would time the Triton interpreter on the GPU: unset it for bench/")


def pytest_collection_modifyitems(config, items):
    if benchmarking(config):
        return
    skip = pytest.mark.skip(reason="speed suite: run `pytest bench/ --benchmark` (or `--benchmark-only`) to measure")
    for item in items:
        if BENCH_DIR in item.path.parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def results(request) -> Results:
    return request.config.stash[RESULTS]


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def bench_env(results, device) -> dict:
    """Device, versions, commit and the measured copy bandwidth, once per run."""
    if results.env is None:
        results.env = collect_env(device)
    return results.env


@pytest.fixture(scope="session", autouse=True)
def _one_thread_on_cpu(device):
    """The CPU smoke set runs tiny ops, where handing each to a thread pool costs more than the op itself
    (2 ms per op against 30 us on one thread, seen on a 2-core sandbox): one thread there."""
    if device.type == "cuda":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each case starts from an empty allocator cache and no compiled graphs of earlier cases."""
    yield
    free_memory()


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    results = config.stash.get(RESULTS, None)
    if results is None or not results.rows or not benchmarking(config) or results.env is None:
        return
    results.finish()


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables: the last word is where real numbers come from
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not benchmarking(config) or config.option.collectonly:
        return
    results = config.stash.get(RESULTS, None)
    write = terminalreporter.write_line
    terminalreporter.section("sora bench")
    if not on_cuda():
        write("GPU rows skipped: no CUDA device here (torch.cuda.is_available() is False), so only the CPU smoke set "
              "ran (tiny shapes, wall clock). Its numbers exercise the harness and are not results.")
    if results is None or not results.rows:
        write("no rows recorded")
    else:
        skipped = sum(1 for row in results.rows if row.get("skipped"))
        computed = sum(1 for row in results.rows if row.get("computed"))
        write(f"{len(results.rows)} rows ({skipped} skipped, {computed} computed, not timed), "
              f"copy bandwidth {results.env['copy_bandwidth_gbps']} GB/s")
        for path in results.written:
            write(f"wrote {path}")
    from bench.gpu_check import where_results_come_from

    write(where_results_come_from(tiny=False)[-1])
