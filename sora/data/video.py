"""Video and image files <-> uint8 tensors, through PyAV (its wheels ship ffmpeg) and Pillow.

Frames are `(T, H, W, 3)` uint8 RGB, the layout decoders give; the datasets turn them into the
model's `(3, T, H, W)` float layout.
"""

import os
from fractions import Fraction

import av
import numpy as np
import torch
from PIL import Image

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_FPS = 24.0


def is_image_path(path):
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def _require_file(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")


def _stream_fps(stream):
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else DEFAULT_FPS


def read_video(path, pick=None):
    """Decode the first video stream.

    Returns `(frames, fps)`: frames `(T, H, W, 3)` uint8 RGB, fps a float (24 when the file does not say).
    `pick`, a function `num_frames -> frame indices`, selects frames: when the header gives the frame
    count, only the picked frames are decoded from the keyframe before the first of them on (a 16-frame
    sample from the end of a long clip does not decode the clip's start) and converted, and decoding stops
    after the last of them; the frames are the same as decoding from frame 0. Indices past the frames
    actually decoded get the last decoded frame.
    Raises FileNotFoundError for a missing file, ValueError for a file with no decodable video frames
    (PyAV's own errors for unreadable containers are FFmpegError subclasses of ValueError/OSError).
    """
    path = str(path)
    _require_file(path)
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"no video stream in {path}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = _stream_fps(stream)
        if pick is None or stream.frames <= 0:
            video = _decode_all(container, stream, path)
            return (video if pick is None else video[pick(len(video))]), fps
        wanted = pick(stream.frames).tolist()
        kept = _decode_from_keyframe(container, stream, wanted)
        if kept is None:
            container.seek(0, stream=stream, backward=True, any_frame=False)
            kept = _decode_from_start(container, stream, wanted, path)
        return torch.from_numpy(np.stack([kept[i] for i in wanted])), fps


def _decode_all(container, stream, path):
    frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ValueError(f"no decodable video frames in {path}")
    return torch.from_numpy(np.stack(frames))


def _decode_from_start(container, stream, wanted, path):
    """`{index: (H, W, 3)}` for the `wanted` frame indices, counting decoded frames from the first; indices past
    the last decoded frame map to it."""
    stop, wanted_set = max(wanted), set(wanted)
    kept, last = {}, None
    for i, frame in enumerate(container.decode(stream)):
        last = frame
        if i in wanted_set:
            kept[i] = frame.to_ndarray(format="rgb24")
            if i == stop:
                break
    if last is None:
        raise ValueError(f"no decodable video frames in {path}")
    tail = last.to_ndarray(format="rgb24")
    return {i: kept.get(i, tail) for i in wanted}


def _decode_from_keyframe(container, stream, wanted):
    """`{index: (H, W, 3)}` for the `wanted` frame indices, decoded from the last keyframe at or before the
    first of them; None when that cannot be done exactly (a packet without a timestamp, repeated timestamps,
    an index past the stream's frames, a decoded frame whose timestamp no packet had), and the caller then
    decodes from the start.

    A frame's index is its rank among the packets' presentation timestamps, read from the container without
    decoding (cheap next to decoding), so it holds for B-frames and variable frame rates alike."""
    timestamps = [packet.pts for packet in container.demux(stream) if packet.size]
    if None in timestamps or len(set(timestamps)) != len(timestamps) or max(wanted) >= len(timestamps):
        return None
    timestamps.sort()
    index = {pts: i for i, pts in enumerate(timestamps)}
    wanted = set(wanted)
    first, stop = min(wanted), max(wanted)
    container.seek(timestamps[first], stream=stream, backward=True, any_frame=False)
    kept = {}
    for frame in container.decode(stream):
        i = index.get(frame.pts)
        if i is None:
            return None
        if i in wanted and i not in kept:
            kept[i] = frame.to_ndarray(format="rgb24")
        if i >= stop:
            break
    return kept if len(kept) == len(wanted) else None


def read_image(path):
    """Returns the image as `(H, W, 3)` uint8 RGB."""
    path = str(path)
    _require_file(path)
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB")))


def probe(path):
    """`(num_frames, height, width, fps)` of a video or image file without decoding pixels.

    Images are 1 frame at fps 0 (callers pick their own image fps). The frame count comes from the
    container header, or from counting packets when the header does not carry it.
    """
    path = str(path)
    _require_file(path)
    if is_image_path(path):
        with Image.open(path) as image:
            width, height = image.size
        return 1, height, width, 0.0
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"no video stream in {path}")
        stream = container.streams.video[0]
        num_frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        return num_frames, stream.codec_context.height, stream.codec_context.width, _stream_fps(stream)


def write_video(path, frames, fps=DEFAULT_FPS, crf=18):
    """Write `(T, H, W, 3)` uint8 frames as an h264 (libx264, yuv420p) mp4.

    yuv420p needs even sizes: an odd height or width is padded by repeating the last row/column, so the
    file is then one pixel larger on that side. `crf` is x264's quality (0 lossless, 18 visually lossless).
    """
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    array = frames.cpu().numpy()
    pad_h, pad_w = array.shape[1] % 2, array.shape[2] % 2
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = array.shape[2], array.shape[1]
        stream.pix_fmt = "yuv420p"
        # Repeatable files: with x264's macroblock-tree rate control (and its lookahead) the same frames gave
        # different files after any decode earlier in the process; without it, and on one thread, they do not.
        stream.options = {"crf": str(crf), "threads": "1", "x264-params": "mbtree=0:rc-lookahead=0"}
        for image in array:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def save_sample(x, path_without_ext, fps=8):
    """Save a generated sample: float `(3, T, H, W)` in [-1, 1] (clamped) -> `.png` when T == 1, else `.mp4`.

    Returns the written path.
    """
    if x.ndim != 4 or x.shape[0] != 3:
        raise ValueError(f"x must be (3, T, H, W), got {tuple(x.shape)}")
    frames = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to("cpu", torch.uint8).permute(1, 2, 3, 0)
    path = str(path_without_ext)
    if frames.shape[0] == 1:
        path += ".png"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Image.fromarray(frames[0].numpy()).save(path)
        return path
    return write_video(path + ".mp4", frames, fps=fps)
