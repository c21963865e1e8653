"""Frame masks for Open-Sora v1.1's masked training: which latent frames of a sample are the condition.

A mask is (T,) bool over the latent frames, True = a frame to generate, False = a condition frame (given
almost clean, see `IDDPM.training_losses(frame_mask=...)`). Each sample draws one mask type with the
probabilities of `mask_ratios` (Open-Sora's `MaskGenerator`, their d599fd7 train_utils.py); with q = T // 4:

    mask_no                 no condition frame
    mask_quarter_random     a run of k frames at a random position, k uniform in 1..q
    mask_quarter_head       the first k frames                      (k uniform in 1..q)
    mask_quarter_tail       the last k frames                       (k uniform in 1..q)
    mask_quarter_head_tail  the first k and the last k frames       (one k, uniform in 1..q)
    mask_image_*            as the quarter types with k = 1 (their docs' "1 image to 1/4 #images" is wrong:
                            the image types always take exactly one frame)

Differences from Open-Sora, for clips Open-Sora's buckets never give: a single frame is never masked (as
theirs), q is at least 1 (theirs raises for T in {2, 3}), and a mask that would leave no frame to generate
(head_tail on 2 frames) generates every frame instead, since its loss would be 0 / 0.

The draws come from a torch.Generator (Open-Sora uses Python's global `random`): the trainer passes its
per-step generator, seeded from (seed, step, rank), so a resumed run draws the masks the original run drew.
"""

import math
import numbers

import torch

MASK_TYPES = (
    "mask_no",
    "mask_quarter_random",
    "mask_quarter_head",
    "mask_quarter_tail",
    "mask_quarter_head_tail",
    "mask_image_random",
    "mask_image_head",
    "mask_image_tail",
    "mask_image_head_tail",
)


def check_mask_ratios(mask_ratios):
    """ValueError unless mask_ratios is {mask type: probability} with probabilities in [0, 1] summing to 1."""
    if not isinstance(mask_ratios, dict) or not mask_ratios:
        raise ValueError(f"mask_ratios must be a dict {{mask type: probability}}, got {mask_ratios!r}.")
    for name, ratio in mask_ratios.items():
        if name not in MASK_TYPES:
            raise ValueError(f"mask_ratios: unknown mask type {name!r}; the types are {', '.join(MASK_TYPES)}.")
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio <= 1:
            raise ValueError(f"mask_ratios[{name!r}] must be a probability in [0, 1], got {ratio!r}.")
    total = sum(mask_ratios.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(f"mask_ratios must sum to 1, got {total:g} ({mask_ratios!r}).")


def _randint(low, high, generator):
    """An int uniform in low..high (both included)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


class MaskGenerator:
    """Draws Open-Sora v1.1's training frame masks with the probabilities of `mask_ratios`."""

    def __init__(self, mask_ratios):
        check_mask_ratios(mask_ratios)
        self.mask_ratios = dict(mask_ratios)

    def mask_type(self, generator=None):
        """One mask type, by the cumulative ratios in the dict's order (as Open-Sora)."""
        draw = float(torch.rand((), generator=generator, dtype=torch.float64))
        cumulative = 0.0
        for name, ratio in self.mask_ratios.items():
            cumulative += ratio
            if draw < cumulative:
                return name
        return "mask_no"  # the ratios summed to just under 1 and the draw fell in the gap

    def get_mask(self, num_frames, generator=None):
        """(num_frames,) bool, True = generate, for one sample."""
        name = self.mask_type(generator)
        mask = torch.ones(num_frames, dtype=torch.bool)
        if num_frames <= 1 or name == "mask_no":
            return mask
        k = 1 if name.startswith("mask_image") else _randint(1, max(num_frames // 4, 1), generator)
        if name.endswith("_random"):
            start = _randint(0, num_frames - k, generator)
            mask[start:start + k] = False
        if name.endswith("_head") or name.endswith("_head_tail"):
            mask[:k] = False
        if name.endswith("_tail"):
            mask[-k:] = False
        return mask if mask.any() else torch.ones(num_frames, dtype=torch.bool)

    def get_masks(self, batch_size, num_frames, generator=None):
        """(batch_size, num_frames) bool: one mask per sample, drawn in the batch's order."""
        return torch.stack([self.get_mask(num_frames, generator) for _ in range(batch_size)])
