"""Open-Sora v1.1's three-level bucket: resolution, then frame count, then aspect ratio.

`bucket_config` maps a resolution name to `{num_frames: (keep_prob, batch_size)}`, e.g.

    {"240p": {16: (1.0, 16), 32: (1.0, 8)}, "256": {1: (1.0, 256)}, "480p": {16: (0.5, 4), 32: (0.0, None)}}

A sample of T frames and H x W pixels is placed as Open-Sora v1.1's `Bucket.get_bucket_id` places it:
resolutions are tried largest first; one qualifies when H * W >= 0.8 x its pixel count. Within it, an
image (T == 1) can only go to the 1-frame bucket, a video only to the largest t != 1 with
T > t * frame_interval. That (resolution, t) bucket keeps the sample with probability keep_prob, else
the next lower resolution is tried (not a smaller t of the same resolution); `(0.0, None)` disables a
bucket. The aspect ratio is the key of the resolution's table closest to H / W, and the table gives the
(H, W) the sample is resized and cropped to; `crop_to` then trims it to whole latent patches.
"""

import math

import numpy as np

# Pixel count of each named resolution (Open-Sora v1.1 aspect.py).
RESOLUTIONS = {
    "144p": 36864,
    "256": 65536,
    "240p": 102240,
    "360p": 230400,
    "512": 262144,
    "480p": 409920,
    "720p": 921600,
    "1024": 1048576,
    "1080p": 2073600,
    "4k": 8294400,
}
PIXEL_FRACTION = 0.8  # a sample qualifies for a resolution with at least this share of its pixels

# Open-Sora's own tables: 17 ratios (H / W), sizes from `_even_hw`, except where the released tables differ.
_OPEN_SORA_RATIOS = (3 / 8, 9 / 21, 0.48, 1 / 2, 9 / 17, 1 / 1.85, 9 / 16, 5 / 8, 2 / 3, 3 / 4, 1.0,
                     4 / 3, 3 / 2, 16 / 9, 17 / 9, 2.0, 1 / 0.48)
_RELEASED_EXCEPTIONS = {
    "144p": {"0.38": (117, 312), "0.43": (125, 291), "0.48": (133, 277), "0.50": (135, 270),
             "0.53": (139, 262), "0.54": (141, 260), "0.62": (151, 241), "0.75": (166, 221),
             "1.33": (221, 165), "1.50": (235, 156), "1.89": (263, 139), "2.00": (271, 135),
             "2.08": (277, 132)},
    "240p": {"0.67": (262, 393)},
    "480p": {"0.48": (444, 925), "1.33": (740, 555)},
}
# PixArt's table at 1024 (key, H, W); the 512 and 256 tables are it divided by 2 and 4.
_PIXART_1024 = (
    ("0.25", 512, 2048), ("0.26", 512, 1984), ("0.27", 512, 1920), ("0.28", 512, 1856), ("0.32", 576, 1792),
    ("0.33", 576, 1728), ("0.35", 576, 1664), ("0.4", 640, 1600), ("0.42", 640, 1536), ("0.48", 704, 1472),
    ("0.5", 704, 1408), ("0.52", 704, 1344), ("0.57", 768, 1344), ("0.6", 768, 1280), ("0.68", 832, 1216),
    ("0.72", 832, 1152), ("0.78", 896, 1152), ("0.82", 896, 1088), ("0.88", 960, 1088), ("0.94", 960, 1024),
    ("1.0", 1024, 1024), ("1.07", 1024, 960), ("1.13", 1088, 960), ("1.21", 1088, 896), ("1.29", 1152, 896),
    ("1.38", 1152, 832), ("1.46", 1216, 832), ("1.67", 1280, 768), ("1.75", 1344, 768), ("2.0", 1408, 704),
    ("2.09", 1472, 704), ("2.4", 1536, 640), ("2.5", 1600, 640), ("2.89", 1664, 576), ("3.0", 1728, 576),
    ("3.11", 1792, 576), ("3.62", 1856, 512), ("3.75", 1920, 512), ("3.88", 1984, 512), ("4.0", 2048, 512),
)


def _even_hw(ratio, pixels, eps=1e-4):
    """Open-Sora's `get_h_w`: H ~ sqrt(pixels * ratio), W ~ H / ratio, each rounded to an even side when one is near."""
    h = math.sqrt(pixels * ratio) + eps
    h = math.ceil(h) if math.ceil(h) % 2 == 0 else math.floor(h)
    w = h / ratio + eps
    w = math.ceil(w) if math.ceil(w) % 2 == 0 else math.floor(w)
    return h, w


