"""MaskGenerator: Open-Sora v1.1's training frame masks, drawn from a torch generator."""

import pytest
import torch

from sora.masks import MASK_TYPES, MaskGenerator

STAGE_RATIOS = {"mask_no": 0.75, "mask_quarter_random": 0.025, "mask_quarter_head": 0.025, "mask_quarter_tail": 0.025,
                "mask_quarter_head_tail": 0.05, "mask_image_random": 0.025, "mask_image_head": 0.025,
                "mask_image_tail": 0.025, "mask_image_head_tail": 0.05}


def condition_runs(mask):
    """The runs of False (condition) frames of a (T,) mask, as (start, length)."""
    runs, start = [], None
    for i, generate in enumerate([*mask.tolist(), True]):
        if not generate and start is None:
            start = i
        if generate and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


@pytest.mark.parametrize("name", MASK_TYPES)
def test_each_mask_type_conditions_the_frames_open_sora_names(name):
    T, q = 13, 3
    generator = torch.Generator().manual_seed(0)
    masks = MaskGenerator({name: 1.0}).get_masks(200, T, generator)
    assert masks.shape == (200, T) and masks.dtype == torch.bool
    sizes, starts = set(), set()
    for mask in masks:
        runs = condition_runs(mask)
        if name == "mask_no":
            assert runs == []
            continue
        k = runs[0][1]
        sizes.add(k)
        if name.endswith("_head_tail"):
            assert runs == [(0, k), (T - k, k)]
        elif name.endswith("_head"):
            assert runs == [(0, k)]
        elif name.endswith("_tail"):
            assert runs == [(T - k, k)]
        else:
            assert len(runs) == 1
            starts.add(runs[0][0])
    if name != "mask_no":
        assert sizes == ({1} if "image" in name else set(range(1, q + 1)))
    if name.endswith("_random"):
        assert starts == set(range(T - min(sizes) + 1))  # every position is drawn


def test_mask_types_are_drawn_with_the_ratios():
    masks = MaskGenerator(STAGE_RATIOS).get_masks(4000, 16, torch.Generator().manual_seed(1))
    unmasked = masks.all(1).float().mean().item()
    assert abs(unmasked - 0.75) < 0.03
    head_tail = (~masks[:, 0] & ~masks[:, -1]).float().mean().item()  # the two head_tail types: 0.1
    assert abs(head_tail - 0.1) < 0.02


def test_the_same_generator_seed_draws_the_same_masks():
    """A resumed run re-seeds its step generator from (seed, step, rank): the masks are the original run's."""
    generator = MaskGenerator(STAGE_RATIOS)
    first = generator.get_masks(64, 16, torch.Generator().manual_seed(7))
    again = generator.get_masks(64, 16, torch.Generator().manual_seed(7))
    other = generator.get_masks(64, 16, torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_short_clips_always_keep_a_frame_to_generate():
    for name in MASK_TYPES:
        generator = MaskGenerator({name: 1.0})
        assert generator.get_masks(5, 1, torch.Generator().manual_seed(2)).all()  # one frame: never masked
        assert generator.get_masks(20, 2, torch.Generator().manual_seed(3)).any(1).all()
    assert (~MaskGenerator({"mask_quarter_head": 1.0}).get_masks(5, 3, torch.Generator())[:, 0]).all()


@pytest.mark.parametrize("ratios, message", [
    ({"mask_no": 0.5, "mask_half": 0.5}, "unknown mask type 'mask_half'"),
    ({"mask_no": 0.5, "mask_image_head": 0.4}, "must sum to 1, got 0.9"),
    ({"mask_no": 1.5, "mask_image_head": -0.5}, r"mask_ratios\['mask_no'\] must be a probability"),
    ([("mask_no", 1.0)], "must be a dict"),
])
def test_bad_mask_ratios_are_one_clear_error(ratios, message):
    with pytest.raises(ValueError, match=message):
        MaskGenerator(ratios)
