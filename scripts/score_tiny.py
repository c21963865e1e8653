"""Score a tiny-config checkpoint: does a sample show the prompted colour, and move the prompted way?

    python scripts/score_tiny.py outputs/000-STDiT/epoch124-global_step2000 [--seeds 1 2 3 4 5 6]
    python scripts/score_tiny.py none     # the untrained model, for comparison
    python scripts/score_tiny.py outputs/NNN-STDiT2/CHECKPOINT --config configs/tiny/stdit2/sample.py

Samples the six prompts "a {red,green,blue} square moving {left,right}" with configs/tiny/sample.py (or --config)
once per seed, then for each video finds the lit pixels of every frame: the colour is the brightest channel of their
mean, the motion the slope of their mean x position over the frames (px/frame). It prints a line per video and
the counts, nothing else. Every (seed, prompt) is its own draw: sora.sample seeds prompt i's noise with seed + i,
so seed s is sampled with --seed 6s, and prompt i of seed s gets the noise seed 6s + i, which no other pair
shares. Made for the synthetic data of README.md's tiny runs (--colors red,green,blue --shapes square).
"""

import argparse
import contextlib
import io
import os
import sys
import tempfile

import numpy as np

from sora.data.video import read_video
from sora.launch import main
from sora.sample import run

COLORS = ("red", "green", "blue")
DIRECTIONS = ("left", "right")
PROMPTS = tuple((c, d) for c in COLORS for d in DIRECTIONS)


def track(path, threshold=80):
    """(mean RGB of the lit pixels, x slope in px/frame), or (None, None) when no frame has lit pixels."""
    return track_frames(read_video(path)[0].numpy(), threshold)


def track_frames(frames, threshold=80):
    """track() of decoded (T, H, W, 3) frames."""
    frames = frames.astype(np.float64)
    xs, colours = [], []
    for t, frame in enumerate(frames):
        lit = frame.max(-1) > threshold
        if lit.any():
            xs.append((t, np.nonzero(lit)[1].mean()))
            colours.append(frame[lit].mean(0))
    if len(xs) < 2:
        return None, None
    t, x = np.array(xs).T
    return np.mean(colours, 0), np.polyfit(t, x, 1)[0]


def sample_quietly(argv):
    """Run sora.sample on argv with its output (config, weights line, bars, 'model calls' and 'wrote' lines)
    held back and returned; shown only when it fails."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
            main(run, "sample", argv)
    except SystemExit:
        sys.stderr.write(held.getvalue())
        raise
    return held.getvalue()


def sample_seed(checkpoint, seed, out, config="configs/tiny/sample.py", flags=()):
    """Sample the six prompts of seed `seed` (prompt i gets the noise seed 6 * seed + i) into the folder `out`
    as sample_0000.mp4 ... sample_0005.mp4 (PROMPTS' order), with more sora.sample `flags`; sora.sample's
    output."""
    prompts = [arg for c, d in PROMPTS for arg in ("--prompt", f"a {c} square moving {d}")]
    weights = [] if checkpoint == "none" else ["--ckpt-path", checkpoint]
    return sample_quietly([config, *weights, "--save-dir", out, "--seed", str(len(PROMPTS) * seed),
                           "--batch-size", str(len(PROMPTS)), *prompts, *flags])


def judge(rgb, slope, colour, direction):
    """{"colour", "moving", "direction"}: whether a video tracked as (rgb, slope) shows the prompted colour,
    moves (> 3 px/frame), and the prompted way; all False when nothing was lit (rgb None)."""
    if rgb is None:
        return {"colour": False, "moving": False, "direction": False}
    return {"colour": COLORS[int(np.argmax(rgb))] == colour, "moving": abs(slope) > 3,
            "direction": (slope < 0) == (direction == "left")}


def score(checkpoint, seeds, config="configs/tiny/sample.py"):
    counts = {"samples": 0, "colour": 0, "moving": 0, "direction": 0}
    for seed in seeds:
        with tempfile.TemporaryDirectory() as out:
            sample_seed(checkpoint, seed, out, config)
            for i, (colour, direction) in enumerate(PROMPTS):
                rgb, slope = track(os.path.join(out, f"sample_{i:04d}.mp4"))
                counts["samples"] += 1
                for key, right in judge(rgb, slope, colour, direction).items():
                    counts[key] += right
                if rgb is None:
                    print(f"seed {seed}  {colour:5s} {direction:5s}  nothing lit", flush=True)
                    continue
                print(f"seed {seed}  {colour:5s} {direction:5s}  mean RGB {np.round(rgb).astype(int)}  "
                      f"x slope {slope:+.2f} px/frame", flush=True)
    print(f"{counts['samples']} samples: colour right {counts['colour']}, moving (> 3 px/frame) "
          f"{counts['moving']}, direction right {counts['direction']}")
    return counts


def non_negative(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"seed {value} is negative; seeds are 0 or more")
    return value


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a training checkpoint folder (epoch...-global_step...), or none")
    parser.add_argument("--seeds", type=non_negative, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--config", default="configs/tiny/sample.py", help="the sample config the checkpoint fits")
    args = parser.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds} repeats a seed; a repeated seed repeats its draws")
    score(args.checkpoint, args.seeds, args.config)