def _aspect_ratio_table(name):
    pixels = RESOLUTIONS[name]
    if name in ("256", "512", "1024"):
        divisor = 1024 // math.isqrt(pixels)  # a side divisor: 1, 2, 4
        return {key: (h // divisor, w // divisor) for key, h, w in _PIXART_1024}
    table = {f"{ratio:.2f}": _even_hw(ratio, pixels) for ratio in _OPEN_SORA_RATIOS}
    table.update(_RELEASED_EXCEPTIONS.get(name, {}))
    return table


# name -> {ratio key (H / W, as a string): (H, W)}
ASPECT_RATIOS = {name: _aspect_ratio_table(name) for name in RESOLUTIONS}


def get_closest_ratio(height, width, ratios):
    """The key of `ratios` closest to height / width."""
    aspect_ratio = height / width
    return min(ratios, key=lambda key: abs(float(key) - aspect_ratio))


def _validate(bucket_config):
    if not isinstance(bucket_config, dict) or not bucket_config:
        raise ValueError(f"bucket_config must be a non-empty dict of resolution -> {{num_frames: (keep_prob, batch_size)}}, got {bucket_config!r}.")
    for name, frames in bucket_config.items():
        if name not in RESOLUTIONS:
            raise ValueError(f"bucket_config has unknown resolution {name!r}; known: {', '.join(RESOLUTIONS)}.")
        if not isinstance(frames, dict) or not frames:
            raise ValueError(f"bucket_config[{name!r}] must be a non-empty dict of num_frames -> (keep_prob, batch_size), got {frames!r}.")
        for t, entry in frames.items():
            where = f"bucket_config[{name!r}][{t!r}] = {entry!r}"
            if isinstance(t, bool) or not isinstance(t, int) or t < 1:
                raise ValueError(f"{where}: num_frames must be a positive int.")
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise ValueError(f"{where}: must be a (keep_prob, batch_size) pair.")
            keep_prob, batch_size = entry
            if isinstance(keep_prob, bool) or not isinstance(keep_prob, (int, float)) or not 0 <= keep_prob <= 1:
                raise ValueError(f"{where}: keep_prob must be a number in [0, 1].")
            if keep_prob > 0 and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
                raise ValueError(f"{where}: batch_size must be a positive int when keep_prob > 0.")


class Bucket:
    """Bucket ids are `(resolution, num_frames, aspect_ratio_key)`, e.g. `("240p", 16, "0.56")`."""

    def __init__(self, bucket_config):
        _validate(bucket_config)
        self.resolutions = sorted(bucket_config, key=RESOLUTIONS.get, reverse=True)
        self.frames = {name: sorted(bucket_config[name], reverse=True) for name in self.resolutions}
        self.keep_prob = {}
        self.batch_size = {}
        for name in self.resolutions:
            for t in self.frames[name]:
                self.keep_prob[name, t], self.batch_size[name, t] = bucket_config[name][t]
        # every (resolution, t) level owns one uniform draw of a sample's random vector
        self.levels = {level: i for i, level in enumerate(self.keep_prob)}

    def __len__(self):
        """Number of (resolution, num_frames, aspect ratio) buckets."""
        return sum(len(self.frames[name]) * len(ASPECT_RATIOS[name]) for name in self.resolutions)

    def _frames_for(self, name, T, frame_interval):
        if T == 1:
            return 1 if 1 in self.frames[name] else None
        return next((t for t in self.frames[name] if t != 1 and T > t * frame_interval), None)

    def get_bucket_id(self, T, H, W, frame_interval=1, seed=None):
        """`(resolution, num_frames, aspect_ratio_key)` for a sample of T frames of H x W, or None when no bucket keeps it.

        `seed` (an int or a tuple of ints, e.g. `(seed, epoch, index)`) makes the keep_prob draws
        deterministic; None draws fresh randomness.
        """
        draws = None
        for name in self.resolutions:
            if H * W < PIXEL_FRACTION * RESOLUTIONS[name]:
                continue
            t = self._frames_for(name, T, frame_interval)
            if t is None:
                continue
            keep_prob = self.keep_prob[name, t]
            if keep_prob < 1:
                if draws is None:
                    draws = np.random.default_rng(seed).random(len(self.levels))
                if draws[self.levels[name, t]] >= keep_prob:
                    continue
            return name, t, get_closest_ratio(H, W, ASPECT_RATIOS[name])
        return None

    def candidates(self, T, H, W, frame_interval=1):
        """Every bucket id `get_bucket_id` may give this sample in some epoch (largest resolution first):
        the keep_prob draws pick one of these, or none."""
        found = []
        for name in self.resolutions:
            t = self._frames_for(name, T, frame_interval) if H * W >= PIXEL_FRACTION * RESOLUTIONS[name] else None
            if t is not None and self.keep_prob[name, t] > 0:
                found.append((name, t, get_closest_ratio(H, W, ASPECT_RATIOS[name])))
                if self.keep_prob[name, t] >= 1:
                    break  # always kept here: lower resolutions are never tried
        return found

    def get_thw(self, bucket_id):
        """`(T, H, W)` a sample of this bucket is cut and resized to."""
        name, t, ratio = bucket_id
        height, width = ASPECT_RATIOS[name][ratio]
        return t, height, width

    def get_prob(self, bucket_id):
        return self.keep_prob[bucket_id[0], bucket_id[1]]

    def get_batch_size(self, bucket_id):
        return self.batch_size[bucket_id[0], bucket_id[1]]


def crop_to(x, multiple):
    """Centre-crop (B, C, T, H, W) so H and W are multiples of `multiple` (bucket sizes need not be)."""
    H, W = x.shape[-2:]
    top, left = (H % multiple) // 2, (W % multiple) // 2
    return x[..., top:top + H - H % multiple, left:left + W - W % multiple]
