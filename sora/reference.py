"""Open-Sora v1.1's conditioning on references: image-to-video, video extension and looped generation.

A prompt may come with references (`reference_path`: images and videos, `;`-separated) and a
`mask_strategy` saying which of their latent frames go where in the sampled clip (their d599fd7
scripts/inference-long.py). A mask strategy is `;`-separated groups of up to six comma-separated numbers:

    loop_id, ref_id, ref_start, target_start, length, edit_ratio

- loop_id: the loop (0 = the first clip) the group applies to;
- ref_id: which reference of the prompt (0 = the first of its reference_path);
- ref_start, target_start: the first latent frame taken from the reference, and where it goes in the clip;
  negative values count from the end (-1 = the last frame);
- length: how many frames; edit_ratio: 0 keeps them as given, 1 regenerates them, in between they are
  re-noised part way (SDEdit-like: released at step int(ratio * steps), see `IDDPM.sample`).

Missing trailing fields take the defaults `0, 0, 0, 1, 0` for the fields after loop_id, in that order: "0" is
"loop 0, reference 0, its frame 0 -> frame 0, 1 frame, kept" (image-to-video). Frames are latent frames; with
the per-frame SD VAE of the v1.1 configs a latent frame is a video frame.

Loops: clip i > 0 takes the last `condition_frame_length` frames of clip i - 1 (decoded, then encoded again) as
its first frames, with edit ratio 0 (the group `i,<that reference>,-L,0,L` is added); the video is clip 0 then
every later clip without its first L frames. A prompt `|0|text A|2|text B` uses text A for loops 0 and 1 and
text B from loop 2 on. A prompt ending in `{"reference_path": ..., "mask_strategy": ...}` sets its own.
"""

import copy
import json
import os
from typing import NamedTuple

import torch

FIELDS = ("loop_id", "ref_id", "ref_start", "target_start", "length", "edit_ratio")
DEFAULTS = ("0", "0", "0", "1", "0")  # for every field after loop_id


class MaskGroup(NamedTuple):
    loop_id: int
    ref_id: int
    ref_start: int
    target_start: int
    length: int
    edit_ratio: float


def parse_mask_strategy(strategy):
    """The groups of a mask strategy string (see the module docstring); None or "" has none. ValueError naming
    the strategy and the bad group."""
    if strategy is None or strategy == "":
        return []
    groups = []
    for group in strategy.split(";"):
        fields = [field.strip() for field in group.split(",")]
        if not 1 <= len(fields) <= len(FIELDS):
            raise ValueError(f"mask_strategy {strategy!r}: group {group!r} has {len(fields)} fields; expected 1 to 6 "
                             f"({', '.join(FIELDS)})")
        fields += DEFAULTS[len(fields) - 1:]
        try:
            values = [int(field) for field in fields[:5]] + [float(fields[5])]
        except ValueError:
            raise ValueError(f"mask_strategy {strategy!r}: group {group!r} is not numbers "
                             f"({', '.join(FIELDS)}; all integers but edit_ratio)") from None
        parsed = MaskGroup(*values)
        if parsed.loop_id < 0 or parsed.ref_id < 0 or parsed.length < 0 or not 0 <= parsed.edit_ratio <= 1:
            raise ValueError(f"mask_strategy {strategy!r}: group {group!r} needs loop_id, ref_id and length >= 0 and "
                             "edit_ratio in [0, 1]")
        groups.append(parsed)
    return groups


def loop_prompts(prompt, loops):
    """The text of each of `loops` loops: a `|0|text A|2|text B` prompt switches text at the loops it names
    (the first must be 0, then increasing, below `loops`), any other prompt is the same for every loop."""
    if not prompt.startswith("|0|"):
        return [prompt] * loops
    parts = prompt.split("|")[1:]
    if len(parts) % 2:
        raise ValueError(f"loop prompt {prompt!r}: expected |loop|text pairs, e.g. '|0|a cat|2|a dog'")
    starts, texts = parts[0::2], parts[1::2]
    if not all(start.isdigit() for start in starts):
        raise ValueError(f"loop prompt {prompt!r}: the loop numbers must be integers, got {starts}")
    starts = [int(start) for start in starts]
    if starts != sorted(set(starts)) or starts[-1] >= loops:
        raise ValueError(f"loop prompt {prompt!r}: loops {starts} must increase and stay below loop={loops}")
    ends = starts[1:] + [loops]
    return [text.strip() for start, end, text in zip(starts, ends, texts) for _ in range(end - start)]


