"""Measure the sampling cache on a trained tiny checkpoint: model calls, wall-clock time and quality against
the uncached video of the same prompt and noise seed.

    python scripts/cache_quality.py outputs/000-STDiT/epoch124-global_step2000 --seeds 1 11 21 \\
        --settings delta:0.4 first_block:0.16 interval:2
    python scripts/cache_quality.py CHECKPOINT --config configs/tiny/stdit2/sample.py --settings delta:0.4 interval:2

A setting is TRIGGER:VALUE: delta:THRESHOLD, first_block:THRESHOLD or interval:EVERY (sora.schedulers.cache,
max_skips at its default). Every seed samples scripts/score_tiny.py's six prompts (one batch, noise seeds 6 * seed
+ i) without the cache, with each setting, and without the cache again, all in this process, after one short
warm-up run that is not timed. The time ratios (time with the setting / the mean time of the two uncached runs,
summed over the seeds) thus come from one run on one machine, with a steady change of the machine's load
cancelled; each time is a whole sora.sample call (model build, sampling, decoding, writing), as wall-clock and as
this process's CPU time (all its threads), which other processes disturb less. The cache decides once per
batch, so its calls are counted per batch. Against the uncached video of the same prompt and seed, each
cached video gets the PSNR over all its frames and the SSIM (Gaussian window 11, sigma 1.5, on the luma Y =
0.299 R + 0.587 G + 0.114 B, valid region, averaged over frames), both of the written mp4 files as decoded. Every
video is also scored as score_tiny.py scores it (colour, moving, direction). It prints one line per sampling run,
then a Markdown table.
"""

import argparse
import os
import re
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from score_i2v import psnr
from score_tiny import PROMPTS, judge, non_negative, sample_seed, track_frames

from sora.data.video import read_video
from sora.schedulers.cache import TRIGGER_KEYS, check_cache

LUMA = (0.299, 0.587, 0.114)
AGAIN = "none, again"


def parse_setting(text):
    """'delta:0.1' -> the cache config dict(type="residual", trigger="delta", threshold=0.1) (interval: every);
    ValueError naming the bad setting."""
    trigger, _, value = text.partition(":")
    if trigger not in TRIGGER_KEYS or not value:
        raise ValueError(f"setting {text!r} is not TRIGGER:VALUE with TRIGGER one of {', '.join(TRIGGER_KEYS)} "
                         "(e.g. delta:0.1, first_block:0.05, interval:2)")
    key = TRIGGER_KEYS[trigger]
    try:
        number = int(value) if key == "every" else float(value)
    except ValueError:
        kind = "an integer" if key == "every" else "a number"
        raise ValueError(f"setting {text!r}: {value!r} is not {kind}") from None
    cache = {"type": "residual", "trigger": trigger, key: number}
    try:
        check_cache(cache)
    except ValueError as error:
        raise ValueError(f"setting {text!r}: {error}") from None
    return cache


def cache_flags(cache):
    """A cache config as sora.sample flags."""
    return [arg for key, value in cache.items() for arg in (f"--cache.{key}", str(value))]


def ssim(a, b):
    """SSIM of two videos (T, H, W, 3) in 0-255: on the luma, Gaussian window 11 with sigma 1.5, the valid region,
    the mean over pixels and frames; 1.0 when they are equal."""
    luma = torch.tensor(LUMA, dtype=torch.float64)
    x, y = (torch.as_tensor(np.asarray(v, np.float64)) @ luma for v in (a, b))
    x, y = x[:, None], y[:, None]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None])[None, None]

    def blur(z):
        return F.conv2d(z, window)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def model_calls(output):
    """(K, N) of the one 'model calls: K of N' line of sora.sample's output."""
    (calls,) = re.findall(r"^model calls: (\d+) of (\d+)$", output, re.MULTILINE)
    return int(calls[0]), int(calls[1])


