"""A pre-encoded training set (written by `python -m sora.preprocess`): what the VAE and the text encoder
make of each clip, stored once, so that training needs neither.

    DIR/index.json        what was encoded and how (below), and which keys each shard holds
    DIR/shard-00000.pt    one torch.save'd list of entries per `shard_size` CSV rows

An entry is the clip of CSV row `index` at one size `(T, H, W)` (the config's, or with bucket_config each
bucket the sample may be drawn into): `mean` and, for a VAE that samples its posterior, `std`, both
(C, T, h, w) unscaled in the config's dtype; `y` (1, L, C) and `mask` (L,) of its caption (`y` a class id
for label encoders, no mask), and with bucket_config `fps` (the file's frame rate, 120 for images; the
bucket's num_frames, height, width and ar = width / height come from the key).
The frames are the ones epoch 0 of on-the-fly training takes (the start
frame is drawn from (the encoding's seed, epoch 0, index)); later epochs see the same frames again. Training draws the
latent from (mean, std) with the step's generator (`sora.models.vae.sample_posterior`), the draw the VAE
makes on the fly.
"""

import json
import os

import torch

from .datasets import parse_key

INDEX = "index.json"
FORMAT = "sora-encoded-1"
# Settings that decide what an entry holds: training must use the ones the set was encoded with.
ENCODING_KEYS = ("num_frames", "image_size", "frame_interval", "use_image_transform", "bucket_config", "vae",
                 "text_encoder", "dtype")
IGNORED_SUBKEYS = ("micro_batch_size",)  # how many frames per VAE call: not what comes out


def encoding_settings(cfg):
    """The config's settings that an encoded set depends on, as JSON values (tuples become lists)."""
    settings = {key: cfg.get(key) for key in ENCODING_KEYS}
    for key in ("vae", "text_encoder"):
        settings[key] = {k: v for k, v in dict(settings[key]).items() if k not in IGNORED_SUBKEYS}
    if cfg.get("bucket_config") is None:
        settings["bucket_config"] = None
    return json.loads(json.dumps(settings, default=str))


def is_encoded(path):
    """Whether data_path is a folder written by sora.preprocess (rather than a CSV)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX))


def read_index(folder):
    path = os.path.join(folder, INDEX)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} is not a pre-encoded training set (no {INDEX}; write one with "
                                "python -m sora.preprocess CONFIG --data-path CSV --save-dir DIR)")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
    return index


def check_settings(index, cfg, folder):
    """ValueError naming the first setting where the config differs from the one the set was encoded with."""
    wanted = encoding_settings(cfg)
    for key in ENCODING_KEYS:
        if index["settings"].get(key) != wanted[key]:
            raise ValueError(f"{folder} was encoded with {key}={index['settings'].get(key)!r}, the config has "
                             f"{wanted[key]!r}: train with the encoding's value, or encode again with this config")


def save_atomically(obj, path):
    """torch.save to a temporary name beside path, then rename: a reader sees the whole file or none."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class EncodedDataset(torch.utils.data.Dataset):
    """Entries of a pre-encoded set: `dataset[i]` (fixed size) or `dataset[(i, T, H, W)]` (a bucket's key, as
    VariableVideoBatchSampler yields) -> `{"mean", "std" (when stored), "y", "mask" (when stored)}`.

    Offers what the samplers need: `len`, `get_data_info(i)` (the stored file's T, H, W), `frame_interval`.
    Shards are opened memory-mapped, once per process (each DataLoader worker keeps its own)."""

    def __init__(self, folder):
        self.folder = str(folder)
        self.index = read_index(self.folder)
        self.frame_interval = self.index["settings"]["frame_interval"]
        self.info = [tuple(info) for info in self.index["info"]]
        self.size = self.index.get("size")  # (T, H, W) of every entry without bucket_config
        self.where = {}
        for shard, keys in enumerate(self.index["shards"]):
            for position, key in enumerate(keys["keys"]):
                self.where[tuple(key)] = (shard, position)
        self._open = {}

    def __len__(self):
        return len(self.info)

    def set_epoch(self, epoch):
        """Accepted as the video datasets accept it; the frames were chosen when the set was encoded."""

    def get_data_info(self, index):
        return self.info[index]

    def _shard(self, shard):
        if shard not in self._open:
            path = os.path.join(self.folder, self.index["shards"][shard]["file"])
            self._open[shard] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open[shard]

    def __getitem__(self, key):
        bucketed = not isinstance(key, int)
        key = parse_key(key) if bucketed else (key, *self.size)
        if key not in self.where:
            raise KeyError(f"{self.folder} holds no entry {key} (sample index, T, H, W): encoded with another "
                           "bucket_config?")
        shard, position = self.where[key]
        entry = self._shard(shard)[position]
        if bucketed:  # the size conditioning VariableVideoTextDataset gives (fps is stored with the entry)
            _, frames, height, width = key
            entry = {**entry, "num_frames": frames, "height": height, "width": width, "ar": width / height}
        return entry