def prompt_options(prompt):
    """(text, options): a prompt may end in a JSON object overriding its reference_path and mask_strategy, as in
    Open-Sora v1.1 (`a wave.{"reference_path": "wave.png", "mask_strategy": "0"}`)."""
    start = prompt.find("{")
    if start < 0:
        return prompt, {}
    try:
        options = json.loads(prompt[start:])
    except json.JSONDecodeError as error:
        raise ValueError(f"prompt {prompt!r}: its {{...}} ending is not JSON ({error.msg})") from None
    unknown = set(options) - {"reference_path", "mask_strategy"} if isinstance(options, dict) else {"(not a dict)"}
    if unknown:
        raise ValueError(f"prompt {prompt!r}: its JSON ending may set reference_path and mask_strategy, not "
                         f"{', '.join(sorted(unknown))}")
    return prompt[:start], options


def read_reference(path, image_size):
    """A reference image or video as float (3, T, H, W) in [-1, 1], resized to cover image_size and centre-cropped
    (Open-Sora's resize_crop); a video is read whole, every frame at its own rate. ValueError naming the file when
    it cannot be read."""
    from sora.data import read_image, read_video, resize_crop
    from sora.data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, is_image_path

    if "://" in path:
        raise ValueError(f"reference {path!r} cannot be read: URLs are not downloaded; download it and give its path")
    if not os.path.isfile(path):
        raise ValueError(f"reference {path!r} cannot be read: no such file")
    extension = os.path.splitext(path)[1].lower()
    if extension not in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
        raise ValueError(f"reference {path!r} cannot be read: {extension or 'no extension'} is neither an image "
                         f"({' '.join(IMAGE_EXTENSIONS)}) nor a video ({' '.join(VIDEO_EXTENSIONS)})")
    try:
        frames = read_image(path)[None] if is_image_path(path) else read_video(path)[0]
    except Exception as error:  # PIL and PyAV raise many kinds for a damaged file
        raise ValueError(f"reference {path!r} cannot be read: {type(error).__name__}: {error}") from None
    if len(frames) == 0:
        raise ValueError(f"reference {path!r} cannot be read: it has no frames")
    return resize_crop(frames, image_size)


def apply_mask_strategy(z, references, groups, loop, strategy=""):
    """Write the reference frames the groups of `loop` name into z (C, T, h, w), in place; return the (T,) edit
    ratios (1 where no group writes). references: the prompt's latents, each (C, T_ref, h, w). ValueError,
    naming the strategy, for a reference index past the list or frames outside the reference or the clip."""
    frames = z.shape[1]
    ratios = torch.ones(frames, dtype=torch.float32)
    for group in groups:
        if group.loop_id != loop:
            continue
        if group.ref_id >= len(references):
            raise ValueError(f"mask_strategy {strategy!r}: reference {group.ref_id} does not exist (this prompt has "
                             f"{len(references)} reference(s))")
        reference = references[group.ref_id]
        ref_start = group.ref_start + reference.shape[1] if group.ref_start < 0 else group.ref_start
        target_start = group.target_start + frames if group.target_start < 0 else group.target_start
        if not (0 <= ref_start and ref_start + group.length <= reference.shape[1]):
            raise ValueError(f"mask_strategy {strategy!r}: frames {group.ref_start}..+{group.length} are outside "
                             f"reference {group.ref_id}'s {reference.shape[1]} latent frame(s)")
        if not (0 <= target_start and target_start + group.length <= frames):
            raise ValueError(f"mask_strategy {strategy!r}: target frames {group.target_start}..+{group.length} are "
                             f"outside the clip's {frames} latent frame(s)")
        z[:, target_start:target_start + group.length] = reference[:, ref_start:ref_start + group.length]
        ratios[target_start:target_start + group.length] = group.edit_ratio
    return ratios


