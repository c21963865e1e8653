"""Where one STDiT-XL/2 training step (train_step_full, pre-encoded) spends its time, eager against sora: the kernels
with the most self time after two warm-up steps (CPU operators, tiny STDiT, without CUDA), for bench/NOTES.md.

    python bench/profile_step.py [--video 16x256x256] [--batch-size 4] [--rows 25] [--out profile.md]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a package at the repository root

from bench.bench_utils import free_memory, synchronize  # noqa: E402
from bench.cases import VIDEOS, train_case  # noqa: E402
from bench.measure import train_step_fn  # noqa: E402
from bench.report import OneLineParser  # noqa: E402


def main(argv=None):
    cuda = torch.cuda.is_available()
    videos = {video.label: video for video in VIDEOS[cuda]}
    parser = OneLineParser(prog="python bench/profile_step.py", description=__doc__.splitlines()[0])
    parser.add_argument("--video", default=next(iter(videos)), choices=sorted(videos))
    parser.add_argument("--batch-size", type=int, default=4 if cuda else 2)
    parser.add_argument("--rows", type=int, default=25, help="kernels (operators) shown per provider")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.rows < 1:
        parser.error(f"--batch-size and --rows must be at least 1, got {args.batch_size} and {args.rows}")
    device = torch.device("cuda" if cuda else "cpu")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    where = torch.cuda.get_device_name() if cuda else "CPU (tiny STDiT: a check that the script runs, not a result)"
    report = []
    for provider in ("eager", "sora"):
        torch.manual_seed(0)
        case = train_case("train_step_full", "STDiT-XL/2", videos[args.video], False, provider, cuda)
        step, _ = train_step_fn(case, args.batch_size, device)
        for _ in range(2):  # warm-up: autotuning, cuBLAS handles, allocator, optimizer state
            step()
        synchronize(device)
        with torch.profiler.profile(activities=activities) as prof:
            step()
            synchronize(device)
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        report += [f"## {provider}: one training step (sora.train.train_step), {case.fields['model']} {args.video}, "
                   f"batch {args.batch_size}, {case.fields['dtype']}, on {where}", "",
                   prof.key_averages().table(sort_by=sort, row_limit=args.rows), ""]
        del step
        free_memory()
    print("\n".join(report))
    if args.out:
        Path(args.out).write_text("\n".join(report))


if __name__ == "__main__":
    main()
