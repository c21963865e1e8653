"""Score a tiny-config checkpoint: does a sample show the prompted colour, and move the prompted way?

    python scripts/score_tiny.py outputs/000-STDiT/epoch124-global_step2000 [--seeds 1 2 3]
    python scripts/score_tiny.py none     # the untrained model, for comparison
    python scripts/score_tiny.py outputs/NNN-STDiT2/CHECKPOINT --config configs/tiny/stdit2/sample.py

Samples "a {red,green,blue} square moving {left,right}" with configs/tiny/sample.py (or --config) for each seed,
then for each video finds the lit pixels of every frame: the colour is the brightest channel of their mean, the
motion the slope of their mean x position over the frames (px/frame). It prints a line per video and the counts.
Made for the synthetic data of README.md's tiny runs (--colors red,green,blue --shapes square).
"""

import argparse
import os
import tempfile

import numpy as np

from sora.data.video import read_video
from sora.launch import main
from sora.sample import run

COLORS = ("red", "green", "blue")
DIRECTIONS = ("left", "right")


def track(path, threshold=80):
    """(mean RGB of the lit pixels, x slope in px/frame), or (None, None) when no frame has lit pixels."""
    frames = read_video(path)[0].numpy().astype(np.float64)
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


def score(checkpoint, seeds, config="configs/tiny/sample.py"):
    prompts = [(c, d) for c in COLORS for d in DIRECTIONS]
    counts = {"samples": 0, "colour": 0, "moving": 0, "direction": 0}
    for seed in seeds:
        with tempfile.TemporaryDirectory() as out:
            flags = [arg for c, d in prompts for arg in ("--prompt", f"a {c} square moving {d}")]
            weights = [] if checkpoint == "none" else ["--ckpt-path", checkpoint]
            main(run, "sample", [config, *weights, "--save-dir", out, "--seed", str(seed), *flags])
            for i, (colour, direction) in enumerate(prompts):
                rgb, slope = track(os.path.join(out, f"sample_{i:04d}.mp4"))
                counts["samples"] += 1
                if rgb is None:
                    print(f"seed {seed}  {colour} {direction:5s}  nothing lit")
                    continue
                counts["colour"] += COLORS[int(np.argmax(rgb))] == colour
                counts["moving"] += abs(slope) > 3
                counts["direction"] += (slope < 0) == (direction == "left")
                print(f"seed {seed}  {colour} {direction:5s}  mean RGB {np.round(rgb).astype(int)}  "
                      f"x slope {slope:+.2f} px/frame")
    print(f"{counts['samples']} samples: colour right {counts['colour']}, moving (> 3 px/frame) "
          f"{counts['moving']}, direction right {counts['direction']}")
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--config", default="configs/tiny/sample.py", help="the sample config the checkpoint fits")
    args = parser.parse_args()
    score(args.checkpoint, args.seeds, args.config)
