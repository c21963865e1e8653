"""Reading picked frames of a clip seeks to the keyframe before the first of them: the same frames as decoding
from frame 0, with fewer frames decoded."""

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from sora.data import video
from sora.data.video import read_video

NUM_FRAMES, KEYFRAME_INTERVAL = 60, 10


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """60 frames of seeded noise over a moving gradient, h264 with B-frames and a keyframe every 10 frames: a
    decoder that starts at the wrong frame or loses a reference produces different pixels."""
    path = tmp_path_factory.mktemp("video") / "keyframes.mp4"
    generator = torch.Generator().manual_seed(0)
    ramp = torch.arange(64).view(1, 1, 64, 1) * 3
    frames = []
    for i in range(NUM_FRAMES):
        noise = torch.randint(0, 64, (1, 48, 64, 3), generator=generator)
        frames.append(((ramp + 4 * i) % 192 + noise).to(torch.uint8))
    frames = torch.cat(frames).numpy()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(12))
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "23", "x264-params": f"keyint={KEYFRAME_INTERVAL}:min-keyint={KEYFRAME_INTERVAL}:"
                                                      "scenecut=0:bframes=3"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        packets = [packet for packet in container.demux(container.streams.video[0]) if packet.size]
        assert sum(packet.is_keyframe for packet in packets) == NUM_FRAMES // KEYFRAME_INTERVAL
        assert any(packet.pts != packet.dts for packet in packets)  # B-frames: decode order != display order
    return path


class CountingContainer:
    """A PyAV input container that counts the frames its decoder produces."""

    def __init__(self, container):
        self.container, self.decoded = container, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.container.close()

    def __getattr__(self, name):
        return getattr(self.container, name)

    def decode(self, *args, **kwargs):
        for frame in self.container.decode(*args, **kwargs):
            self.decoded += 1
            yield frame


@pytest.fixture
def counting(monkeypatch):
    opened = []
    open_container = av.open
    monkeypatch.setattr(video.av, "open", lambda *args, **kwargs: opened.append(
        CountingContainer(open_container(*args, **kwargs))) or opened[-1])
    return opened


@pytest.mark.parametrize("picked, most_decoded", [
    (list(range(44, 60)), 16 + 4),  # the last 16 frames, from the keyframe at 40
    (list(range(20, 36, 2)), 16 + 4),  # every other frame from a keyframe on
    ([37, 12, 37, 25], 30),  # unordered and repeated: from the keyframe at 10
    ([59], 10),
    ([0, 1, 2], 3 + 4),
])
def test_picked_frames_equal_decoding_from_the_start_with_fewer_frames_decoded(clip, counting, picked, most_decoded):
    everything, fps = read_video(clip)
    assert len(everything) == NUM_FRAMES and counting[-1].decoded == NUM_FRAMES
    seen = []
    frames, picked_fps = read_video(clip, pick=lambda total: seen.append(total) or torch.tensor(picked))
    assert seen == [NUM_FRAMES] and picked_fps == fps == 12
    assert torch.equal(frames, everything[picked])
    assert counting[-1].decoded <= most_decoded


def test_indices_past_the_end_get_the_last_frame(clip):
    everything, _ = read_video(clip)
    frames, _ = read_video(clip, pick=lambda total: torch.tensor([57, total + 3]))
    assert torch.equal(frames, everything[[57, NUM_FRAMES - 1]])


def test_first_frame_of_each_keyframe_interval(clip):
    everything, _ = read_video(clip)
    for start in range(0, NUM_FRAMES, KEYFRAME_INTERVAL):
        for offset in (0, KEYFRAME_INTERVAL - 1):
            frames, _ = read_video(clip, pick=lambda total: torch.tensor([start + offset]))
            assert np.array_equal(frames[0].numpy(), everything[start + offset].numpy())
