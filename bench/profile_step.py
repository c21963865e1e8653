"""Where one STDiT-XL/2 training step spends its time, eager against sora: `python bench/profile_step.py`.

Profiles one `sora.train.train_step` (the step of bench/cases.py's train_step_full rows, built by bench/measure.py:
forward, backward, clipping, AdamW, EMA; random weights, a pre-encoded synthetic batch) with torch.profiler and
groups the device time of every kernel into matmuls, attention, normalisation, sora's kernels, layout copies and
other elementwise work, printing a markdown table per provider for bench/NOTES.md. Without CUDA it profiles the
tiny STDiT on the CPU (operator times), which only checks that the script runs.

    python bench/profile_step.py [--video 16x256x256] [--batch-size 4] [--out profile.md]
"""

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a package at the repository root

from bench.bench_utils import free_memory, synchronize  # noqa: E402
from bench.cases import VIDEOS, train_case  # noqa: E402
from bench.measure import train_step_fn  # noqa: E402

# First match wins: kernel (or, on CPU, operator) names -> category.
CATEGORIES = [
    ("sora kernels", r"_layernorm_modulate|_gated_residual|_temporal_copy|_temporal_attention"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("matmul", r"gemm|matmul|\bmm\b|addmm|bmm|cutlass|xmma|nvjet|linear|conv"),
    ("normalisation", r"layer_norm|layernorm|native_layer_norm"),
    ("layout copies", r"copy|transpose|permute|contiguous|cat|clone|stack"),
    ("elementwise", r"elementwise|vectorized|unrolled|mul|add|gelu|silu|tanh|where|fill"),
    ("reductions", r"reduce|sum|mean|norm"),
]


def category(name):
    return next((label for label, pattern in CATEGORIES if re.search(pattern, name.lower())), "other")


def profile(step, device):
    cuda = device.type == "cuda"
    for _ in range(2):  # warm-up: autotuning, cuBLAS handles, allocator
        step()
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
        synchronize(device)
    totals = defaultdict(float)
    for event in prof.key_averages():
        # Device kernels on CUDA; on the CPU only leaf operators, so nested ones are not counted twice.
        time_us = event.device_self_time_total if cuda else event.self_cpu_time_total
        if time_us > 0 and (cuda or not event.key.startswith("autograd::")):
            totals[category(event.key)] += time_us / 1000
    return totals


def table(results):
    totals = {provider: sum(times.values()) for provider, times in results.items()}
    lines = ["| category | " + " | ".join(f"{p} ms | {p} share" for p in results) + " |",
             "| --- |" + " --- | --- |" * len(results)]
    for label in [label for label, _ in CATEGORIES] + ["other"]:
        cells = [f"{times.get(label, 0.0):.2f} | {100 * times.get(label, 0.0) / totals[p]:.1f}%"
                 for p, times in results.items()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["| total | " + " | ".join(f"{total:.2f} | 100%" for total in totals.values()) + " |"])


def main():
    cuda = torch.cuda.is_available()
    videos = {video.label: video for video in VIDEOS[cuda]}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default=next(iter(videos)), choices=sorted(videos))
    parser.add_argument("--batch-size", type=int, default=4 if cuda else 2)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    results = {}
    for provider in ("eager", "sora"):
        torch.manual_seed(0)
        case = train_case("train_step_full", "STDiT-XL/2", videos[args.video], False, provider, cuda)
        step, _ = train_step_fn(case, args.batch_size, device)
        results[provider] = profile(step, device)
        del step
        free_memory()
    where = torch.cuda.get_device_name() if cuda else "CPU (tiny STDiT: a check that the script runs, not a result)"
    report = (f"One training step (sora.train.train_step: forward, backward, clipping, AdamW, EMA), "
              f"{case.fields['model']} {args.video}, batch {args.batch_size}, {case.fields['dtype']}, on {where}; "
              f"device time per kernel category:\n\n{table(results)}\n")
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
