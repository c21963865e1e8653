"""The speed suite: one test per case of bench/cases.py, measured by bench/measure.py's run_case through
pytest-benchmark (bench/conftest.py writes the rows and the report)."""

import pytest
import torch

from bench.bench_utils import Timer
from bench.cases import cases


@pytest.mark.parametrize("case", cases(torch.cuda.is_available()), ids=str)
def test_bench(case, benchmark, results, device):
    from bench.measure import run_case

    benchmark.group = f"{case.bench} {case.row().get('video') or case.row().get('shape', '')}"
    row = run_case(case, Timer(device, results.env["copy_bandwidth_gbps"], benchmark), results.add)
    benchmark.extra_info.update(row)
    if row["skipped"]:
        benchmark.skipped = True  # tells pytest-benchmark the fixture was left unused on purpose
        pytest.skip(row["skipped"])
