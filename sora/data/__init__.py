"""Video data: file IO, CSV video-text datasets, Open-Sora v1.1 buckets and resumable samplers."""

from .buckets import ASPECT_RATIOS, RESOLUTIONS, Bucket, get_closest_ratio
from .datasets import VariableVideoTextDataset, VideoTextDataset, read_csv, resize_crop
from .sampler import StatefulDistributedSampler, VariableVideoBatchSampler
from .synthetic import make_synthetic_dataset
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
