"""Lay the frames of videos side by side in one PNG, a row per video: `python scripts/frame_grid.py OUT.png A.mp4 B.mp4 ...`

Used to show samples in README.md. `--labels` puts a caption left of each row.
"""

import argparse

import numpy as np
from PIL import Image, ImageDraw

from sora.data.video import read_video


def frame_grid(paths, labels=None, scale=2, label_width=260):
    rows = []
    for i, path in enumerate(paths):
        frames = read_video(path)[0].numpy()  # (T, H, W, 3)
        row = np.concatenate(list(frames), axis=1)
        image = Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
        if labels:
            canvas = Image.new("RGB", (image.width + label_width, image.height), "white")
            canvas.paste(image, (label_width, 0))
            ImageDraw.Draw(canvas).text((6, image.height // 2 - 6), labels[i], fill="black")
            image = canvas
        rows.append(np.asarray(image))
    width = max(row.shape[1] for row in rows)  # videos of other lengths: pad their rows with white
    rows = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    return Image.fromarray(np.concatenate(rows, axis=0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("videos", nargs="+")
    parser.add_argument("--labels", nargs="+")
    args = parser.parse_args()
    if args.labels and len(args.labels) != len(args.videos):
        parser.error(f"{len(args.labels)} labels for {len(args.videos)} videos")
    frame_grid(args.videos, args.labels).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