def measure(checkpoint, seeds, settings, config="configs/tiny/sample.py", flags=()):
    """{name: {"calls": [(K, N) per seed], "seconds": [wall per seed], "cpu": [CPU seconds per seed],
    "counts": [judge() per video], "psnr": [per video], "ssim": [per video]}} for "none" (no cache), each
    setting's text (`settings` maps text -> cache config) and AGAIN, the uncached run repeated after the
    settings. `flags`: more sora.sample flags for every run."""
    runs = {"none": [], **{text: cache_flags(cache) for text, cache in settings.items()}, AGAIN: []}
    results = {name: {"calls": [], "seconds": [], "cpu": [], "counts": [], "psnr": [], "ssim": []} for name in runs}
    with tempfile.TemporaryDirectory() as warm:
        sample_seed(checkpoint, seeds[0], warm, config, [*flags, "--num-sampling-steps", "2"])
    for seed in seeds:
        with tempfile.TemporaryDirectory() as folder:
            references = []  # the uncached run's decoded videos, read once per seed (it runs first)
            for index, (name, extra) in enumerate(runs.items()):
                out = os.path.join(folder, str(index))
                start, cpu = time.perf_counter(), time.process_time()
                output = sample_seed(checkpoint, seed, out, config, [*flags, *extra])
                result = results[name]
                result["seconds"].append(time.perf_counter() - start)
                result["cpu"].append(time.process_time() - cpu)
                result["calls"].append(model_calls(output))
                for i, (colour, direction) in enumerate(PROMPTS):
                    path = os.path.join(out, f"sample_{i:04d}.mp4")
                    frames = read_video(path)[0].numpy()
                    result["counts"].append(judge(*track_frames(frames), colour, direction))
                    if index == 0:
                        references.append(frames)
                    result["psnr"].append(psnr(frames, references[i]))
                    result["ssim"].append(ssim(frames, references[i]))
                print(f"seed {seed}  {name:16s} model calls {result['calls'][-1][0]} of {result['calls'][-1][1]}  "
                      f"{result['seconds'][-1]:.1f} s (CPU {result['cpu'][-1]:.1f} s)  "
                      f"PSNR min {min(result['psnr'][-len(PROMPTS):]):.2f} dB", flush=True)
    return results


def table(results):
    """The Markdown table of measure()'s results. A time ratio divides by the mean of the two uncached runs."""
    base = {key: (sum(results["none"][key]) + sum(results[AGAIN][key])) / 2 for key in ("seconds", "cpu")}
    header = ("| cache | model calls K of N (mean) | fewer calls | wall-clock ratio | CPU time ratio | "
              "PSNR mean / min (dB) | SSIM mean / min | colour | moving | direction |")
    lines = [header, "|" + "---|" * 10]
    for name, result in results.items():
        calls = np.mean([k for k, _ in result["calls"]])
        steps = np.mean([n for _, n in result["calls"]])
        counts = {key: sum(c[key] for c in result["counts"]) for key in ("colour", "moving", "direction")}
        total = len(result["counts"])
        lines.append(f"| {name} | {calls:.1f} of {steps:.0f} | {steps / calls:.2f}x | "
                     f"{sum(result['seconds']) / base['seconds']:.2f} | {sum(result['cpu']) / base['cpu']:.2f} | "
                     f"{np.mean(result['psnr']):.2f} / "
                     f"{min(result['psnr']):.2f} | {np.mean(result['ssim']):.4f} / {min(result['ssim']):.4f} | "
                     f"{counts['colour']}/{total} | {counts['moving']}/{total} | {counts['direction']}/{total} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a training checkpoint folder (epoch...-global_step...)")
    parser.add_argument("--settings", nargs="+", required=True, help="TRIGGER:VALUE, e.g. delta:0.1 interval:2")
    parser.add_argument("--seeds", type=non_negative, nargs="+", default=[1, 11, 21])
    parser.add_argument("--config", default="configs/tiny/sample.py", help="the sample config the checkpoint fits")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.exit(2, f"error: --seeds {args.seeds} repeats a seed; a repeated seed repeats its draws\n")
    try:
        settings = {text: parse_setting(text) for text in args.settings}
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    results = measure(args.checkpoint, args.seeds, settings, args.config)
    print(f"{len(args.seeds) * len(PROMPTS)} videos, seeds {' '.join(map(str, args.seeds))}, {args.config}, "
          f"{args.checkpoint}; the uncached runs took {sum(results['none']['seconds']):.1f} s and "
          f"{sum(results[AGAIN]['seconds']):.1f} s in all")
    print(table(results))


if __name__ == "__main__":
    main()