class Conditioning:
    """What a batch of prompts is conditioned on beyond its text: references, mask strategies, loops.

    prompts: the batch's prompts (loop prompts allowed); reference_paths and mask_strategies: one entry per
    prompt (a string or None); image_size: (H, W) the references are resized to. Everything is checked when
    it is built: a malformed strategy or loop prompt is a ValueError naming it before anything is sampled.
    """

    def __init__(self, prompts, reference_paths=None, mask_strategies=None, image_size=None, loop=1,
                 condition_frame_length=None):
        count = len(prompts)
        reference_paths = [None] * count if reference_paths is None else list(reference_paths)
        mask_strategies = [None] * count if mask_strategies is None else list(mask_strategies)
        if loop > 1 and condition_frame_length is None:
            raise ValueError(f"loop={loop} needs condition_frame_length: how many frames of a clip start the next")
        self.texts = []
        for i, prompt in enumerate(prompts):
            prompt, options = prompt_options(prompt)
            reference_paths[i] = options.get("reference_path", reference_paths[i])
            mask_strategies[i] = options.get("mask_strategy", mask_strategies[i])
            self.texts.append(loop_prompts(prompt, loop))
        self.paths = [[] if paths in (None, "") else paths.split(";") for paths in reference_paths]
        self.strategies = mask_strategies
        self.groups = [parse_mask_strategy(strategy) for strategy in mask_strategies]
        for paths, groups, strategy in zip(self.paths, self.groups, mask_strategies):
            for group in groups:
                # Loop i > 0 has one more reference per loop before it: the clips it continues from.
                available = len(paths) + min(group.loop_id, loop - 1)
                if group.loop_id < loop and group.ref_id >= available:
                    raise ValueError(f"mask_strategy {strategy!r}: reference {group.ref_id} does not exist in loop "
                                     f"{group.loop_id} (its prompt has {available} reference(s) there)")
        # Read now, before any model is built: a reference that cannot be read fails at once.
        self.pixels = [[read_reference(path, image_size) for path in paths] for paths in self.paths]
        self.loop = loop
        self.condition_frame_length = condition_frame_length
        self.references = [[] for _ in prompts]

    def select(self, start, stop):
        """The conditioning of prompts start..stop - 1 (a batch), with no reference encoded yet."""
        part = copy.copy(self)
        for name in ("texts", "paths", "strategies", "pixels"):
            setattr(part, name, getattr(self, name)[start:stop])
        part.groups = [list(groups) for groups in self.groups[start:stop]]
        part.references = [[] for _ in part.texts]
        return part

    def prompts(self, loop):
        """The batch's texts for loop `loop`."""
        return [texts[loop] for texts in self.texts]

    def encode_references(self, vae, device, dtype, generators):
        """Read and encode every prompt's references (latents sampled from the VAE's posterior with the prompt's
        generator, as Open-Sora samples them)."""
        for j, videos in enumerate(self.pixels):
            for video in videos:
                self.references[j].append(vae.encode(video[None].to(device, dtype), generator=generators[j])[0])

    def continue_from(self, clips, loop, vae, device, dtype, generators):
        """Before loop `loop` > 0: the last clips (B, 3, T, H, W), encoded again, become every prompt's last
        reference, and their last condition_frame_length latent frames the new clip's first ones."""
        length = self.condition_frame_length
        for j in range(len(self.references)):
            self.references[j].append(vae.encode(clips[j:j + 1].to(device, dtype), generator=generators[j])[0])
            self.groups[j].append(MaskGroup(loop, len(self.references[j]) - 1, -length, 0, length, 0.0))

    def frame_mask(self, z, loop):
        """Write loop `loop`'s reference frames into z (B, C, T, h, w); the (B, T) edit ratios, or None when
        every frame is generated (then sampling is the unconditioned computation)."""
        ratios = torch.stack([
            apply_mask_strategy(z[j], self.references[j], self.groups[j], loop, self.strategies[j] or "")
            for j in range(len(self.references))
        ])
        return None if bool((ratios == 1).all()) else ratios.to(z.device)

    def join(self, clips, temporal_patch=1):
        """The video of every loop's clips (B, 3, T, H, W): the first whole, the others without the frames they
        took from the clip before (condition_frame_length latent frames, times the VAE's temporal patch)."""
        drop = (self.condition_frame_length or 0) * temporal_patch
        return torch.cat([clips[0], *[clip[:, :, drop:] for clip in clips[1:]]], dim=2)
