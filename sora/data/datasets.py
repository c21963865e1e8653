"""CSV video-text datasets (Open-Sora v1.0 `DatasetFromCSV`, v1.1 `VariableVideoTextDataset`).

CSV columns: `path,text` required; `num_frames,height,width,aspect_ratio,fps` optional (the variable
dataset uses the first three to place samples in buckets, and probes the files when they are absent).
A relative `path` is joined to `root`, or, when `root` is None, to the CSV's own folder.

Samples come out as `video` float `(3, T, H, W)` in [-1, 1]:
- T frames are taken `frame_interval` apart from a random start (`start + i * frame_interval`), the start
  drawn from a generator seeded by (seed, epoch, index), so a sample is the same until `set_epoch`.
  A clip shorter than the span is padded by repeating its last frame.
- Images are 1-frame clips repeated to T frames, as Open-Sora v1.0 does.
- Frames are resized (bilinear, antialiased) keeping the aspect ratio until they cover the target size,
  then center-cropped to it: for a square target that is "shorter side to target, then center crop".
- A file that cannot be read is skipped with one warning naming it, and the next index is returned.
"""

import csv
import os
import warnings

import av
import numpy as np
import torch
import torch.nn.functional as F

from .video import is_image_path, probe, read_image, read_video

IMAGE_FPS = 120  # the fps Open-Sora v1.1 reports for images
TRANSFORMS = (None, "center", "resize_crop")  # all three: resize to cover, then center crop
_REQUIRED = ("path", "text")
_INT_COLUMNS = ("num_frames", "height", "width")
_FLOAT_COLUMNS = ("aspect_ratio", "fps")
_DECODE_ERRORS = (OSError, ValueError, RuntimeError, EOFError, av.FFmpegError)


def seed_from(*values):
    """One 63-bit seed from several non-negative ints, e.g. (seed, epoch, index), for a torch.Generator."""
    return int(np.random.SeedSequence(values).generate_state(1, np.uint64)[0] >> np.uint64(1))


