"""A tiny captioned video dataset: one coloured shape moving on a black background.

    python -m sora.data.synthetic OUT_DIR --num-videos 32 [--frames 16] [--size 64] [--fps 8] [--seed 0]
        [--colors red,green,blue] [--shapes square,circle] [--motions "moving left,moving right"] [--shape-size 0.2]
        [--append]

writes `OUT_DIR/clip_0000.mp4 ...` (h264, size x size) and `OUT_DIR/data.csv` with columns
`path,text,num_frames,height,width,aspect_ratio,fps` (paths relative to OUT_DIR). Captions say exactly
what is drawn: "a red square moving left", "a blue circle growing", "a yellow triangle staying still".
Moving shapes travel from one edge to the other over the clip; growing/shrinking ones change size
threefold. Everything is drawn from `numpy.random.default_rng(seed)`, so a seed gives the same files.
`--append` adds the clips to OUT_DIR's data.csv (numbered after its rows) instead of replacing it: run it with
other sizes and frame counts (`--frames 1`: images) for a set that fills several buckets.
"""

import argparse
import csv
import os

import numpy as np
import torch

from .video import write_video

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 60, 230),
    "yellow": (230, 220, 30),
    "cyan": (30, 210, 220),
    "magenta": (220, 40, 210),
    "white": (235, 235, 235),
}
SHAPES = ("square", "circle", "triangle")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking", "staying still")
CSV_COLUMNS = ("path", "text", "num_frames", "height", "width", "aspect_ratio", "fps")


def _mask(shape, x, y, cx, cy, r):
    if shape == "square":
        return (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    # triangle, apex up: half-width grows from 0 at the apex (cy - r) to r at the base (cy + r)
    return (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)


def render_clip(shape, color, motion, num_frames, size, rng, shape_size=None):
    """uint8 `(num_frames, size, size, 3)` frames of one shape; `rng` places it (a numpy Generator).
    `shape_size`: the shape's half-width as a fraction of the frame (default: drawn from 1/10 to 1/6)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    small, large = size / 12, size / 4
    if shape_size is not None:
        r = shape_size * size
    else:
        r = rng.uniform(size / 10, size / 6) if motion.startswith(("moving", "staying")) else large
    margin = r + 1
    cx, cy = rng.uniform(margin, size - margin, 2)
    frames = np.zeros((num_frames, size, size, 3), np.uint8)
    for f in range(num_frames):
        p = f / (num_frames - 1) if num_frames > 1 else 0.0
        travel = margin + (size - 2 * margin) * p  # from one edge to the other
        fx, fy, fr = cx, cy, r
        if motion == "moving left":
            fx = size - travel
        elif motion == "moving right":
            fx = travel
        elif motion == "moving up":
            fy = size - travel
        elif motion == "moving down":
            fy = travel
        elif motion == "growing":
            fr = small + (large - small) * p
        elif motion == "shrinking":
            fr = large - (large - small) * p
        frames[f][_mask(shape, x, y, fx, fy, fr)] = COLORS[color]
    return frames


def make_synthetic_dataset(out_dir, num_videos=32, num_frames=16, size=64, fps=8, seed=0,
                           colors=tuple(COLORS), shapes=SHAPES, motions=MOTIONS, shape_size=None, append=False):
    """Write the clips and `out_dir/data.csv`; returns the CSV path. `colors`, `shapes` and `motions` choose
    the vocabulary clips are drawn from, `shape_size` fixes the shapes' half-width as a fraction of the frame
    (a smaller vocabulary and bigger shapes are learned faster). `append`: keep the rows of an existing
    data.csv and number the new clips after them."""
    if shape_size is not None and not 0 < shape_size < 0.5:
        raise ValueError(f"shape_size {shape_size} must be a fraction of the frame in (0, 0.5)")
    for name, chosen, known in (("colors", colors, COLORS), ("shapes", shapes, SHAPES), ("motions", motions, MOTIONS)):
        unknown = [c for c in chosen if c not in known]
        if unknown or not chosen:
            raise ValueError(f"{name} {list(chosen)}: each must be one of {', '.join(known)}")
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "data.csv")
    rows = []
    if append and os.path.exists(csv_path):
        with open(csv_path, newline="", encoding="utf-8") as file:
            rows = list(csv.reader(file))[1:]
    rng = np.random.default_rng(seed)
    for i in range(len(rows), len(rows) + num_videos):
        shape, color, motion = rng.choice(shapes), rng.choice(colors), rng.choice(motions)
        name = f"clip_{i:04d}.mp4"
        frames = render_clip(shape, color, motion, num_frames, size, rng, shape_size)
        write_video(os.path.join(out_dir, name), torch.from_numpy(frames), fps=fps)
        rows.append((name, f"a {color} {shape} {motion}", num_frames, size, size, 1.0, fps))
    with open(csv_path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    return csv_path


def _at_least(minimum, even=False):
    def parse(text):
        value = int(text)
        if value < minimum or (even and value % 2):
            raise argparse.ArgumentTypeError(f"must be {'an even ' if even else 'an '}int >= {minimum}, got {text}")
        return value

    return parse


def _names(known):
    def parse(text):
        names = tuple(name.strip() for name in text.split(","))
        unknown = [name for name in names if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: each must be one of {', '.join(known)}")
        return names

    return parse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sora.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num-videos", type=_at_least(1), default=32)
    parser.add_argument("--frames", type=_at_least(1), default=16)
    parser.add_argument("--size", type=_at_least(16, even=True), default=64, help="height = width, even")
    parser.add_argument("--fps", type=_at_least(1), default=8)
    parser.add_argument("--seed", type=_at_least(0), default=0)
    parser.add_argument("--colors", type=_names(COLORS), default=tuple(COLORS), help="comma-separated; default: all")
    parser.add_argument("--shapes", type=_names(SHAPES), default=SHAPES, help="comma-separated; default: all")
    parser.add_argument("--motions", type=_names(MOTIONS), default=MOTIONS, help="comma-separated; default: all")
    parser.add_argument("--shape-size", type=float, help="half-width as a fraction of the frame, in (0, 0.5)")
    parser.add_argument("--append", action="store_true", help="add to OUT_DIR/data.csv instead of replacing it")
    args = parser.parse_args(argv)
    if args.shape_size is not None and not 0 < args.shape_size < 0.5:
        parser.error(f"--shape-size {args.shape_size} must be in (0, 0.5)")
    csv_path = make_synthetic_dataset(args.out_dir, args.num_videos, args.frames, args.size, args.fps, args.seed,
                                      args.colors, args.shapes, args.motions, args.shape_size, args.append)
    print(f"wrote {args.num_videos} clips ({args.frames} frames, {args.size}x{args.size}, {args.fps} fps) "
          f"to {args.out_dir} and their captions to {csv_path}{' (appended)' if args.append else ''}")


if __name__ == "__main__":
    main()
