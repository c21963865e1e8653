"""Where one STDiT-XL/2 training step spends its time, eager against sora: `python bench/profile_step.py`.

Profiles forward + backward of a bf16 training step (random weights, synthetic batch) with torch.profiler and
groups the device time of every kernel into matmuls, attention, normalisation, sora's kernels, layout copies and
other elementwise work, printing a markdown table per provider for bench/NOTES.md. Without CUDA it profiles a
tiny STDiT on the CPU (operator times), which only checks that the script runs.

    python bench/profile_step.py [--video 16x256] [--batch-size 4] [--out profile.md]
"""

import argparse
import re
from collections import defaultdict

import torch

from sora.models import build_model

# First match wins: kernel (or, on CPU, operator) names -> category.
CATEGORIES = [
    ("sora kernels", r"_layernorm_modulate|_gated_residual|_temporal_copy"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("matmul", r"gemm|matmul|\bmm\b|addmm|bmm|cutlass|xmma|nvjet|linear|conv"),
    ("normalisation", r"layer_norm|layernorm|native_layer_norm"),
    ("layout copies", r"copy|transpose|permute|contiguous|cat|clone|stack"),
    ("elementwise", r"elementwise|vectorized|unrolled|mul|add|gelu|silu|tanh|where|fill"),
    ("reductions", r"reduce|sum|mean|norm"),
]
VIDEOS = {"16x256": (16, 32, 32), "16x512": (16, 64, 64), "64x512": (64, 64, 64)}


def category(name):
    lowered = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return label
    return "other"


def training_step(model, batch_size, latent, device, dtype):
    x = torch.randn(batch_size, 4, *latent, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch_size,), device=device)
    y = torch.randn(batch_size, 1, model.y_embedder.y_embedding.shape[0], model.caption_channels, device=device,
                    dtype=dtype)
    mask = torch.ones(batch_size, y.shape[2], dtype=torch.long, device=device)
    mask[:, y.shape[2] // 2:] = 0  # captions padded to half the length, as T5 prompts are

    def step():
        model(x, t, y, mask).float().square().mean().backward()

    return step


def profile(step, device):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for _ in range(2):  # warm-up: autotuning, cuBLAS handles, allocator
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    totals = defaultdict(float)
    for event in prof.key_averages():
        # Device kernels on CUDA; on the CPU only leaf operators, so nested ones are not counted twice.
        time_us = event.device_self_time_total if device.type == "cuda" else event.self_cpu_time_total
        if time_us > 0 and (device.type == "cuda" or not event.key.startswith("autograd::")):
            totals[category(event.key)] += time_us / 1000
    return totals


def table(results):
    labels = [label for label, _ in CATEGORIES] + ["other"]
    providers = list(results)
    lines = ["| category | " + " | ".join(f"{p} ms | {p} share" for p in providers) + " |",
             "| --- |" + " --- | --- |" * len(providers)]
    for label in labels:
        cells = []
        for provider in providers:
            total = sum(results[provider].values())
            value = results[provider].get(label, 0.0)
            cells.append(f"{value:.2f} | {100 * value / total:.1f}%")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| total | " + " | ".join(f"{sum(r.values()):.2f} | 100%" for r in results.values()) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default="16x256", choices=sorted(VIDEOS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        cfg, latent, batch_size = dict(type="STDiT-XL/2", enable_flashattn=True), VIDEOS[args.video], args.batch_size
    else:
        cfg = dict(type="STDiT", depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=8)
        latent, batch_size = (4, 8, 8), 2
    results = {}
    for provider, kernels in (("eager", False), ("sora", True)):
        torch.manual_seed(0)
        model = build_model(cfg, input_size=latent, enable_layernorm_kernel=kernels,
                            grad_checkpoint=args.video == "64x512").to(device, dtype).train()
        results[provider] = profile(training_step(model, batch_size, latent, device, dtype), device)
        del model
        if cuda:
            torch.cuda.empty_cache()
    where = torch.cuda.get_device_name() if cuda else "CPU (tiny STDiT: a check that the script runs, not a result)"
    report = (f"One training step (forward + backward, no optimizer), {cfg['type']} {args.video if cuda else 'tiny'}, "
              f"batch {batch_size}, {dtype}, on {where}; device time per kernel category:\n\n{table(results)}\n")
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
