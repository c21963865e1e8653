"""Score image-to-video and loop samples: how close is a sample's first frame to its reference, and how smooth is
the seam where a loop's second clip starts?

    python scripts/score_i2v.py SAMPLE.mp4 --reference REFERENCE [--vae-factor 16]
    python scripts/score_i2v.py SAMPLE.mp4 --seam-at 8

--reference: PSNR (dB) of the sample's first frame against the reference's first frame, read and resized to the
sample's size as sampling reads references (sora.reference.read_reference). With --vae-factor F it also prints
the PSNR of the reference through PixelVAE(F) and back: the most a sample of a PixelVAE config can reach.
--seam-at T: the sample is a loop's video whose frame T is the first one the second clip generated (T = the
config's num_frames for --loop 2); it prints the PSNR between frames T - 1 and T and the mean absolute change
(0-255) across the seam next to the median change between consecutive frames elsewhere.
"""

import argparse

import numpy as np
import torch

from sora.data.video import read_video
from sora.models.vae import PixelVAE
from sora.reference import read_reference


def psnr(a, b):
    """PSNR in dB of two uint8-range frames (float arrays of equal shape); inf when they are equal."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _to_uint8_range(video):
    """float (3, T, H, W) in [-1, 1] -> float64 (T, H, W, 3) in [0, 255]."""
    return ((video.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 3, 0).double().numpy()


def first_frame(sample_path, reference_path, vae_factor=None):
    """{"psnr": sample frame 0 vs reference frame 0, "vae_psnr": the reference's PixelVAE round trip vs itself
    (only with vae_factor)}."""
    frames = read_video(sample_path)[0].numpy()
    reference = read_reference(reference_path, frames.shape[1:3])[:, :1]
    scores = {"psnr": psnr(frames[0], _to_uint8_range(reference)[0])}
    if vae_factor is not None:
        vae = PixelVAE(vae_factor)
        with torch.no_grad():
            round_trip = vae.decode(vae.encode(reference[None]))[0]
        scores["vae_psnr"] = psnr(_to_uint8_range(round_trip)[0], _to_uint8_range(reference)[0])
    return scores


def seam(sample_path, at):
    """{"psnr": frame at - 1 vs frame at, "seam_change": mean |frame at - frame at - 1|, "median_change": the median
    of that over every other pair of consecutive frames}."""
    frames = read_video(sample_path)[0].numpy().astype(np.float64)
    if len(frames) < 3 or not 0 < at < len(frames):
        raise ValueError(f"--seam-at {at} must be in [1, {len(frames) - 1}] of a video of 3 or more frames, "
                         f"{sample_path} has {len(frames)}")
    changes = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    return {"psnr": psnr(frames[at - 1], frames[at]), "seam_change": float(changes[at - 1]),
            "median_change": float(np.median(np.delete(changes, at - 1)))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sample")
    parser.add_argument("--reference", help="the image or video the sample was conditioned on")
    parser.add_argument("--vae-factor", type=int, help="the PixelVAE factor of the sample config")
    parser.add_argument("--seam-at", type=int, help="index of the first frame the second clip generated")
    args = parser.parse_args(argv)
    if args.reference is None and args.seam_at is None:
        parser.error("give --reference REFERENCE and/or --seam-at T")
    try:
        if args.reference is not None:
            scores = first_frame(args.sample, args.reference, args.vae_factor)
            print(f"first frame vs reference: PSNR {scores['psnr']:.2f} dB" + (
                f" (the reference through PixelVAE({args.vae_factor}): {scores['vae_psnr']:.2f} dB)"
                if "vae_psnr" in scores else ""))
        if args.seam_at is not None:
            scores = seam(args.sample, args.seam_at)
            print(f"seam at frame {args.seam_at}: PSNR {scores['psnr']:.2f} dB, mean change "
                  f"{scores['seam_change']:.2f} vs median {scores['median_change']:.2f} between the other consecutive frames")
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
