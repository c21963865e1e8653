"""Video data: file IO, CSV video-text datasets, Open-Sora v1.1 buckets and resumable samplers.

The names below are imported on first use, so that `sora.data.buckets` (crop_to, which the trainer's step
uses) imports without PyAV, and `python -m sora.data.synthetic` is not imported twice.
"""

import importlib

_WHERE = {
    "ASPECT_RATIOS": "buckets",
    "RESOLUTIONS": "buckets",
    "Bucket": "buckets",
    "get_closest_ratio": "buckets",
    "crop_to": "buckets",
    "VideoTextDataset": "datasets",
    "VariableVideoTextDataset": "datasets",
    "read_csv": "datasets",
    "resize_crop": "datasets",
    "StatefulDistributedSampler": "sampler",
    "VariableVideoBatchSampler": "sampler",
    "make_synthetic_dataset": "synthetic",
    "probe": "video",
    "read_image": "video",
    "read_video": "video",
    "save_sample": "video",
    "write_video": "video",
}
__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
