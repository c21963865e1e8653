"""Video data: file IO, CSV video-text datasets, Open-Sora v1.1 buckets and resumable samplers."""

from .buckets import ASPECT_RATIOS, RESOLUTIONS, Bucket, get_closest_ratio
from .datasets import VariableVideoTextDataset, VideoTextDataset, read_csv, resize_crop
from .sampler import StatefulDistributedSampler, VariableVideoBatchSampler
from .video import probe, read_image, read_video, save_sample, write_video

__all__ = [
    "ASPECT_RATIOS",
    "RESOLUTIONS",
    "Bucket",
    "get_closest_ratio",
    "VideoTextDataset",
    "VariableVideoTextDataset",
    "read_csv",
    "resize_crop",
    "StatefulDistributedSampler",
    "VariableVideoBatchSampler",
    "make_synthetic_dataset",
    "probe",
    "read_image",
    "read_video",
    "save_sample",
    "write_video",
]


def __getattr__(name):
    # sora.data.synthetic is also a script (python -m sora.data.synthetic): importing it here, before runpy
    # runs it, would make Python warn that the module was already imported.
    if name == "make_synthetic_dataset":
        from .synthetic import make_synthetic_dataset

        return make_synthetic_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