def read_csv(data_path):
    """Rows of a dataset CSV as dicts; the optional numeric columns are parsed (an empty cell is None)."""
    data_path = str(data_path)
    if os.path.isdir(data_path):
        raise ValueError(f"dataset {data_path} is a folder without index.json; expected a CSV of path,text rows "
                         "or a folder written by python -m sora.preprocess")
    if not os.path.isfile(data_path):
        raise FileNotFoundError(f"dataset CSV not found: {data_path}")
    with open(data_path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
        columns = reader.fieldnames or []
    if not columns:
        raise ValueError(f"dataset CSV {data_path} is empty")
    missing = [name for name in _REQUIRED if name not in columns]
    if missing:
        raise ValueError(f"dataset CSV {data_path} lacks column(s) {missing}; found {columns}")
    if not rows:
        raise ValueError(f"dataset CSV {data_path} has a header but no rows")
    for line, row in enumerate(rows, start=2):
        for name, kind in [(name, int) for name in _INT_COLUMNS] + [(name, float) for name in _FLOAT_COLUMNS]:
            if name not in row:
                continue
            value = (row[name] or "").strip()
            try:
                row[name] = kind(float(value)) if value else None
            except ValueError:
                raise ValueError(f"dataset CSV {data_path} line {line}: column {name} = {value!r} is not a number") from None
    return rows


def frame_indices(total, num_frames, frame_interval, generator):
    """`num_frames` indices `frame_interval` apart from a random start; past the clip's end, the last frame."""
    span = (num_frames - 1) * frame_interval + 1
    start = int(torch.randint(0, max(total - span, 0) + 1, (1,), generator=generator))
    return (start + frame_interval * torch.arange(num_frames)).clamp(max=total - 1)


def resize_crop(frames, size):
    """uint8 `(T, H, W, 3)` -> float `(3, T, h, w)` in [-1, 1]: resize to cover (h, w) keeping the aspect ratio, center crop."""
    height, width = size
    video = frames.permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    scale = max(height / video.shape[2], width / video.shape[3])
    covered = (max(height, round(video.shape[2] * scale)), max(width, round(video.shape[3] * scale)))
    if covered != tuple(video.shape[2:]):
        video = F.interpolate(video, size=covered, mode="bilinear", align_corners=False, antialias=True)
    top, left = (covered[0] - height) // 2, (covered[1] - width) // 2
    video = video[:, :, top : top + height, left : left + width]
    return (video / 127.5 - 1).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _ClipTable(torch.utils.data.Dataset):
    """What both datasets share: the CSV, path resolution, loading one clip, and skipping unreadable files."""

    def __init__(self, data_path, frame_interval, root, transform_name, seed, use_image_transform=False):
        if transform_name not in TRANSFORMS:
            raise ValueError(f"transform_name must be one of {TRANSFORMS}, got {transform_name!r}")
        self.data_path = str(data_path)
        self.rows = read_csv(self.data_path)
        self.frame_interval = _positive_int("frame_interval", frame_interval)
        self.root = str(root) if root is not None else os.path.dirname(os.path.abspath(self.data_path))
        self.transform_name = transform_name
        self.seed = seed
        self.use_image_transform = use_image_transform
        self.epoch = 0
        self._warned = set()

    def __len__(self):
        return len(self.rows)

    def set_epoch(self, epoch):
        """Frame starts are drawn per (seed, epoch, index): a new epoch gives new starts."""
        self.epoch = epoch

    def path(self, index):
        return os.path.join(self.root, self.rows[index]["path"])

    def _load(self, index, num_frames, size):
        path = self.path(index)
        if is_image_path(path):
            return resize_crop(read_image(path)[None], size).repeat(1, num_frames, 1, 1), IMAGE_FPS
        if self.use_image_transform:  # frame 0, resized once, then repeated
            frame, _ = read_video(path, pick=lambda total: torch.zeros(1, dtype=torch.long))
            return resize_crop(frame, size).repeat(1, num_frames, 1, 1), IMAGE_FPS
        generator = torch.Generator().manual_seed(seed_from(self.seed, self.epoch, index))
        frames, fps = read_video(path, pick=lambda total: frame_indices(total, num_frames, self.frame_interval, generator))
        return resize_crop(frames, size), fps

    def _warn_once(self, index, message):
        path = self.path(index)
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(f"skipping {path}: {message}".replace("\n", " "), stacklevel=3)

    def _fetch(self, index, num_frames, size):
        """(index actually used, video, fps): the first readable sample from `index` on, wrapping around; the
        unreadable ones before it are warned about (once per file in each process). When none can be read,
        one ValueError and no warnings."""
        failed = []
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                video, fps = self._load(candidate, num_frames, size)
            except _DECODE_ERRORS as error:
                failed.append((candidate, f"{type(error).__name__}: {error}"))
                continue
            for skipped, reason in failed:
                self._warn_once(skipped, f"cannot read it ({reason})")
            return candidate, video, fps
        first, reason = failed[0]
        raise ValueError(f"none of the {len(self)} videos of {self.data_path} can be read, e.g. {self.path(first)}: "
                         f"{reason}".replace("\n", " "))

    def check_readable(self):
        """Read one frame of the first readable sample here, before loader workers start: ValueError when
        none can be read. The unreadable files before it are warned about now, and workers (which start from
        this dataset's state) do not warn about them again."""
        self._fetch(0, 1, (16, 16))


class VideoTextDataset(_ClipTable):
    """Fixed-size clips: `dataset[i]` -> `{"video": float (3, num_frames, H, W) in [-1, 1], "text": str}`.

    `use_image_transform=True` treats every row as an image (a video file by its first frame), as
    Open-Sora v1.0 image training does. `transform_name` is accepted for Open-Sora configs; every
    name gives the same resize-to-cover + center crop.
    """

    def __init__(self, data_path, num_frames=16, frame_interval=1, image_size=(256, 256), root=None,
                 use_image_transform=False, transform_name=None, seed=0):
        super().__init__(data_path, frame_interval, root, transform_name, seed, use_image_transform)
        self.num_frames = _positive_int("num_frames", num_frames)
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if len(image_size) != 2:
            raise ValueError(f"image_size must be (height, width), got {image_size!r}")
        self.image_size = tuple(_positive_int("image_size", side) for side in image_size)

    def __getitem__(self, index):
        index, video, _ = self._fetch(index, self.num_frames, self.image_size)
        return {"video": video, "text": self.rows[index]["text"]}


def parse_key(key):
    """A bucket sampler key `(index, num_frames, height, width)`, or Open-Sora's "index-T-H-W" string."""
    values = key.split("-") if isinstance(key, str) else key
    if len(values) != 4:
        raise ValueError(f"a variable-size sample key is (index, num_frames, height, width), got {key!r}")
    return tuple(int(value) for value in values)


class VariableVideoTextDataset(_ClipTable):
    """Clips at the size a bucket chose: `dataset[(index, T, H, W)]` ->
    `{"video": float (3, T, H, W), "text", "num_frames": T, "height": H, "width": W, "ar": W / H, "fps"}`.

    `ar` is width / height, the conditioning value Open-Sora v1.1 passes on (bucket keys are H / W).
    `fps` is the file's, or 120 for images. `get_data_info(i)` -> `(T, H, W)` of the stored file: from
    the CSV's num_frames/height/width, or probed once with PyAV for rows that lack them (with a warning);
    a file that cannot be probed gets (0, 0, 0), which no bucket accepts.
    """

    def __init__(self, data_path, frame_interval=1, root=None, transform_name="resize_crop", seed=0):
        super().__init__(data_path, frame_interval, root, transform_name, seed)
        self.info = [tuple(row.get(name) for name in _INT_COLUMNS) for row in self.rows]
        unknown = [i for i, info in enumerate(self.info) if None in info]
        if unknown:
            warnings.warn(f"{self.data_path}: {len(unknown)} row(s) lack num_frames/height/width; probing those files with PyAV",
                          stacklevel=2)
            for i in unknown:
                try:
                    self.info[i] = probe(self.path(i))[:3]
                except _DECODE_ERRORS as error:
                    self._warn_once(i, f"cannot probe it ({type(error).__name__}: {error})")
                    self.info[i] = (0, 0, 0)

    def get_data_info(self, index):
        return self.info[index]

    def __getitem__(self, key):
        index, num_frames, height, width = parse_key(key)
        index, video, fps = self._fetch(index, num_frames, (height, width))
        return {"video": video, "text": self.rows[index]["text"], "num_frames": num_frames,
                "height": height, "width": width, "ar": width / height, "fps": fps}
